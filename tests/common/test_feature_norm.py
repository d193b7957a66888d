"""Private data normalization of ScatterNet features (common/feature_norm.py, scatter-norm =
"data"): the exact statistics against a naive reference, each example's bounded contribution,
the noise scale, the accounting of the release inside the plan and the run, the layer, and the
settings that refuse it."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from common.accounting import Phase, compute_epsilon
from common.config import TrainConfig, refuse_centralized_only, split_run_config
from common.errors import ConfigError
from common.feature_norm import (
    NORM_RELEASES,
    SCALE_FLOOR,
    ChannelStandardize,
    _clipped_sum,
    release_channel_stats,
    standardize_layer,
)
from common.models import build_model
from common.trainer import make_plan


def test_exact_statistics_match_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 5, generator=g) * torch.tensor([1.0, 0.1, 3.0])[None, :, None, None] + 2.0
    mean, scale = release_channel_stats(x, clip=1.0, noise_multiplier=0.0, n_public=50)
    for c in range(3):
        mu = sum(float(x[i, c].mean()) for i in range(50)) / 50
        rms = sum(math.sqrt(float(((x[i, c] - mu) ** 2).mean())) for i in range(50)) / 50
        assert float(mean[c]) == pytest.approx(mu, rel=1e-5)
        assert float(scale[c]) == pytest.approx(rms, rel=1e-5)


def test_one_example_moves_each_released_sum_by_at_most_the_clip():
    x = torch.randn(40, 6, 3, 3)
    outlier = torch.full((1, 6, 3, 3), 1e4)
    clip = 0.7
    # query 1 (means), nearly noiseless: n * mean is the clipped sum
    tiny = dict(clip=clip, noise_multiplier=1e-12, n_public=1, generator=torch.Generator().manual_seed(1))
    a, _ = release_channel_stats(x, **tiny)
    b, _ = release_channel_stats(torch.cat([x, outlier]), **tiny)
    assert float((a.double() - b.double()).norm()) <= clip * (1 + 1e-4)
    # every row of either query is clipped to the bound
    rows = torch.randn(100, 6) * 50
    for i in range(100):
        assert float(_clipped_sum(rows[i : i + 1], clip).norm()) <= clip * (1 + 1e-6)


def test_noise_has_standard_deviation_sigma_times_clip():
    x = torch.zeros(10, 4000, 1, 1)
    gen = torch.Generator().manual_seed(3)
    mean, _ = release_channel_stats(x, clip=0.5, noise_multiplier=2.0, n_public=1, generator=gen)
    assert float(mean.std()) == pytest.approx(1.0, rel=0.05)
    assert abs(float(mean.mean())) < 0.1


def test_scales_are_floored_and_the_layer_standardizes():
    x = torch.zeros(20, 3, 2, 2)
    mean, scale = release_channel_stats(x, clip=1.0, noise_multiplier=0.0, n_public=20)
    assert torch.all(scale == SCALE_FLOOR)
    layer = ChannelStandardize(3)
    with pytest.raises(RuntimeError, match="no statistics"):
        layer(torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="scales must be > 0"):
        layer.set_stats(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="3 channels"):
        layer.set_stats(torch.zeros(4), torch.ones(4))
    layer.set_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5]))
    out = layer(torch.ones(1, 3, 2, 2) * 5)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 0.75, 4.0]))
    assert not list(layer.parameters())  # never trained
    assert {"mean", "scale", "ready"} <= set(layer.state_dict())


def test_models_take_the_layer_in_place_of_the_group_norm():
    for name in ("scatter-linear", "scatter-cnn"):
        model = build_model(name, "mnist", scatter_norm="data")
        assert isinstance(standardize_layer(model), ChannelStandardize)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
        assert standardize_layer(build_model(name, "mnist")) is None


def test_the_plan_composes_the_release_into_the_budget():
    base = TrainConfig(method="dpsgd", features="scatter", model="scatter-linear", batch_size=512, epochs=4)
    plain = make_plan(base, 6000)
    cfg = base.replace(scatter_norm="data", scatter_norm_noise=4.0)
    plan = make_plan(cfg, 6000)
    assert plan.norm_phases() == [Phase(4.0, 1.0, NORM_RELEASES)]
    assert plan.phases()[0] == Phase(4.0, 1.0, NORM_RELEASES)
    # the release costs budget: training gets more noise, and the whole plan stays within epsilon
    assert plan.noise_multiplier > plain.noise_multiplier
    eps = compute_epsilon(phases=plan.phases(), delta=cfg.delta)
    assert eps == pytest.approx(plan.planned_epsilon) and eps <= cfg.epsilon * (1 + 1e-9)
    assert compute_epsilon(phases=plan.phases()[1:], delta=cfg.delta) < eps
    assert make_plan(cfg.replace(method="nonprivate"), 6000).norm_phases() == []


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"scatter-norm": "data"}, "needs features = 'scatter'"),
        ({"features": "scatter", "scatter-norm": "batch"}, "scatter-norm"),
        ({"features": "scatter", "scatter-norm": "data", "scatter-norm-noise": 0}, "scatter-norm-noise"),
        ({"features": "scatter", "scatter-norm": "data", "scatter-norm-clip": -1}, "scatter-norm-clip"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_mapping(settings)


def test_federated_runs_refuse_the_data_normalization():
    with pytest.raises(ConfigError, match="centralized training only"):
        split_run_config({"features": "scatter", "scatter-norm": "data"})
    with pytest.raises(ConfigError, match="scatter-norm"):
        refuse_centralized_only({"scatter-norm": "data"})
    refuse_centralized_only({"scatter-norm": "group"})
    cfg, _ = split_run_config({"features": "scatter", "scatter-norm": "group"})
    assert cfg.scatter_norm == "group"


def test_a_too_small_budget_for_the_release_is_refused_before_training():
    cfg = TrainConfig(
        method="dpsgd", features="scatter", scatter_norm="data", scatter_norm_noise=0.3, epsilon=0.5, epochs=1
    )
    with pytest.raises(Exception, match="epsilon|budget|fixed phases"):
        make_plan(cfg, 6000)


@pytest.mark.slow
def test_private_run_charges_the_release_and_saves_the_statistics(data_dir, tmp_path, monkeypatch):
    from common import scatter
    from common.trainer import train_centralized

    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path / "cache"))
    cfg = TrainConfig(
        method="dpsgd",
        features="scatter",
        model="scatter-linear",
        scatter_norm="data",
        epsilon=3.0,
        epochs=2,
        batch_size=256,
        lr=2.0,
        train_subset=2000,
        test_subset=300,
        seed=0,
        data_dir=data_dir,
        out_dir=str(tmp_path / "runs"),
    )
    lines: list[str] = []
    summary = train_centralized(cfg, log=lines.append)
    norm_line = next(line for line in lines if line.startswith("[norm]"))
    assert lines.index(norm_line) < next(i for i, line in enumerate(lines) if line.startswith("[epoch"))
    plan = make_plan(cfg, 1800)
    assert summary["epsilon"] == pytest.approx(
        compute_epsilon(phases=plan.phases(), delta=cfg.delta), rel=1e-6
    )
    assert summary["epsilon"] <= 3.0 * (1 + 1e-9)
    with open(os.path.join(summary["run_dir"], "plan.json")) as fh:
        assert json.load(fh)["norm_noise_multiplier"] == cfg.scatter_norm_noise
    state = torch.load(os.path.join(summary["run_dir"], "best_model.pt"))
    assert bool(state["0.ready"]) and torch.all(state["0.scale"] >= SCALE_FLOOR)
    model = build_model("scatter-linear", "mnist", scatter_norm="data")
    model.load_state_dict(state)
    assert model(torch.randn(2, 81, 7, 7)).shape == (2, 10)
    assert summary["test_accuracy_best_val"] > 0.5
