"""The sweep runner on a tiny grid: every cell runs once, resumes, tables list every cell."""

from __future__ import annotations

import csv
import os

import pytest

from common.errors import ConfigError
from simulations.sweep import cell_dir, load_sweep, run_sweep


def write_sweep(tmp_path, data_dir, grid='method = ["dpsgd", "nonprivate"]\nseed = [0, 1]\n'):
    path = tmp_path / "tiny.toml"
    path.write_text(
        f"""
[sweep]
name = "tiny"
mode = "central"
out-dir = "{tmp_path / "out"}"
[base]
dataset = "mnist"
data-dir = "{data_dir}"
train-subset = 400
test-subset = 200
epochs = 1
batch-size = 64
epsilon = 8.0
[grid]
{grid}"""
    )
    return str(path)


def test_tiny_sweep_runs_resumes_and_tabulates(tmp_path, data_dir):
    sweep = load_sweep(write_sweep(tmp_path, data_dir))
    assert len(sweep.cells()) == 4
    logs: list[str] = []
    rows = run_sweep(sweep, log=logs.append)
    assert len(rows) == 4
    assert sum("running" in line for line in logs) == 4
    # a second call reruns nothing
    logs.clear()
    rows = run_sweep(sweep, log=logs.append)
    assert sum("done already" in line for line in logs) == 4 and not any("running" in s for s in logs)
    # one finished cell removed -> only that one reruns
    os.remove(os.path.join(cell_dir(sweep, {"method": "dpsgd", "seed": 1}), "summary.json"))
    logs.clear()
    run_sweep(sweep, log=logs.append)
    assert sum("running" in line for line in logs) == 1
    table_rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {(r["method"], r["seed"]) for r in table_rows} == {
        ("dpsgd", "0"),
        ("dpsgd", "1"),
        ("nonprivate", "0"),
        ("nonprivate", "1"),
    }
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| dpsgd | 2 |" in md and "| nonprivate | 2 |" in md


def test_bad_sweep_cell_is_refused_before_running(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="method"):
        load_sweep(write_sweep(tmp_path, data_dir, grid='method = ["dpsgd", "bogus"]\n'))


def test_shipped_sweep_files_are_valid():
    import glob

    files = glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "simulations", "sweeps", "*.toml"))
    assert len(files) >= 5
    for path in files:
        sweep = load_sweep(path)  # validates every cell's settings
        assert sweep.cells(), path


def test_cells_claimed_by_a_live_process_are_left_to_it_and_stale_claims_taken_over(tmp_path, data_dir):
    """Several `adadpigu sweep` processes can share a grid: a cell another live process is
    running is skipped; the claim of a process that died is taken over; claims are released."""
    import subprocess
    import sys

    sweep = load_sweep(write_sweep(tmp_path, data_dir, grid='method = ["dpsgd", "nonprivate"]\nseed = [0]\n'))
    busy, stale = (cell_dir(sweep, c) for c in sweep.cells())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for folder, pid in ((busy, other.pid), (stale, dead.pid)):
            os.makedirs(folder)
            with open(os.path.join(folder, ".running"), "w") as fh:
                fh.write(str(pid))
        logs: list[str] = []
        rows = run_sweep(sweep, log=logs.append)
    finally:
        other.kill()
        other.wait()
    assert sum("another process" in line for line in logs) == 1
    assert sum("running {" in line for line in logs) == 1
    assert len(rows) == 1 and os.path.exists(os.path.join(stale, "summary.json"))
    assert not os.path.exists(os.path.join(stale, ".running"))
    assert not os.path.exists(os.path.join(busy, "summary.json"))


def test_paired_difference_and_its_95_interval():
    from simulations.sweep import paired_difference

    def row(method, seed, acc, lr=0.5):
        return {"method": method, "seed": seed, "lr": lr, "test_accuracy_best_val": acc, "seconds": 1.0}

    rows = [row("adadpigu", s, a) for s, a in enumerate([0.97, 0.98, 0.975])]
    rows += [row("dpsgd", s, a) for s, a in enumerate([0.96, 0.975, 0.97])]
    rows += [row("dpsgd", 9, 0.5), row("adadpigu", 0, 0.1, lr=1.0)]  # unpaired: left out
    res = paired_difference(rows, by="method", a="adadpigu", b="dpsgd")
    assert res["pairs"] == 3
    diffs = [0.01, 0.005, 0.005]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    assert res["mean"] == pytest.approx(mean)
    assert res["ci95"] == pytest.approx((mean - 4.303 * sd / 3**0.5, mean + 4.303 * sd / 3**0.5))


def test_paired_difference_with_selectors_across_runs_made_before_a_setting_existed():
    """Sides as key=value selectors, paired on the seed only: a dynamic-mask run against a
    DP-SGD run made before mask-refresh existed (its absent setting reads as the default)."""
    from common.errors import UserError
    from simulations.sweep import paired_difference

    old = [{"method": m, "seed": s, "test_accuracy_best_val": acc} for m, s, acc in
           [("dpsgd", 0, 0.97), ("dpsgd", 1, 0.96), ("adadpigu", 0, 0.95), ("adadpigu", 1, 0.94)]]  # fmt: skip
    new = [{"method": "adadpigu", "mask-refresh": 5, "test-every": 0, "seed": s, "test_accuracy_best_val": acc}
           for s, acc in [(0, 0.98), (1, 0.965)]]  # fmt: skip
    res = paired_difference(old + new, by="method", a="method=adadpigu,mask-refresh=5", b="method=dpsgd",
                            pair_on=["seed"])  # fmt: skip
    assert res["pairs"] == 2 and res["differences"] == pytest.approx([0.01, 0.005])
    static = paired_difference(old + new, by="mask-refresh", a="5", b="0", pair_on=["seed", "method"])
    assert static["differences"] == pytest.approx([0.03, 0.025])  # old adadpigu runs are mask-refresh 0
    with pytest.raises(UserError, match="more than one run per pair"):
        paired_difference(old + new, by="method", a="adadpigu", b="dpsgd", pair_on=["seed"])


def test_an_interrupted_federated_cell_is_resumed_not_restarted(tmp_path, monkeypatch):
    """A federated cell whose folder holds a checkpoint (the sweep or Ray died mid-run) is
    continued with resume: a fresh start would charge the silos a second time."""
    import simulations.launcher as launcher
    from simulations.sweep import Sweep, _run_cell

    calls = []

    def fake_simulate(cfg, fed, **kw):
        calls.append(fed.resume)
        return {"test_accuracy_best_val": 0.9}

    monkeypatch.setattr(launcher, "simulate", fake_simulate)
    sweep = Sweep(
        name="s", mode="federated", out_dir=str(tmp_path), base={"method": "dpsgd"}, grid={"seed": [0]}
    )
    target = tmp_path / "cell"
    target.mkdir()
    _run_cell(sweep, {"seed": 0}, str(target), "[t]", lambda s: None)
    (target / "checkpoint.pt").write_bytes(b"x")
    _run_cell(sweep, {"seed": 0}, str(target), "[t]", lambda s: None)
    assert calls == ["", str(target)]


def test_a_federated_sweep_names_the_app_settings_it_leaves_at_the_dataclass_defaults(tmp_path):
    from simulations.sweep import load_sweep, unset_app_settings

    path = tmp_path / "fed.toml"
    path.write_text(
        '[sweep]\nmode = "federated"\n[base]\nbatch-size = 256\nfeatures = "scatter"\n'
        'model = "scatter-linear"\nmin-available-nodes = 2\nmin-train-nodes = 2\n'
        "[grid]\nseed = [0]\nlr = [2.0, 1.0]\n"
    )
    assert unset_app_settings(load_sweep(str(path))) == ["lr-schedule"]
    central = tmp_path / "central.toml"
    central.write_text('[sweep]\nmode = "central"\n[grid]\nseed = [0]\n')
    assert unset_app_settings(load_sweep(str(central))) == []


def test_a_federated_cell_that_stopped_early_is_not_a_result(tmp_path, monkeypatch, capsys):
    """A run that stopped before the end of its plan (budget, too few clients, secure
    aggregation) writes summary.json, but it is no result of its settings: the sweep fails
    naming the cell, does not call it 'done already' on a rerun, and the tables (report,
    compare) leave it out and say so."""
    import json

    import simulations.launcher as launcher
    from common.errors import UserError
    from simulations.commands import cmd_report
    from simulations.sweep import Sweep, collect

    def fake_simulate(cfg, fed, *, run_dir, **kw):
        seed = cfg.seed
        summary = {
            "stop_reason": "completed" if seed == 0 else "budget: round 2 would exceed epsilon",
            "test_accuracy_best_val": 0.9,
            "test_accuracy_final": 0.9,
            "best_val_accuracy": None,
        }
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump({"seed": seed, "method": "dpsgd"}, fh)
        return summary

    monkeypatch.setattr(launcher, "simulate", fake_simulate)
    sweep = Sweep(
        name="s",
        mode="federated",
        out_dir=str(tmp_path / "out"),
        base={"method": "dpsgd"},
        grid={"seed": [0, 1]},
    )
    logs: list[str] = []
    with pytest.raises(UserError, match=r"1 cell\(s\) stopped .*'seed': 1.*budget"):
        run_sweep(sweep, log=logs.append)
    stopped: list = []
    rows = collect(sweep.out_dir, stopped=stopped)
    assert [r["seed"] for r in rows] == [0]
    assert len(stopped) == 1 and "budget" in stopped[0][1]
    logs.clear()
    with pytest.raises(UserError, match="stopped"):
        run_sweep(sweep, log=logs.append)  # a rerun: not 'done already', not run again
    assert any("done already" in s and "'seed': 0" in s for s in logs)
    assert any("stopped before the end of its plan" in s and "'seed': 1" in s for s in logs)
    capsys.readouterr()

    class Args:
        dir, group, out = sweep.out_dir, "method", None

    cmd_report(Args())
    out = capsys.readouterr()
    assert "left out 1 run(s)" in out.err and "budget" in out.err
    assert "| dpsgd | 1 |" in out.out


def test_a_simulation_does_not_leak_its_data_folder_into_the_next_cell(monkeypatch, tmp_path, data_dir):
    """A sweep cell whose variant sets data-dir must not become the next cell's default
    (simulate exported ADADPIGU_DATA_DIR for its Ray workers and left it set)."""
    import flwr.simulation

    from common.config import FederatedConfig, TrainConfig
    from simulations import launcher

    monkeypatch.setenv("ADADPIGU_DATA_DIR", str(tmp_path / "shared"))
    seen = {}
    monkeypatch.setattr(
        flwr.simulation,
        "run_simulation",
        lambda **kw: seen.setdefault("env", os.environ["ADADPIGU_DATA_DIR"]),
    )
    cfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "runs"), train_subset=600, batch_size=64)
    launcher.simulate(cfg, FederatedConfig(num_server_rounds=2, importance_rounds=1), num_supernodes=2)
    assert seen["env"] == os.path.abspath(data_dir)  # the run's workers read the run's folder
    assert os.environ["ADADPIGU_DATA_DIR"] == str(tmp_path / "shared")  # ... and it is undone after
    assert TrainConfig().data_dir == str(tmp_path / "shared")
