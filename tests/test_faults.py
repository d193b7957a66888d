"""Client faults in a real (in-process) federated run: the run goes on, the ledger still charges."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import MessageType

from common.config import FederatedConfig, TrainConfig
from server.runner import run_federated
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.slow


def configs(tmp_path, data_dir, min_train=2):
    cfg = TrainConfig(
        method="adadpigu",
        epsilon=8.0,
        batch_size=32,
        train_subset=1500,
        test_subset=300,
        seed=1,
        data_dir=data_dir,
        out_dir=str(tmp_path),
    )
    fed = FederatedConfig(
        num_server_rounds=3,
        importance_rounds=1,
        local_epochs=0.5,
        min_available_nodes=3,
        min_train_nodes=min_train,
        startup_timeout=30,
    )
    return cfg, fed


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
    png = open(os.path.join(summary["run_dir"], "label-distribution.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_replies_end_the_run_with_a_clear_reason(tmp_path, data_dir):
    def fail(node_index, kind, rnd):
        return "raise" if kind == MessageType.TRAIN and rnd == 2 and node_index > 0 else None

    cfg, fed = configs(tmp_path, data_dir, min_train=2)
    summary = run_federated(InProcessGrid(3, fail=fail), cfg, fed, log_fn=lambda s: None)
    assert summary["rounds_completed"] == 2
    assert "fewer than min-train-nodes" in summary["stop_reason"]
