"""Leak test: importance and clipping statistics come from released (noised) gradients only.

With sigma so large that releases are essentially noise, two different datasets with the
same generator seeds must give the same importance mask and statistics. An implementation
that accumulates importance or statistics from clipped per-sample gradients before noise
(the published AdaDPIGU code) fails this test.
"""

from __future__ import annotations

import torch

from common.config import TrainConfig
from common.data import TensorData
from common.engine import DPEngine, make_generator
from common.masks import MaskBuilder
from common.models import build_model


def _engine_after_training(data: TensorData, cfg: TrainConfig):
    torch.manual_seed(0)
    model = build_model("mnist-cnn", "mnist")
    eng = DPEngine(
        model,
        cfg,
        n_train=len(data),
        device=torch.device("cpu"),
        noise_generator=make_generator(0, "noise"),
        sampling_generator=make_generator(0, "sampling"),
    )
    for _ in range(4):
        eng.step(data, mode="flat", noise_multiplier=cfg.noise_multiplier, update_importance=True)
    mask = MaskBuilder(eng.importance.scores(), eng.sizes).mask(0.5)
    eng.set_mask(mask)
    for _ in range(3):
        eng.step(data, mode="adaptive", noise_multiplier=cfg.noise_multiplier)
    return mask, eng.stats.center(), eng.stats.scale(mask, 1.0)


def test_importance_and_statistics_do_not_depend_on_the_data():
    cfg = TrainConfig(
        method="adadpigu", noise_multiplier=1e7, epsilon=None, lr=1e-12, momentum=0.0, batch_size=16, seed=0
    )
    g = torch.Generator().manual_seed(1)
    a = TensorData(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    b = TensorData(torch.randn(64, 1, 28, 28, generator=g) * 3 + 1, torch.randint(0, 10, (64,), generator=g))
    mask_a, center_a, scale_a = _engine_after_training(a, cfg)
    mask_b, center_b, scale_b = _engine_after_training(b, cfg)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(center_a, center_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale_a, scale_b, rtol=1e-4, atol=1e-6)


def test_with_little_noise_the_data_does_matter():
    """Control: the same procedure at small sigma does see the data (the test above can fail)."""
    cfg = TrainConfig(
        method="adadpigu", noise_multiplier=1e-3, epsilon=None, lr=1e-12, momentum=0.0, batch_size=16, seed=0
    )
    g = torch.Generator().manual_seed(1)
    a = TensorData(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    b = TensorData(torch.randn(64, 1, 28, 28, generator=g) * 3 + 1, torch.randint(0, 10, (64,), generator=g))
    torch.manual_seed(0)
    mask_a, *_ = _engine_after_training(a, cfg)
    mask_b, *_ = _engine_after_training(b, cfg)
    assert not torch.equal(mask_a, mask_b)
