"""``adadpigu deploy-local``: SuperLink + SuperNodes as local processes, and their clean-up.

The slow tests run Flower's deployment runtime for real on loopback (free ports, a
temporary FLWR_HOME) on a small MNIST subset. Every process the launcher starts, and
every descendant, must be gone afterwards; the tests also look for any process that still
carries their environment tag.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from simulations import deploy
from simulations.cli import main
from tests.simulations.sigint import sigint_default
from tests.tagged import tagged_processes

ROOT = Path(__file__).resolve().parents[2]

# Small and fast: 2 silos x 900 examples, RDP calibration (seconds, not tens of seconds).
SMALL = {
    "train-subset": 2000,
    "test-subset": 500,
    "batch-size": 32,
    "num-server-rounds": 2,
    "importance-rounds": 1,
    "evaluate-every": 2,
    "min-available-nodes": 2,
    "min-train-nodes": 2,
    "epsilon": 8.0,
    "accountant": "rdp",
    "seed": 0,
}


@pytest.fixture
def tag(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv("ADADPIGU_TEST_TAG", value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    return value


def _assert_all_gone(pids, tag: str | None = None) -> None:
    alive = [p for p in pids if deploy.process_alive(p)]
    assert not alive, f"processes left behind: {alive}"
    if tag is not None and os.path.isdir("/proc"):
        assert not tagged_processes(tag), "a process started by the test is still running"


# ----- fast: validation before anything starts ---------------------------------------------


def test_parse_run_config():
    assert deploy.parse_run_config("epsilon=3 method='dpsgd' out-dir=\"a b\" lr=0.5 seed=-1") == {
        "epsilon": 3,
        "method": "dpsgd",
        "out-dir": "a b",
        "lr": 0.5,
        "seed": -1,
    }
    assert deploy.parse_run_config("") == {}
    with pytest.raises(UserError, match="strings need quotes"):
        deploy.parse_run_config("method=dpsgd")


def test_unknown_key_and_bad_value_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown run-config key.*no-such-key"):
        deploy.deploy_local({"no-such-key": 1}, silos=2, timeout=10)
    with pytest.raises(ConfigError, match="'method'"):
        deploy.deploy_local({"method": "nope", "out-dir": str(tmp_path)}, silos=2, timeout=10)
    with pytest.raises(ConfigError, match="cannot exceed the number of silos"):
        deploy.deploy_local({"out-dir": str(tmp_path)}, silos=1, timeout=10)


def test_missing_certificates_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="gen_certs.sh"):
        deploy.deploy_local(
            {"out-dir": str(tmp_path)}, silos=2, superlink_port=0, base_supernode_port=0, certs_dir=tmp_path
        )


@pytest.mark.parametrize("which", ["superlink", "supernode"])
def test_taken_port_is_a_clear_user_error(tmp_path, which):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        kwargs = {"superlink_port": port, "base_supernode_port": 0}
        if which == "supernode":
            kwargs = {"superlink_port": 0, "base_supernode_port": port}
        started = []
        with pytest.raises(UserError) as err:
            deploy.deploy_local(
                {"out-dir": str(tmp_path)}, silos=2, timeout=10, on_started=started.append, **kwargs
            )
    msg = str(err.value)
    assert f"port {port} on 127.0.0.1" in msg and "already in use" in msg
    assert ("SuperLink" if which == "superlink" else "SuperNode 0") in msg
    assert "\n" not in msg and not started
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_cli_taken_port_one_line_exit_2(tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(
            ["deploy-local", "--silos", "2", "--superlink-port", str(port), "--timeout", "10"]
            + ["--run-config", f"out-dir='{tmp_path}'"]
        )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("adadpigu: error: port") and len(err.splitlines()) == 1


# ----- slow: real SuperLink + SuperNodes -----------------------------------------------------


@pytest.mark.slow
def test_two_silos_end_to_end(tmp_path, data_dir, tag):
    lines: list[str] = []
    t0 = time.monotonic()
    result = deploy.deploy_local(
        {**SMALL, "out-dir": str(tmp_path / "runs")},
        silos=2,
        superlink_port=0,
        base_supernode_port=0,
        timeout=480,
        data_dir=data_dir,
        flwr_home=tmp_path / "flwr-home",
        log=lines.append,
    )
    elapsed = time.monotonic() - t0
    tail = "\n".join(lines[-40:])
    assert result["returncode"] == 0, tail
    summary = result["summary"]
    assert summary is not None, tail
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed", summary
    assert summary["num_silos"] == 2
    assert 0 < summary["max_epsilon"] <= 8.0 + 1e-9
    run = Path(result["run_dir"])
    assert run.parent == tmp_path / "runs"
    for name in ("summary.json", "metrics.json", "ledger.json", "plan.json", "final_model.pt"):
        assert (run / name).exists(), name
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["max_epsilon"] <= 8.0 + 1e-9 for r in rows)
    ledger = json.loads((run / "ledger.json").read_text())
    assert set(ledger["clients"]) == {"silo-0", "silo-1"}
    assert (run / "deploy-logs" / "superlink.log").exists()
    assert (run / "deploy-logs" / "supernode-1.log").exists()
    # the launcher saw the superexec children (one per SuperNode, one for the SuperLink) ...
    assert set(result["pids"]) == {"superlink", "supernode-0", "supernode-1", "flwr-run"}
    assert len(result["descendant_pids"]) >= 3
    # ... and every process is gone
    _assert_all_gone([*result["pids"].values(), *result["descendant_pids"]], tag)
    print(f"deploy-local end to end: {elapsed:.0f}s")


@pytest.mark.slow
def test_supernode_killed_mid_run_never_hangs(tmp_path, data_dir, tag):
    started: dict[str, int] = {}
    killed_at: list[float] = []
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        # silos registered, initial evaluation done: round 1 is being sent now
        if "[round   0]" in line and not killed_at:
            os.killpg(started["supernode-1"], signal.SIGKILL)
            killed_at.append(time.monotonic())

    cfg = {
        **SMALL,
        "train-subset": 1000,
        "test-subset": 200,
        "min-train-nodes": 1,  # the run may go on with the silo that is left
        "round-timeout": 30.0,
        "out-dir": str(tmp_path / "runs"),
    }
    t0 = time.monotonic()
    try:
        outcome = deploy.deploy_local(
            cfg,
            silos=2,
            superlink_port=0,
            base_supernode_port=0,
            timeout=240,
            data_dir=data_dir,
            flwr_home=tmp_path / "flwr-home",
            log=on_line,
            on_started=started.update,
        )
    except UserError as exc:  # a clear, one-line message is an acceptable end too
        outcome = exc
    elapsed = time.monotonic() - t0
    tail = "\n".join(lines[-40:])
    assert killed_at, "the run never reached round 1:\n" + tail
    assert elapsed < 240, tail
    if isinstance(outcome, UserError):
        assert "\n" not in str(outcome)
        pids = list(started.values())
    else:
        assert any("supernode-1" in line and "exited" in line for line in lines), tail
        summary = outcome["summary"]
        assert summary is not None or outcome["errors"], tail
        if summary is not None:
            assert summary["stop_reason"] == "completed" or summary["stop_reason"].startswith("clients:")
            rows = json.loads((Path(outcome["run_dir"]) / "metrics.json").read_text())
            assert rows[1]["failed_clients"] >= 1 and rows[1]["valid_updates"] <= 1, rows
        pids = [*outcome["pids"].values(), *outcome["descendant_pids"]]
    _assert_all_gone(pids, tag)
    print(f"deploy-local with a killed SuperNode: {elapsed:.0f}s (kill after {killed_at[0] - t0:.0f}s)")


@pytest.mark.slow
def test_ctrl_c_stops_every_process(tmp_path, data_dir, tag):
    env = {**os.environ, "ADADPIGU_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "simulations.cli", "deploy-local", "--silos", "2"]
    cmd += ["--superlink-port", "0", "--supernode-port", "0", "--timeout", "120"]
    # long enough to be running when Ctrl-C arrives
    cmd += [
        "--run-config",
        f"num-server-rounds=50 importance-rounds=1 train-subset=1000 out-dir='{tmp_path / 'runs'}'",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_default,
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            m = re.search(r"\[deploy\] started (.*) in ", line)
            if m:
                pids = [int(p) for p in re.findall(r"pid (\d+)", m.group(1))]
                break
            assert time.monotonic() < deadline, "no start-up line"
        assert len(pids) == 3, "no start-up line"
        time.sleep(2.0)  # flwr run is being submitted
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # each component runs in its own process group: stop them all
            for pgid in [proc.pid, *pids]:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out
    _assert_all_gone(pids, tag)
