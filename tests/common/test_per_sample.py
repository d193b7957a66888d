"""Per-sample gradients equal a batch-of-one loop (the obviously-correct reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.ghost import make_grad_sampler
from common.models import build_model
from common.per_sample import (
    FuncGradSampler,
    HookGradSampler,
    NativeGradSampler,
    UnsupportedLayer,
    per_sample_grads,
)


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="none")


def loop_reference(model, x, y):
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def _cases():
    torch.manual_seed(0)
    yield (
        "conv2d",
        nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
        ),
        torch.randn(4, 2, 8, 8),
    )
    yield "linear", nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5)), torch.randn(4, 6)
    yield (
        "conv-dilated-nobias",
        nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=(1, 2), padding=(2, 1), dilation=2, bias=False),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(4 * 7 * 2, 5),
        ),
        torch.randn(4, 3, 8, 7),
    )
    yield (
        "conv-im2col",  # small maps, many input channels: the im2col + bmm branch
        nn.Sequential(
            nn.Conv2d(64, 6, 3, stride=2, padding=2, dilation=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6 * 3 * 3, 5),
        ),
        torch.randn(3, 64, 6, 6),
    )
    yield (
        "linear-3d",
        nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Flatten(), nn.Linear(21, 5)),
        torch.randn(4, 3, 6),
    )
    yield (
        "groupnorm",
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
        torch.randn(4, 2, 8, 8),
    )
    yield "layernorm", nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 5)), torch.randn(4, 6)
    yield (
        "embedding",
        nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4 * 3, 5)),
        torch.randint(0, 20, (4, 3)),
    )
    yield "mnist-cnn", build_model("mnist-cnn", "mnist"), torch.randn(3, 1, 28, 28)
    yield "cifar-cnn", build_model("cifar-cnn", "cifar10"), torch.randn(3, 3, 32, 32)
    yield (
        "mnist-cnn-gn-relu",
        build_model("mnist-cnn-gn", "mnist", activation="relu"),
        torch.randn(3, 1, 28, 28),
    )
    yield "resnet18-gn", build_model("resnet18-gn", "cifar10"), torch.randn(2, 3, 32, 32)
    yield "scatter-cnn", build_model("scatter-cnn", "mnist"), torch.randn(3, 81, 7, 7)
    yield "scatter-cnn-cifar", build_model("scatter-cnn", "cifar10"), torch.randn(2, 243, 8, 8)
    yield (
        "scatter-linear",
        build_model("scatter-linear", "fashionmnist", scatter_groups=9),
        torch.randn(3, 81, 7, 7),
    )
    data_norm = build_model("scatter-cnn", "mnist", scatter_norm="data")
    data_norm[0].set_stats(torch.randn(81) * 0.1, torch.rand(81) + 0.5)
    yield "scatter-cnn-data-norm", data_norm, torch.randn(3, 81, 7, 7)


CASES = list(_cases())


@pytest.mark.parametrize(("name", "model", "x"), CASES, ids=[c[0] for c in CASES])
def test_functorch_matches_loop(name, model, x):
    y = torch.arange(x.shape[0]) % 5
    ref = loop_reference(model, x, y)
    got = per_sample_grads(model, loss_fn, x, y, backend="functorch")
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].shape == (x.shape[0], *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "model", "x"), CASES, ids=[c[0] for c in CASES])
def test_hooks_match_loop(name, model, x):
    import copy

    model = copy.deepcopy(model)
    y = torch.arange(x.shape[0]) % 5
    ref = loop_reference(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    grads, mean_loss = HookGradSampler(model)(loss_fn, x, y)
    assert len(grads) == len(names)
    for n, g in zip(names, grads):
        torch.testing.assert_close(g, ref[n].reshape(x.shape[0], -1), atol=1e-5, rtol=1e-4)
    assert mean_loss == pytest.approx(float(loss_fn(model(x), y).mean()), rel=1e-5)


def test_func_sampler_interface_matches_hooks():
    torch.manual_seed(1)
    m1 = build_model("mnist-cnn", "mnist")
    import copy

    m2 = copy.deepcopy(m1)
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    g1, l1 = HookGradSampler(m1)(loss_fn, x, y)
    g2, l2 = FuncGradSampler(m2)(loss_fn, x, y)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert l1 == pytest.approx(l2, rel=1e-5)


NATIVE = {
    "mnist-cnn-gn-relu",
    "conv2d",
    "conv-im2col",
    "linear",
    "conv-dilated-nobias",
    "linear-3d",
    "groupnorm",
    "mnist-cnn",
    "cifar-cnn",
    "resnet18-gn",
    "scatter-cnn",
    "scatter-cnn-cifar",
    "scatter-linear",
    "scatter-cnn-data-norm",
}


@pytest.mark.parametrize(("name", "model", "x"), CASES, ids=[c[0] for c in CASES])
def test_native_matches_loop_or_refuses(name, model, x):
    import copy

    model = copy.deepcopy(model)
    y = torch.arange(x.shape[0]) % 5
    if name not in NATIVE:
        with pytest.raises(UnsupportedLayer):
            NativeGradSampler(model)
        assert isinstance(make_grad_sampler(model, "auto"), HookGradSampler)
        return
    ref = loop_reference(model, x, y)
    model.zero_grad(set_to_none=True)
    names = [n for n, _ in model.named_parameters()]
    sampler = make_grad_sampler(model, "auto")
    assert isinstance(sampler, NativeGradSampler)
    for b in (x.shape[0], x.shape[0] - 1, x.shape[0]):  # buffers reused across chunk sizes
        grads, mean_loss = sampler(loss_fn, x[:b], y[:b])
        assert len(grads) == len(names)
        for n, g in zip(names, grads):
            torch.testing.assert_close(g, ref[n][:b].reshape(b, -1), atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            assert mean_loss == pytest.approx(float(loss_fn(model(x[:b]), y[:b]).mean()), rel=1e-5)
    # the ordinary batch gradient is never formed, and nothing is left behind
    assert all(p.grad is None for p in model.parameters())


def test_native_refuses_in_place_modification_of_a_layer_output():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    sampler = NativeGradSampler(model)
    with pytest.raises(UnsupportedLayer, match="in place"):
        sampler(loss_fn, torch.randn(3, 4), torch.tensor([0, 1, 0]))


def test_native_refuses_a_layer_used_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(UnsupportedLayer, match="twice"):
        NativeGradSampler(Twice())(loss_fn, torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_native_hooks_are_silent_outside_a_call():
    model = build_model("mnist-cnn", "mnist")
    sampler = NativeGradSampler(model)
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))  # evaluation: nothing recorded
    assert not sampler._outputs


def test_public_api_takes_the_engines_fast_path_with_the_same_numbers():
    """per_sample_grads + privatize_step (the documented functional API) give what the
    engine releases for the same batch, through the same native sampler."""
    from common.config import TrainConfig
    from common.data import TensorData
    from common.engine import DPEngine
    from common.privacy import privatize_step

    torch.manual_seed(0)
    model = build_model("mnist-cnn", "mnist")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    fast = per_sample_grads(model, loss_fn, x, y)
    ref = per_sample_grads(model, loss_fn, x, y, backend="functorch")
    from common.per_sample import _NATIVE_SAMPLERS

    assert _NATIVE_SAMPLERS.get(model) is not None  # the native sampler served the call
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], atol=1e-5, rtol=1e-4)
    flat = torch.cat([fast[n].reshape(16, -1) for n, _ in model.named_parameters()], dim=1)
    from common.per_sample import per_sample_grad_matrix

    torch.testing.assert_close(per_sample_grad_matrix(model, loss_fn, x, y), flat)
    released = privatize_step(
        flat, mask=None, center=None, scale=None, clip_norm=0.1, noise_multiplier=0.0,
        expected_batch_size=16.0, generator=None,
    )  # fmt: skip
    cfg = TrainConfig(method="dpsgd", epsilon=8.0, batch_size=16, max_physical_batch=64)
    eng = DPEngine(
        model, cfg, n_train=16, device=torch.device("cpu"),
        noise_generator=torch.Generator(), sampling_generator=torch.Generator(),
    )  # fmt: skip
    rel, _, _ = eng._private_release(TensorData(x, y), torch.arange(16), "flat", 0.0)
    torch.testing.assert_close(released, rel.values, atol=1e-7, rtol=1e-5)


def test_grouped_conv_weight_gradients_in_slices_equal_the_loop(monkeypatch):
    """The grouped weight-gradient convolution runs in slices of examples (a CPU kernel turns
    40x slower past ~2^26 weights in one call): with slices of 2 examples, and a batch that
    is not a multiple of the slice, the rows still equal each example's own gradient."""
    import common.per_sample as per_sample

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    conv_weights = model[0].weight.numel()
    monkeypatch.setattr(per_sample, "_GROUPED_WEIGHTS", 2 * conv_weights)
    x, y = torch.randn(7, 3, 8, 8), torch.arange(7) % 5
    ref = loop_reference(model, x, y)
    model.zero_grad(set_to_none=True)
    grads, _ = NativeGradSampler(model)(loss_fn, x, y)
    for (n, _), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, ref[n].reshape(7, -1), atol=1e-5, rtol=1e-4)
