"""More than one machine: `adadpigu simulate --ray-address` joins a Ray cluster started with
`ray start` (a head and a worker node, here as separate local processes). The head offers
no CPU, so the clients can only have run on the worker node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.tagged import tagged_processes

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulation_joins_a_two_node_ray_cluster(tmp_path, data_dir):
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    assert ray, "the `ray` command comes with flwr[simulation]"
    tag = f"ray-cluster-{uuid.uuid4().hex}"  # inherited by every Ray daemon this test starts
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "ADADPIGU_TEST_TAG": tag,
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
        # stop only this test's cluster: `ray stop` would end every Ray process on the machine
        left = _stop_tagged(tag)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"Ray processes of the test still running: {left}"


def _stop_tagged(tag: str) -> list[int]:
    """SIGTERM, then SIGKILL, to every process carrying the tag; the ones still alive."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in tagged_processes(tag):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while tagged_processes(tag) and time.time() < deadline:
            time.sleep(0.2)
    return tagged_processes(tag)
