"""The server's privacy ledger against direct dp-accounting computations."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld

from common.accounting import Phase
from common.config import FederatedConfig, TrainConfig
from common.errors import BudgetError
from common.federated import ClientPlan
from server.ledger import PrivacyLedger


def test_ledger_composition_equals_direct_dp_accounting():
    ledger = PrivacyLedger(delta=1e-5, accountant="pld", target_epsilon=None)
    rounds = [Phase(1.2, 0.05, 20), Phase(1.2, 0.05, 20), Phase(0.9, 0.05, 20)]
    for r, ph in enumerate(rounds, start=1):
        ledger.record("silo-0", r, ph)
    ledger.record("silo-1", 1, rounds[0])  # took part in one round only
    acc = pld.PLDAccountant()
    acc.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.2)), 40
                ),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.9)), 20
                ),
            ]
        )
    )
    assert ledger.epsilon("silo-0") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon("silo-1") < ledger.epsilon("silo-0")
    s = ledger.summary()
    assert s["max_epsilon"] == ledger.epsilon("silo-0")
    assert s["mean_epsilon"] == pytest.approx((ledger.epsilon("silo-0") + ledger.epsilon("silo-1")) / 2)
    assert [h["round"] for h in ledger.history["silo-0"]] == [1, 2, 3]
    restored = PrivacyLedger.from_dict(ledger.to_dict())
    assert restored.epsilon("silo-0") == ledger.epsilon("silo-0")


def test_budget_check_stops_a_round_that_would_overspend():
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp", target_epsilon=1.0)
    ph = Phase(1.0, 0.1, 50)
    ok = ledger.check_round({"silo-0": Phase(5.0, 0.1, 10)})
    assert ok["silo-0"] < 1.0
    ledger.record("silo-0", 1, Phase(5.0, 0.1, 10))
    with pytest.raises(BudgetError, match=r"silo-0.*stopping before it"):
        ledger.check_round({"silo-0": ph, "silo-1": Phase(50.0, 0.1, 1)})
    assert len(ledger.history["silo-0"]) == 1  # the refused round was not recorded


def test_calibration_keeps_every_round_participant_within_target():
    cfg = TrainConfig(method="dpsgd", epsilon=3.0, batch_size=32, accountant="pld")
    fed = FederatedConfig(num_server_rounds=8, local_epochs=1.0)
    from common.accounting import calibrate_noise

    plan = ClientPlan.for_silo(cfg, fed, n_train=640)
    sigma = calibrate_noise(3.0, cfg.delta, plan.sample_rate, plan.local_steps * fed.num_server_rounds)
    ledger = PrivacyLedger(delta=cfg.delta, accountant="pld", target_epsilon=3.0)
    for r in range(1, fed.num_server_rounds + 1):
        ledger.check_round({"silo-0": plan.round_phase(sigma)})
        ledger.record("silo-0", r, plan.round_phase(sigma))
    assert 0.98 * 3.0 <= ledger.epsilon("silo-0") <= 3.0
    with pytest.raises(BudgetError):
        ledger.check_round({"silo-0": plan.round_phase(sigma)})


def test_a_non_private_run_never_writes_a_finite_epsilon(tmp_path, data_dir):
    """ledger.json, metrics.json and summary.json agree: no guarantee, epsilon infinite."""
    import json
    import math
    import os

    from server.runner import run_federated
    from tests.inprocess import InProcessGrid, small_run_configs

    cfg, fed = small_run_configs(tmp_path, data_dir, epsilon=8.0, rounds=2, train_subset=900, seed=0)
    summary = run_federated(InProcessGrid(3), cfg.replace(method="nonprivate"), fed, log_fn=lambda s: None)
    run = summary["run_dir"]
    ledger = json.load(open(os.path.join(run, "ledger.json")))
    rows = json.load(open(os.path.join(run, "metrics.json")))
    assert (
        ledger["private"] is False
        and math.isinf(ledger["max_epsilon"])
        and math.isinf(ledger["mean_epsilon"])
    )
    assert all(math.isinf(r["max_epsilon"]) for r in rows)
    assert math.isinf(json.load(open(os.path.join(run, "summary.json")))["max_epsilon"])


def test_write_ahead_copy_holds_the_spend_and_epsilons_are_derived_later():
    """The copy written before clients train has every phase but no epsilon yet; a ledger
    restored from it (a crash mid-round) derives the same per-round epsilons as one that
    never stopped, and the prefetch (run while clients train) fills them in advance."""
    rounds = [Phase(1.2, 0.05, 20), Phase(1.2, 0.05, 20), Phase(0.9, 0.05, 20)]
    direct = PrivacyLedger(delta=1e-5, accountant="pld", target_epsilon=8.0)
    for r, ph in enumerate(rounds, start=1):
        direct.record("silo-0", r, ph)
    full = direct.to_dict()
    assert all(h["epsilon"] is not None for h in full["clients"]["silo-0"]["rounds"])

    ahead = PrivacyLedger(delta=1e-5, accountant="pld", target_epsilon=8.0)
    for r, ph in enumerate(rounds, start=1):
        ahead.record("silo-0", r, ph)
        wal = ahead.to_dict(pending=True)
        assert wal["pending"] and wal["max_epsilon"] is None
        assert sum(p["steps"] for p in wal["clients"]["silo-0"]["phases"]) == 20 * r  # the spend is there
        restored = PrivacyLedger.from_dict(wal)
        assert restored.to_dict()["clients"]["silo-0"]["rounds"] == full["clients"]["silo-0"]["rounds"][:r]
        ahead.prefetch({"silo-0": rounds[min(r, 2)]})
        assert all(h["epsilon"] is not None for h in ahead.history["silo-0"])
    assert ahead.to_dict() == full


def test_revoking_a_refused_rerun_keeps_the_interrupted_attempts_charge():
    """Issue 28.2: after a resume the write-ahead ledger already holds round 3 from the
    interrupted attempt; the rerun charges round 3 again; if the rerun is refused (secure
    aggregation), only the rerun's charge is withdrawn."""
    ledger = PrivacyLedger(delta=1e-5, accountant="pld", target_epsilon=None)
    for r in (1, 2, 3):
        ledger.record("silo-0", r, Phase(1.0, 0.05, 1))
    resumed = PrivacyLedger.from_dict(ledger.to_dict(pending=True))
    resumed.record("silo-0", 3, Phase(1.0, 0.05, 1))  # the rerun
    assert resumed.clients["silo-0"].steps == 4
    assert resumed.revoke(3) == ["silo-0"]
    assert resumed.clients["silo-0"].steps == 3
    assert [h["round"] for h in resumed.history["silo-0"]] == [1, 2, 3]
    assert resumed.epsilon("silo-0") == pytest.approx(ledger.epsilon("silo-0"), rel=1e-12)
    assert resumed.revoke(3) == []  # nothing of this process is left to withdraw


def test_revoke_withdraws_this_attempts_charge_only_for_the_round_named():
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp", target_epsilon=None)
    for r in (1, 2):
        ledger.record("silo-0", r, Phase(1.0, 0.05, 2))
        ledger.record("silo-1", r, Phase(1.0, 0.05, 2))
    assert sorted(ledger.revoke(2)) == ["silo-0", "silo-1"]
    assert [h["round"] for h in ledger.history["silo-1"]] == [1] and ledger.clients["silo-1"].steps == 2
