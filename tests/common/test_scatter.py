"""ScatterNet features (common/scatter.py): shapes, the disk cache, the settings that need or
refuse them, and a private run on them end to end (centralized and federated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import scatter
from common.config import TrainConfig
from common.data import load_dataset, take_subset, with_features
from common.errors import ConfigError, DataError
from common.models import build_model, num_parameters


def test_feature_shapes_and_parameter_free_front_end():
    assert scatter.SCATTER_CHANNELS == 81
    assert scatter.feature_shape((1, 28, 28)) == (81, 7, 7)
    assert scatter.feature_shape((3, 32, 32)) == (243, 8, 8)
    x = torch.randn(5, 1, 28, 28)
    f = scatter.scatter_features(x)
    assert f.shape == (5, 81, 7, 7) and f.dtype == torch.float32 and torch.isfinite(f).all()
    # per example: an example's features do not depend on the others in its chunk
    assert torch.allclose(scatter.scatter_features(x[2:3])[0], f[2], atol=1e-5)
    # the model behind the features: Tramer & Boneh's CNN, GroupNorm without parameters
    model = build_model("scatter-cnn", "mnist")
    assert num_parameters(model) == 33066
    assert all(p.requires_grad for p in model.parameters())
    assert model(f).shape == (5, 10)


def test_cache_round_trip_and_a_bad_file_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path))
    x = torch.randn(4, 1, 28, 28)
    first = scatter.cached_scatter_features(x, label="t")
    files = list(tmp_path.glob("scatter-t-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def boom(_x):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(scatter, "scatter_features", boom)
    assert torch.equal(scatter.cached_scatter_features(x, label="t"), first)
    np.save(files[0], np.zeros((3, 81, 7, 7), dtype=np.float32))  # wrong shape: not trusted
    monkeypatch.undo()
    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path))
    assert torch.allclose(scatter.cached_scatter_features(x, label="t"), first)
    # other inputs, other file
    scatter.cached_scatter_features(x + 1, label="t")
    assert len(list(tmp_path.glob("scatter-t-*.npy"))) == 2


def test_an_unwritable_cache_still_returns_the_features(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(scatter.CACHE_ENV, str(blocker / "cache"))  # below a file: cannot be made
    assert scatter.cached_scatter_features(torch.randn(2, 1, 28, 28)).shape == (2, 81, 7, 7)


def test_with_features_on_real_images(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path))
    data = take_subset(load_dataset("mnist", data_dir, False), 50)
    assert with_features(data, "pixels") is data
    feats = with_features(data, "scatter")
    assert feats.x.shape == (50, 81, 7, 7) and torch.equal(feats.y, data.y)
    with pytest.raises(DataError, match="unknown features 'wavelets'"):
        with_features(data, "wavelets")


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"features": "scatter", "model": "mnist-cnn"}, "model"),
        ({"model": "scatter-cnn"}, "features"),
        ({"features": "scatter", "augmult": 4}, "augmult"),
        ({"features": "scatter", "scatter-groups": 10}, "scatter-groups"),
        ({"features": "sift"}, "features"),
    ],
)
def test_settings_that_do_not_fit_the_features_are_refused_by_name(settings, name):
    with pytest.raises(ConfigError, match=name):
        TrainConfig.from_mapping(settings)


def test_auto_model_follows_the_features():
    assert TrainConfig(features="scatter").resolved_model() == "scatter-cnn"
    assert TrainConfig(features="scatter", dataset="cifar10").resolved_model() == "scatter-cnn"
    assert TrainConfig().resolved_model() == "mnist-cnn"


@pytest.mark.slow
def test_private_centralized_run_on_scatter_features(data_dir, tmp_path, monkeypatch):
    from common.trainer import train_centralized

    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path / "cache"))
    cfg = TrainConfig(
        method="adadpigu",
        features="scatter",
        epsilon=3.0,
        epochs=3,
        batch_size=256,
        lr=1.0,
        train_subset=2000,
        test_subset=300,
        seed=0,
        data_dir=data_dir,
        out_dir=str(tmp_path / "runs"),
    )
    summary = train_centralized(cfg, log=lambda s: None)
    assert summary["model"] == "scatter-cnn"
    assert summary["epsilon"] <= 3.0 + 1e-9
    assert summary["test_accuracy_final"] > 0.5  # chance is 0.1


@pytest.mark.slow
def test_federated_run_on_scatter_features(data_dir, tmp_path, monkeypatch):
    """Each silo computes the features of its own examples (no privacy cost): a 3-silo run
    in process, the server's test set on the same features."""
    from server.runner import run_federated
    from tests.inprocess import InProcessGrid, small_run_configs

    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path / "cache"))
    cfg, fed = small_run_configs(tmp_path, data_dir, epsilon=8.0, rounds=3, train_subset=1200, seed=1)
    cfg = cfg.replace(features="scatter", lr=1.0)
    summary = run_federated(InProcessGrid(3), cfg, fed, log_fn=lambda s: None)
    assert summary["stop_reason"] == "completed" and summary["rounds_completed"] == 3
    assert summary["max_epsilon"] <= 8.0 + 1e-9
    assert summary["test_accuracy_final"] > 0.3
    assert list((tmp_path / "cache").glob("scatter-mnist-train-*.npy"))
