"""The README's main command, ``flwr run .``, on a tiny plan, and ``adadpigu stop-superlink``:
it stops exactly the local SuperLink (and its SuperExec) that this Flower home's ``flwr run``
left running, never another one (issue 28.8)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.processes import descendants_of, local_superlink_pids, process_alive, stop_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _decoy_superlink(tmp_path: Path) -> subprocess.Popen:
    """A process that looks like another Flower home's local SuperLink."""
    script = tmp_path / "bin" / "flower-superlink"
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(600)\n")
    other = tmp_path / "other-home" / "local-superlink" / "superlink.log"
    return subprocess.Popen([sys.executable, str(script), "--simulation", "--log-file", str(other)])


def test_flwr_run_then_stop_superlink_stops_exactly_its_own(tmp_path, data_dir):
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "ADADPIGU_DATA_DIR": data_dir,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    decoy = _decoy_superlink(tmp_path)
    started: list[int] = []
    try:
        proc = subprocess.run(
            [
                flwr, "run", ".", "--stream", "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
                "--run-config",
                f"num-server-rounds=2 importance-rounds=1 train-subset=600 test-subset=500 batch-size=64 "
                f"features='pixels' model='mnist-cnn' out-dir='{out}'",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        started = local_superlink_pids(home)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        summaries = glob.glob(str(out / "*" / "summary.json"))
        assert len(summaries) == 1 and json.load(open(summaries[0]))["rounds_completed"] == 2
        assert len(started) == 1, "flwr run left no local SuperLink of its home (Flower changed?)"
        tree = [started[0], *descendants_of(started[0])]
        assert decoy.pid not in tree
        stop = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "stop-superlink", "--flwr-home", str(home)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert stop.returncode == 0 and f"pids {started[0]}" in stop.stdout, stop.stdout + stop.stderr
        time.sleep(0.5)
        assert not any(process_alive(p) for p in tree)
        assert decoy.poll() is None  # another home's SuperLink is left alone
        again = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "stop-superlink", "--flwr-home", str(home)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert again.returncode == 0 and "no local SuperLink" in again.stdout
    finally:
        stop_processes(started, grace=3.0)
        decoy.kill()
        decoy.wait(timeout=30)
