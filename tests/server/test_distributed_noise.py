"""``dp-noise = "distributed"`` end to end in process: secure aggregation of lattice shares,
the ledger's two epsilons, dropouts above and below ``secagg-survivors``."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
from flwr.app import MessageType

from common import protocol as P
from common.accounting import Phase, compute_epsilon
from common.config import FederatedConfig, TrainConfig
from common.errors import ConfigError
from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs

pytestmark = pytest.mark.slow


def configs(tmp_path, data_dir, *, method="adadpigu", rounds=4, **fed_kw):
    cfg, fed = small_run_configs(
        tmp_path,
        data_dir,
        epsilon=8.0,
        rounds=rounds,
        train_subset=1500,
        seed=3,
        min_train=2,
        dp_noise="distributed",
        local_steps=1,
        secagg_key_rounds=2,
        validation_release="none",
        **fed_kw,
    )
    return cfg.replace(method=method, lr=1.0), fed


def _ledger(summary, name="ledger.json"):
    return json.load(open(os.path.join(summary["run_dir"], name)))


def test_distributed_run_charges_the_sum_and_reports_the_own_share(tmp_path, data_dir):
    cfg, fed = configs(tmp_path, data_dir)
    grid = InProcessGrid(3)
    summary = run_federated(grid, cfg, fed, log_fn=lambda s: None)
    assert summary["stop_reason"] == "completed" and summary["rounds_completed"] == 4
    assert summary["dp_noise"] == "distributed" and summary["secagg_survivors"] == 3
    lattice = summary["lattice"]
    assert (
        lattice["modulus_bits"] == 32
        and lattice["wrap_headroom"] < 1
        and lattice["rounding_inflation"] < 1e-3
    )
    ledger, own = _ledger(summary), _ledger(summary, "ledger-own-share.json")
    sigma = lattice["noise_multiplier"]
    for silo in ("silo-0", "silo-1", "silo-2"):
        rounds = ledger["clients"][silo]["rounds"]
        assert [h["round"] for h in rounds] == [1, 2, 3, 4]
        assert all(h["steps"] == 1 and h["noise_multiplier"] == pytest.approx(sigma) for h in rounds)
        assert all(
            h["noise_multiplier"] == pytest.approx(sigma / math.sqrt(3), rel=1e-9)
            for h in own["clients"][silo]["rounds"]
        )
    q = ledger["clients"]["silo-0"]["rounds"][0]["sample_rate"]
    direct = compute_epsilon(phases=[Phase(sigma, q, 4)], delta=cfg.delta, accountant=cfg.accountant)
    assert summary["max_epsilon"] == pytest.approx(direct, rel=1e-6) and summary["max_epsilon"] <= 8.0
    # a silo's own share alone (everyone else colluding) is worth far more epsilon
    assert summary["max_epsilon_own_share"] > 2 * summary["max_epsilon"]
    rows = json.load(open(os.path.join(summary["run_dir"], "metrics.json")))
    assert all(0 < r["secagg_headroom"] < 0.5 for r in rows[1:])
    assert rows[-1]["mask_version"] >= 1  # adadpigu: the mask came from the aggregated importance round
    # the masked vectors are uint32 on the active coordinates: 4 bytes each, as float32 updates
    assert rows[-1]["bytes_up_per_client"] < 4 * rows[-1]["active_ratio"] * rows[-1]["dense_bytes"] / 4 + 2048


def test_a_dropout_above_the_survivor_threshold_is_aggregated(tmp_path, data_dir):
    def fail(node_index, kind, rnd):
        return "drop" if kind == MessageType.TRAIN and node_index == 0 and rnd == 2 else None

    cfg, fed = configs(tmp_path, data_dir, method="dpsgd", rounds=3, secagg_survivors=2)
    summary = run_federated(InProcessGrid(3, fail=fail), cfg, fed, log_fn=lambda s: None)
    assert summary["stop_reason"] == "completed"
    rows = json.load(open(os.path.join(summary["run_dir"], "metrics.json")))
    assert [r["valid_updates"] for r in rows[1:]] == [3, 2, 3]
    ledger = _ledger(summary)
    assert [h["round"] for h in ledger["clients"]["silo-0"]["rounds"]] == [1, 2, 3]  # sent: charged
    assert summary["max_epsilon"] <= 8.0


def test_too_few_survivors_stop_the_run_and_the_round_is_not_charged(tmp_path, data_dir):
    def fail(node_index, kind, rnd):
        return "drop" if kind == MessageType.TRAIN and node_index == 1 and rnd == 2 else None

    cfg, fed = configs(tmp_path, data_dir, method="dpsgd", rounds=3)  # t = every silo
    summary = run_federated(InProcessGrid(3, fail=fail), cfg, fed, log_fn=lambda s: None)
    assert summary["rounds_completed"] == 1
    assert (
        summary["stop_reason"].startswith("secure aggregation:") and "2 of 3 silos" in summary["stop_reason"]
    )
    for name in ("ledger.json", "ledger-own-share.json"):
        ledger = _ledger(summary, name)
        for silo in ("silo-0", "silo-1", "silo-2"):
            assert [h["round"] for h in ledger["clients"][silo]["rounds"]] == [1]


@pytest.mark.parametrize(
    "fed_kw, train_kw, key",
    [
        ({"local_steps": 0}, {}, "local-steps"),
        ({"local_steps": 1, "fraction_train": 0.5}, {}, "fraction-train"),
        ({"local_steps": 1}, {"optimizer": "adam"}, "optimizer"),
        ({"local_steps": 1, "server_optimizer": "fedadam"}, {}, "server-optimizer"),
        ({"local_steps": 1}, {"method": "nonprivate"}, "dp-noise"),
    ],
)
def test_settings_that_break_distributed_noise_are_refused_by_name(fed_kw, train_kw, key):
    fed = FederatedConfig(dp_noise="distributed", **fed_kw)
    with pytest.raises(ConfigError, match=key):
        fed.check_distributed(TrainConfig(**train_kw))


class CrashAfterTwoRounds(InProcessGrid):
    """Dies when the server asks for nodes for round 3 (round 2 unmasked and checkpointed)."""

    unmasked = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.content[P.CONFIG].get(P.SECAGG_STAGE) == P.STAGE_UNMASK for m in messages):
            self.unmasked += 1
        return super().send_and_receive(messages, timeout=timeout)

    def get_node_ids(self):
        if self.unmasked == 2:
            raise RuntimeError("server process died")
        return super().get_node_ids()


def test_a_resumed_distributed_run_charges_what_an_uninterrupted_one_does(tmp_path, data_dir):
    cfg, fed = configs(tmp_path / "a", data_dir, method="dpsgd", rounds=3)
    full = run_federated(
        InProcessGrid(3), cfg, fed, log_fn=lambda s: None, run_dir=str(tmp_path / "a" / "run")
    )
    cfg_b, fed_b = configs(tmp_path / "b", data_dir, method="dpsgd", rounds=3)
    run_b = str(tmp_path / "b" / "run")
    with pytest.raises(RuntimeError, match="died"):
        run_federated(CrashAfterTwoRounds(3), cfg_b, fed_b, log_fn=lambda s: None, run_dir=run_b)
    resumed = run_federated(
        InProcessGrid(3), cfg_b, dataclasses.replace(fed_b, resume=run_b), log_fn=lambda s: None
    )
    assert resumed["rounds_completed"] == 3 and resumed["stop_reason"] == "completed"
    for name in ("ledger.json", "ledger-own-share.json"):
        a = _ledger(full, name)["clients"]
        b = json.load(open(os.path.join(run_b, name)))["clients"]
        assert {c: v["phases"] for c, v in a.items()} == {c: v["phases"] for c, v in b.items()}
    assert resumed["max_epsilon_own_share"] == pytest.approx(full["max_epsilon_own_share"])


def test_more_survivors_than_registered_silos_is_refused_before_round_one(tmp_path, data_dir):
    """secagg-survivors above the silos that registered: no round could ever be aggregated;
    refused at set-up, before the noise is calibrated or a round is sent (nothing charged)."""
    from common.errors import ConfigError

    cfg, fed = configs(tmp_path, data_dir, secagg_survivors=5)
    grid = InProcessGrid(3)
    with pytest.raises(ConfigError, match="secagg-survivors.*exceeds the 3 silos"):
        run_federated(grid, cfg.replace(method="dpsgd"), fed, log_fn=lambda s: None)
    assert grid.train_rounds_sent == 0


class CrashMidRoundThree(InProcessGrid):
    """Dies while round 3's training messages are out (after the write-ahead ledgers)."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(
            m.metadata.message_type == MessageType.TRAIN and m.content[P.CONFIG].get(P.SERVER_ROUND) == 3
            for m in messages
        ):
            raise RuntimeError("server process died mid-round")
        return super().send_and_receive(messages, timeout=timeout)


def test_a_refused_rerun_after_a_resume_keeps_the_interrupted_attempts_charge(tmp_path, data_dir):
    """Issue 28.2 through a crash and a resume: round 3 was sent (charged, write-ahead) when the
    server died; its rerun after the resume is refused by secure aggregation (a silo drops);
    the rerun's charge is withdrawn, the interrupted attempt's stays, on both ledgers."""

    def drop_round_3(node_index, kind, rnd):
        return "drop" if kind == MessageType.TRAIN and node_index == 1 and rnd == 3 else None

    cfg, fed = configs(tmp_path, data_dir, method="dpsgd", rounds=4, reserve_rounds=1)
    run = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="died"):
        run_federated(CrashMidRoundThree(3), cfg, fed, log_fn=lambda s: None, run_dir=run)
    written = {
        n: json.load(open(os.path.join(run, n)))["clients"] for n in ("ledger.json", "ledger-own-share.json")
    }
    assert {n: [h["round"] for h in v["silo-0"]["rounds"]] for n, v in written.items()} == dict.fromkeys(
        written, [1, 2, 3]
    )
    resumed = run_federated(
        InProcessGrid(3, fail=drop_round_3), cfg, dataclasses.replace(fed, resume=run), log_fn=lambda s: None
    )
    assert resumed["stop_reason"].startswith("secure aggregation:") and resumed["rounds_completed"] == 2
    for name in ("ledger.json", "ledger-own-share.json"):
        ledger = json.load(open(os.path.join(run, name)))["clients"]
        for silo in ("silo-0", "silo-1", "silo-2"):
            assert [h["round"] for h in ledger[silo]["rounds"]] == [1, 2, 3], (name, silo)
            assert sum(p["steps"] for p in ledger[silo]["phases"]) == 3
    sigma = resumed["lattice"]["noise_multiplier"]
    q = json.load(open(os.path.join(run, "ledger.json")))["clients"]["silo-0"]["rounds"][0]["sample_rate"]
    direct = compute_epsilon(phases=[Phase(sigma, q, 3)], delta=cfg.delta, accountant=cfg.accountant)
    assert resumed["max_epsilon"] == pytest.approx(direct, rel=1e-6)
