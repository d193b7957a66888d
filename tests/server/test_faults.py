"""Client faults in a real (in-process) federated run: the run goes on, the ledger still charges."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import MessageType

from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs

pytestmark = pytest.mark.slow


def configs(tmp_path, data_dir, min_train=2):
    return small_run_configs(
        tmp_path, data_dir, epsilon=8.0, rounds=3, train_subset=1500, seed=1, min_train=min_train
    )


def test_faulty_clients_are_left_out_and_still_charged(tmp_path, data_dir):
    def fail(node_index, kind, rnd):
        if kind == MessageType.TRAIN and node_index == 0 and rnd == 2:
            return "raise"  # the client crashes after being sent the round
        if kind == MessageType.TRAIN and node_index == 1 and rnd == 3:
            return "drop"  # the client disconnects: no reply at all
        return None

    cfg, fed = configs(tmp_path, data_dir)
    summary = run_federated(InProcessGrid(3, fail=fail), cfg, fed, log_fn=lambda s: None)
    assert summary["rounds_completed"] == 3 and summary["stop_reason"] == "completed"
    rows = json.load(open(os.path.join(summary["run_dir"], "metrics.json")))
    assert [r.get("failed_clients") for r in rows[1:]] == [0, 1, 1]
    assert [r.get("valid_updates") for r in rows[1:]] == [3, 2, 2]
    ledger = json.load(open(os.path.join(summary["run_dir"], "ledger.json")))
    # every client is charged for all three rounds it was sent, the failed ones included
    for client in ("silo-0", "silo-1", "silo-2"):
        assert [h["round"] for h in ledger["clients"][client]["rounds"]] == [1, 2, 3]
    assert summary["max_epsilon"] <= 8.0
    counts = json.load(open(os.path.join(summary["run_dir"], "label-distribution.json")))["counts"]
    assert len(counts) == 3 and sum(map(sum, counts)) == 1500  # 3 silos, the whole train subset
    from simulations.plots import plot_run_label_distribution

    png = open(plot_run_label_distribution(summary["run_dir"]), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_replies_end_the_run_with_a_clear_reason(tmp_path, data_dir):
    def fail(node_index, kind, rnd):
        return "raise" if kind == MessageType.TRAIN and rnd == 2 and node_index > 0 else None

    cfg, fed = configs(tmp_path, data_dir, min_train=2)
    summary = run_federated(InProcessGrid(3, fail=fail), cfg, fed, log_fn=lambda s: None)
    assert summary["rounds_completed"] == 2
    assert "fewer than min-train-nodes" in summary["stop_reason"]
