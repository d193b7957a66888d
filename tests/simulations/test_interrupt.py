"""Ctrl-C on ``adadpigu simulate`` during a round: a prompt exit with a non-zero code, every
process it started stopped, and a run folder that resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from simulations.processes import descendants_of, process_alive
from tests.simulations.sigint import sigint_default

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ctrl_c_during_a_round_exits_promptly_and_leaves_nothing_running(tmp_path, data_dir):
    argv = [
        sys.executable, "-m", "simulations.cli", "simulate", "--num-supernodes", "2", "--num-cpus", "1",
        "--method", "dpsgd", "--num-server-rounds", "50", "--train-subset", "2000", "--test-subset", "200",
        "--batch-size", "32", "--seed", "0", "--data-dir", data_dir, "--out-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=sigint_default,
    )  # fmt: skip
    lines, deadline, family = [], time.time() + 240, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[round   1]" in line or time.time() > deadline:
                break
        assert any("[round   1]" in x for x in lines), "".join(lines[-20:])
        family = descendants_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, _ = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:  # a failed test leaves nothing running either (Ray's processes)
            for pid in [*family, *descendants_of(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, None) and elapsed < 30, (proc.returncode, elapsed)
    assert "interrupted" in out.strip().splitlines()[-1]
    time.sleep(1)
    assert not [p for p in family if process_alive(p)], "processes left running after Ctrl-C"
    runs = [d for d in os.listdir(tmp_path) if os.path.isfile(tmp_path / d / "checkpoint.pt")]
    assert runs, "no resumable run folder"
