"""A short centralized MNIST run learns, stays within budget and writes its run folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

from common.config import TrainConfig
from common.errors import BudgetError
from common.trainer import make_plan, train_centralized


@pytest.mark.parametrize("method", ["adadpigu", "dpsgd", "nonprivate"])
def test_short_mnist_run_learns(method, data_dir, tmp_path):
    cfg = TrainConfig(
        method=method,
        dataset="mnist",
        epsilon=8.0,
        train_subset=4000,
        test_subset=1000,
        epochs=3,
        batch_size=128,
        data_dir=data_dir,
        out_dir=str(tmp_path),
        seed=0,
    )
    summary = train_centralized(cfg, log=lambda s: None)
    assert summary["best_val_accuracy"] > 0.6  # chance is 0.1
    run = summary["run_dir"]
    for name in (
        "config.json",
        "plan.json",
        "metrics.json",
        "metrics.csv",
        "best_model.pt",
        "final_model.pt",
        "summary.json",
        "command.txt",
    ):
        assert os.path.exists(os.path.join(run, name)), name
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert len(metrics) == 3
    if method != "nonprivate":
        assert summary["epsilon"] <= 8.0
        assert summary["epsilon"] >= 0.98 * 8.0
        assert all(m1["epsilon"] < m2["epsilon"] for m1, m2 in zip(metrics, metrics[1:]))
    if method == "adadpigu":
        ratios = [m["active_ratio"] for m in metrics]
        assert ratios[0] < 1.0 and ratios[-1] == pytest.approx(1.0)


def test_without_validation_data_the_last_model_is_the_result(data_dir, tmp_path):
    """validation-fraction 0 trains on every training example; with nothing to select on, the
    result is the plan's last model (not the untrained initial one), and the summary says so."""
    cfg = TrainConfig(
        method="dpsgd", dataset="mnist", epsilon=8.0, train_subset=4000, test_subset=1000, epochs=3,
        batch_size=128, validation_fraction=0.0, data_dir=data_dir, out_dir=str(tmp_path), seed=0,
    )  # fmt: skip
    summary = train_centralized(cfg, log=lambda s: None)
    assert json.load(open(os.path.join(summary["run_dir"], "plan.json")))["n_train"] == 4000
    assert summary["best_epoch"] == 3 and summary["best_val_accuracy"] is None
    assert "last epoch" in summary["model_selection"]
    assert summary["test_accuracy_best_val"] == pytest.approx(summary["test_accuracy_final"])
    assert summary["test_accuracy_final"] > 0.5  # trained, not the initial model (chance 0.1)
    best, final = (
        torch.load(os.path.join(summary["run_dir"], f), weights_only=True)
        for f in ("best_model.pt", "final_model.pt")
    )
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_explicit_sigma_over_budget_is_refused():
    cfg = TrainConfig(method="dpsgd", epsilon=1.0, noise_multiplier=0.5, epochs=10, batch_size=100)
    with pytest.raises(BudgetError, match="spends epsilon"):
        make_plan(cfg, 1000)


def test_plan_calibrates_within_target():
    cfg = TrainConfig(method="adadpigu", epsilon=3.0, epochs=5, batch_size=100, pretrain_noise_multiplier=2.0)
    plan = make_plan(cfg, 5000)
    assert plan.pretrain_steps == round(0.1 * plan.total_steps)
    assert plan.pretrain_noise_multiplier == 2.0
    assert 0.98 * 3.0 <= plan.planned_epsilon <= 3.0


@pytest.mark.parametrize(
    ("dataset", "subset", "min_acc"), [("fashionmnist", 3000, 0.45), ("cifar10", 600, 0.0)]
)
def test_other_datasets_run_end_to_end(dataset, subset, min_acc, data_dir, tmp_path):
    cfg = TrainConfig(
        method="adadpigu",
        dataset=dataset,
        epsilon=8.0,
        train_subset=subset,
        test_subset=300,
        epochs=2,
        batch_size=64,
        data_dir=data_dir,
        out_dir=str(tmp_path),
        seed=0,
    )
    summary = train_centralized(cfg, log=lambda s: None)
    assert summary["model"] == ("cifar-cnn" if dataset == "cifar10" else "mnist-cnn")
    assert summary["epsilon"] <= 8.0
    assert summary["best_val_accuracy"] >= min_acc
    assert os.path.exists(os.path.join(summary["run_dir"], "best_model.pt"))


def test_dynamic_mask_is_rescored_every_m_epochs_at_no_privacy_cost(data_dir, tmp_path, monkeypatch):
    """mask-refresh 1 rebuilds the static-ratio mask every adaptive epoch from the weights'
    movement; the plan (sigma, steps) and the epsilon spent are the static run's."""
    from common.engine import DPEngine

    seen: list[torch.Tensor] = []
    original = DPEngine.set_mask

    def recording(self, mask):
        if mask is not None:
            seen.append(mask.clone().cpu())
        return original(self, mask)

    monkeypatch.setattr(DPEngine, "set_mask", recording)
    runs = {}
    for refresh in (0, 1):
        seen.clear()
        cfg = TrainConfig(
            method="adadpigu-static", r0=0.5, mask_refresh=refresh, dataset="mnist", epsilon=8.0,
            train_subset=2000, test_subset=500, epochs=4, batch_size=128, pretrain_fraction=0.25,
            data_dir=data_dir, out_dir=str(tmp_path / str(refresh)), seed=0,
        )  # fmt: skip
        runs[refresh] = (train_centralized(cfg, log=lambda s: None), list(seen))
    (static, static_masks), (dynamic, dynamic_masks) = runs[0], runs[1]
    assert len(static_masks) == 1  # built once from the importance phase
    assert len(dynamic_masks) == 3  # built after pre-training, re-scored at adaptive epochs 2 and 3
    k = int(dynamic_masks[0].sum())
    assert all(int(m.sum()) == k for m in dynamic_masks)
    assert any(not torch.equal(m, dynamic_masks[0]) for m in dynamic_masks[1:]), "the mask never changed"
    for key in ("noise_multiplier", "epsilon", "steps"):
        assert dynamic[key] == static[key], key


def test_mask_refresh_needs_a_masked_method():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="mask-refresh"):
        TrainConfig(method="dpsgd", mask_refresh=2)
