"""More than one machine: `adadpigu simulate --ray-address` joins a Ray cluster started with
`ray start` (a head and a worker node, here as separate local processes). The head offers
no CPU, so the clients can only have run on the worker node."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulation_joins_a_two_node_ray_cluster(tmp_path, data_dir):
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    assert ray, "the `ray` command comes with flwr[simulation]"
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port, client_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [ray, "start", "--head", f"--port={port}", f"--ray-client-server-port={client_port}",
             "--include-dashboard=false", f"--temp-dir={temp}", "--num-cpus=0", "--disable-usage-stats"],
            check=True, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        worker = [ray, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"]
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=120)
        cmd = [
            sys.executable, "-m", "simulations.cli", "simulate", "--ray-address", address,
            "--num-supernodes", "2", "--num-cpus", "1",
            "--num-server-rounds", "2", "--min-available-nodes", "2", "--min-train-nodes", "2",
            "--method", "dpsgd", "--epsilon", "8", "--batch-size", "32",
            "--train-subset", "1000", "--test-subset", "300",
            "--seed", "0", "--data-dir", data_dir, "--out-dir", str(tmp_path), "--json",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["rounds_completed"] == 2 and 0 < summary["max_epsilon"] <= 8.0
        # ray-num-cpus belongs to `ray start` when joining a cluster: refused before any work
        bad = subprocess.run(
            cmd + ["--ray-num-cpus", "2"], capture_output=True, text=True, timeout=120, env=env
        )
        assert bad.returncode != 0 and "ray-num-cpus" in bad.stderr.strip().splitlines()[-1]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
