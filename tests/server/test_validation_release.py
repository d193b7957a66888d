"""What leaves a silo for model selection (validation-release): nothing by default, noisy
counts charged in the ledger, or exact metrics as a flagged opt-out."""

from __future__ import annotations

import json
import os

import dp_accounting
import pytest
import torch
from dp_accounting import pld
from flwr.app import MessageType

from client import task
from common import protocol as P
from common.accounting import PLD_FINE_GRID
from common.errors import ConfigError
from server.runner import run_federated
from tests.inprocess import InProcessGrid, small_run_configs

pytestmark = pytest.mark.slow


class RecordingGrid(InProcessGrid):
    """Keeps every evaluation reply's metrics, as the server receives them."""

    def __init__(self, n):
        super().__init__(n)
        self.evaluation_metrics: list[dict] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == MessageType.EVALUATE for m in messages):
            for r in replies:
                if not r.has_error():
                    self.evaluation_metrics.append(dict(r.content[P.METRICS]))
        return replies


def _run(tmp_path, data_dir, release, **kw):
    cfg, fed = small_run_configs(
        tmp_path, data_dir, epsilon=4.0, rounds=4, train_subset=1800, seed=0, validation_release=release, **kw
    )
    grid = RecordingGrid(3)
    summary = run_federated(grid, cfg.replace(method="dpsgd"), fed, log_fn=lambda s: None)
    return summary, grid


def test_default_releases_nothing_and_keeps_the_last_model(tmp_path, data_dir):
    summary, grid = _run(tmp_path, data_dir, "none")
    assert grid.evaluate_rounds_sent == 0 and not grid.evaluation_metrics
    assert summary["best_round"] == 4 and summary["best_val_accuracy"] is None
    assert summary["test_accuracy_best_val"] == pytest.approx(summary["test_accuracy_final"])
    run = summary["run_dir"]
    best, final = (
        torch.load(os.path.join(run, f), weights_only=True) for f in ("best_model.pt", "final_model.pt")
    )
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert "last round" in summary["model_selection"]


def test_without_validation_data_a_validation_release_is_refused_and_none_keeps_the_last_round(
    tmp_path, data_dir
):
    """validation-fraction 0: a validation release (noisy or exact) would release noise about
    an empty set (and spend budget on it), so it is refused by name; with none the released
    model is the last round's, never the initial one."""
    for release in ("noisy", "exact"):
        cfg, fed = small_run_configs(
            tmp_path, data_dir, epsilon=4.0, rounds=3, train_subset=1800, seed=0, validation_release=release
        )
        with pytest.raises(ConfigError, match="validation-release.*validation-fraction is 0"):
            run_federated(InProcessGrid(3), cfg.replace(validation_fraction=0.0), fed, log_fn=lambda s: None)
        assert not os.listdir(tmp_path)  # refused before a run folder or a round
    cfg, fed = small_run_configs(
        tmp_path, data_dir, epsilon=4.0, rounds=3, train_subset=1800, seed=0, validation_release="none"
    )
    summary = run_federated(
        InProcessGrid(3), cfg.replace(method="dpsgd", validation_fraction=0.0), fed, log_fn=lambda s: None
    )
    assert summary["best_round"] == 3 and summary["best_val_accuracy"] is None
    assert summary["test_accuracy_best_val"] == pytest.approx(summary["test_accuracy_final"])
    best, final = (
        torch.load(os.path.join(summary["run_dir"], f), weights_only=True)
        for f in ("best_model.pt", "final_model.pt")
    )
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_noisy_validation_is_charged_calibrated_and_never_exact(tmp_path, data_dir, caplog):
    sigma_v = 30.0
    summary, grid = _run(tmp_path, data_dir, "noisy", validation_noise=sigma_v)
    # 3 silos x 60 validation examples: the released accuracy's noise std is 30 * sqrt(3) / 180
    # = 0.29, and the run says before round 1 that selection on it is mostly noise
    assert "noise std of 0.289" in caplog.text and "chosen mostly on noise" in caplog.text
    # every reply carries a noisy count only: no exact accuracy or loss left a silo
    assert grid.evaluation_metrics and all(
        set(m) == {P.NUM_EXAMPLES, P.VAL_CORRECT_NOISY} for m in grid.evaluation_metrics
    )
    # the counts are not integers: noise was added (std 30: |noise| < 1e-6 has probability ~0)
    assert all(
        abs(m[P.VAL_CORRECT_NOISY] - round(m[P.VAL_CORRECT_NOISY])) > 1e-6 for m in grid.evaluation_metrics
    )
    ledger = json.load(open(os.path.join(summary["run_dir"], "ledger.json")))
    plan = json.load(open(os.path.join(summary["run_dir"], "plan.json")))
    for name, entry in ledger["clients"].items():
        phases = {(p["noise_multiplier"], p["sample_rate"]): p["steps"] for p in entry["phases"]}
        assert phases[(sigma_v, 1.0)] == 4  # one release per round (evaluate-every auto = 1)
        sigma, q, steps = plan[name]["noise_multiplier"], plan[name]["sample_rate"], plan[name]["local_steps"]
        assert phases[(sigma, q)] == 4 * steps
        acc = pld.PLDAccountant(value_discretization_interval=PLD_FINE_GRID)
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 4 * steps
            )
        )
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma_v), 4))
        assert entry["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    # the training noise was calibrated with the validation releases in the plan
    assert 0.97 * 4.0 <= summary["max_epsilon"] <= 4.0
    assert 0.0 <= summary["best_val_accuracy"] <= 1.0 and summary["best_round"] in (1, 2, 3, 4)


def test_exact_validation_is_an_opt_out_flagged_in_the_run_folder(tmp_path, data_dir):
    summary, grid = _run(tmp_path, data_dir, "exact")
    assert all(P.VAL_ACCURACY in m for m in grid.evaluation_metrics)
    assert "OUTSIDE the DP guarantee" in summary["model_selection"]
    saved = json.load(open(os.path.join(summary["run_dir"], "summary.json")))
    assert saved["validation_release"] == "exact"


def test_a_client_refuses_an_evaluate_message_without_a_release_mode():
    with pytest.raises(ValueError, match="validation-release"):
        task.evaluate_round(None, None, None, None)  # checked before anything is read


def test_the_noisy_count_is_over_the_real_validation_examples(tmp_path, data_dir, monkeypatch):
    """Sensitivity 1 holds for the count of correct predictions on the examples the silo
    holds, not for accuracy times a declared size: with the noise switched off and an
    accuracy of one half, 60 real validation examples give 30, whatever is declared."""
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros(*a, dtype=torch.float64))
    # a model right on half of the examples it is shown: the count is over the real ones
    monkeypatch.setattr(task, "_counts", lambda model, data, bound: (len(data) / 2, 0.0))
    cfg, fed = small_run_configs(
        tmp_path, data_dir, epsilon=4.0, rounds=2, train_subset=1800, seed=0, validation_release="noisy"
    )
    grid = RecordingGrid(3)
    for ctx in grid.contexts.values():
        ctx.node_config["declared-size"] = 700  # each silo holds 600 records (60 for validation)
    run_federated(grid, cfg.replace(method="dpsgd"), fed, log_fn=lambda s: None)
    assert grid.evaluation_metrics
    assert all(m[P.VAL_CORRECT_NOISY] == 30.0 for m in grid.evaluation_metrics)
    assert all(m[P.NUM_EXAMPLES] == 70 for m in grid.evaluation_metrics)  # the declared size is reported


def test_a_run_stopped_before_round_one_reports_the_initial_model_and_no_validation(
    tmp_path, data_dir, monkeypatch
):
    """A run that stops before any round (here: the budget check refuses round 1) says so:
    no validation accuracy (not the internal -1 placeholder) and 'the initial model'."""
    from common.errors import BudgetError
    from server.strategy import AdaDPIGUStrategy

    def refuse(self, *a, **kw):
        raise BudgetError("round 1 would exceed the target")

    monkeypatch.setattr(AdaDPIGUStrategy, "configure_train", refuse)
    cfg, fed = small_run_configs(
        tmp_path, data_dir, epsilon=4.0, rounds=3, train_subset=1800, seed=0, validation_release="noisy"
    )
    summary = run_federated(InProcessGrid(3), cfg.replace(method="dpsgd"), fed, log_fn=lambda s: None)
    assert summary["stop_reason"].startswith("budget") and summary["rounds_completed"] == 0
    assert summary["best_round"] == 0 and summary["best_val_accuracy"] is None
    assert summary["model_selection"] == "the initial model (no round completed)"
