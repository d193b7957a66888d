"""What a silo says about its size (silo-sizes): declared, public sizes checked against its
data by default; exact counts only as a flagged opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.config import TrainConfig
from common.errors import DataError
from common.federated import check_declared_size, declared_sizes
from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs


def test_declared_sizes_default_to_the_iid_share_of_the_public_dataset():
    cfg = TrainConfig(dataset="mnist", validation_fraction=0.1)
    assert declared_sizes(cfg, 10) == (5400, 600, 0)
    assert declared_sizes(cfg.replace(train_subset=1800), 3) == (540, 60, 0)
    assert declared_sizes(cfg.replace(declared_silo_size=1000), 10) == (900, 100, 0)
    assert declared_sizes(cfg, 10, node_declared=2000) == (1800, 200, 0)  # a node's own declaration wins
    assert declared_sizes(cfg.replace(test_fraction=0.2), 10, node_declared=2000) == (1440, 160, 400)


def test_a_silo_far_from_its_declaration_refuses_without_naming_its_count():
    cfg = TrainConfig(silo_size_tolerance=0.25)
    check_declared_size(cfg, 1200, 1000)  # within 25%
    with pytest.raises(DataError) as err:
        check_declared_size(cfg, 1300, 1000)
    assert "1300" not in str(err.value) and "silo-sizes" in str(err.value)


@pytest.mark.slow
def test_the_server_sees_declared_sizes_and_exact_ones_only_when_opted_out(tmp_path, data_dir):
    cfg, fed = small_run_configs(tmp_path, data_dir, epsilon=8.0, rounds=2, train_subset=1800, seed=0)
    grid = InProcessGrid(3)
    for i, ctx in enumerate(grid.contexts.values()):
        ctx.node_config["declared-size"] = 550 + 10 * i  # each silo holds 600 records
    summary = run_federated(grid, cfg.replace(method="dpsgd"), fed, log_fn=lambda s: None)
    plan = json.load(open(os.path.join(summary["run_dir"], "plan.json")))
    assert {s["n_train"] for s in plan.values()} == {495, 504, 513}  # 550/560/570 minus 10% validation
    assert summary["silo_sizes"] == "declared"

    exact = run_federated(
        InProcessGrid(3), cfg.replace(method="dpsgd", silo_sizes="exact", out_dir=str(tmp_path / "x")), fed,
        log_fn=lambda s: None,
    )  # fmt: skip
    plan = json.load(open(os.path.join(exact["run_dir"], "plan.json")))
    assert {s["n_train"] for s in plan.values()} == {540} and exact["silo_sizes"] == "exact"


@pytest.mark.slow
def test_label_skewed_silos_must_declare_or_opt_out_before_anything_starts(tmp_path, data_dir):
    cmd = [
        sys.executable, "-m", "simulations.cli", "simulate", "--num-supernodes", "5",
        "--partitioner", "dirichlet", "--alpha", "0.3", "--num-server-rounds", "3",
        "--train-subset", "2000", "--data-dir", data_dir, "--out-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "declared size" in last and "silo-sizes" in last
    assert not os.listdir(tmp_path)  # refused before any run folder
