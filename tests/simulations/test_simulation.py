"""A Ray simulation of 3 clients on an MNIST subset: learns, stays within budget, sends sparse updates."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_ray_simulation_three_clients(tmp_path, data_dir):
    cmd = [
        sys.executable, "-m", "simulations.cli", "simulate",
        "--num-supernodes", "3", "--num-cpus", "1",
        "--num-server-rounds", "4", "--importance-rounds", "1",
        "--min-available-nodes", "3", "--min-train-nodes", "3",
        "--method", "adadpigu", "--epsilon", "8", "--r0", "0.6", "--batch-size", "32",
        "--train-subset", "3000", "--test-subset", "1000",
        "--seed", "0", "--data-dir", data_dir, "--out-dir", str(tmp_path), "--json",
    ]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 4 and summary["stop_reason"] == "completed"
    assert summary["num_silos"] == 3
    assert summary["test_accuracy_final"] > summary["initial_test_accuracy"] + 0.2
    assert 0 < summary["max_epsilon"] <= 8.0
    run = summary["run_dir"]
    for name in (
        "metrics.json",
        "metrics.csv",
        "ledger.json",
        "final_model.pt",
        "best_model.pt",
        "command.txt",
    ):
        assert os.path.exists(os.path.join(run, name)), name
    rows = list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert len(train_rows) == 3
    for r in train_rows:
        ratio = float(r["bytes_up_per_client"]) / float(r["dense_bytes"])
        assert ratio == pytest.approx(float(r["active_ratio"]), abs=0.02)
        assert int(r["rejected_updates"]) == 0
    assert float(train_rows[0]["active_ratio"]) == pytest.approx(0.6, abs=0.01)
    ledger = json.load(open(os.path.join(run, "ledger.json")))
    assert set(ledger["clients"]) == {"silo-0", "silo-1", "silo-2"}
    assert all(len(c["rounds"]) == 4 for c in ledger["clients"].values())
    # issue 28.7: no validation is released (the default): "-" on the console, empty cells in the CSV
    out = proc.stdout + proc.stderr
    assert "[round   4]" in out and "val acc -" in out and "nan" not in out.lower()
    assert all(r["val_accuracy"] == "" for r in rows) and all(r["test_accuracy"] != "" for r in rows)
