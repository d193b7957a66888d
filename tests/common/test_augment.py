"""Augmentation multiplicity against naive references: the augmentation itself, and each
example's row = the mean of its copies' gradients (taken before clipping)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.augment import PAD, augment, mean_over_copies
from common.config import TrainConfig
from common.data import TensorData
from common.engine import DPEngine, per_example_loss
from common.ghost import make_grad_sampler
from common.models import build_model


def test_augment_is_a_random_shift_of_the_padded_image_per_copy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 28, 28, generator=gen)
    k, pad = 4, PAD["mnist"]
    out = augment(x, k, "mnist", torch.Generator().manual_seed(7))
    ref_gen = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 2 * pad + 1, (3 * k,), generator=ref_gen)
    dx = torch.randint(0, 2 * pad + 1, (3 * k,), generator=ref_gen)
    for i in range(3):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        for j in range(k):
            n = i * k + j
            expected = padded[:, dy[n] : dy[n] + 28, dx[n] : dx[n] + 28]
            assert torch.equal(out[n], expected)


def test_cifar_copies_are_flipped_half_the_time():
    x = torch.randn(64, 3, 32, 32)
    out = augment(x, 2, "cifar10", torch.Generator().manual_seed(1))
    assert out.shape == (128, 3, 32, 32)


def test_each_row_is_the_mean_of_its_copies_gradients():
    torch.manual_seed(0)
    model = build_model("mnist-cnn", "mnist")
    x, y, k = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7]), 4
    xa = augment(x, k, "mnist", torch.Generator().manual_seed(3))
    ya = y.repeat_interleave(k)
    grads, _ = make_grad_sampler(model, "native")(per_example_loss, xa, ya)
    rows = torch.cat(mean_over_copies([g.clone() for g in grads], k), dim=1)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(3):
        ref = torch.zeros(rows.shape[1])
        for j in range(k):
            n = i * k + j
            loss = F.cross_entropy(model(xa[n : n + 1]), ya[n : n + 1])
            ref += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]) / k
        torch.testing.assert_close(rows[i], ref, rtol=1e-4, atol=1e-6)


def test_engine_with_augmult_clips_one_row_per_example():
    cfg = TrainConfig(method="dpsgd", epsilon=8.0, batch_size=32, augmult=4, max_physical_batch=64)
    eng = _engine(cfg, n_train=64)
    data = TensorData(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    res = eng.step(data, mode="flat", noise_multiplier=1.0)
    assert 0 < res.batch_size <= 64 and res.clipped <= res.batch_size  # rows = examples, not copies


def _engine(cfg: TrainConfig, n_train: int) -> DPEngine:
    """An MNIST-CNN engine with seeded weights, noise and sampling."""
    torch.manual_seed(0)
    return DPEngine(
        build_model("mnist-cnn", "mnist"),
        cfg,
        n_train=n_train,
        device=torch.device("cpu"),
        noise_generator=torch.Generator().manual_seed(1),
        sampling_generator=torch.Generator().manual_seed(2),
    )


def _nonprivate_engine(max_physical_batch: int, augmult: int = 0) -> DPEngine:
    cfg = TrainConfig(
        method="nonprivate", batch_size=50, augmult=augmult, max_physical_batch=max_physical_batch
    )
    return _engine(cfg, n_train=100)


def test_nonprivate_gradient_over_several_chunks_equals_the_one_chunk_gradient():
    """Issue 28.1: the chunk loop's augmentation count was reused as the parameter index, so
    every chunk after the first was augmented len(params) - 1 times."""
    data = TensorData(torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    idx = torch.arange(0, 100, 2)  # 50 examples: 4 chunks of 16 (the last one 2) against 1
    chunked, loss_chunked = _nonprivate_engine(16)._nonprivate_gradient(data, idx)
    whole, loss_whole = _nonprivate_engine(1024)._nonprivate_gradient(data, idx)
    # the naive reference: one backward pass of the batch's mean loss
    model = _nonprivate_engine(1024).model
    params = [p for p in model.parameters() if p.requires_grad]
    loss = per_example_loss(model(data.x[idx]), data.y[idx]).mean()
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(chunked.values, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(whole.values, ref, rtol=1e-4, atol=1e-6)
    assert abs(loss_chunked - float(loss)) < 1e-4 and abs(loss_whole - float(loss)) < 1e-4


def test_nonprivate_chunks_see_exactly_augmult_copies_each():
    """With augmult k every chunk, the later ones too, holds k copies of its examples."""
    seen: list[int] = []
    eng = _nonprivate_engine(32, augmult=4)  # 8 examples (32 images) per chunk
    eng.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    data = TensorData(torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,)))
    eng._nonprivate_gradient(data, torch.arange(20))
    assert seen == [32, 32, 16]
