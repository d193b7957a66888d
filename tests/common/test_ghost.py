"""Ghost clipping against the materialised per-sample gradients (issue 27): for every layer
kind and every stage-1 transform (flat, masked, masked and standardized), the clipped sum,
the clipped count and the released gradient equal those of SegmentAccumulator.add on the
native sampler's rows (torch.testing.assert_close)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.engine import per_example_loss
from common.ghost import GhostClipper
from common.models import build_model
from common.per_sample import NativeGradSampler
from common.privacy import SegmentAccumulator


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)), (12,)),
        "mnist-cnn": (build_model("mnist-cnn", "mnist"), (1, 28, 28)),
        "mnist-cnn-gn": (build_model("mnist-cnn-gn", "mnist"), (1, 28, 28)),
        "cifar-cnn": (
            build_model("cifar-cnn", "cifar10"),
            (3, 32, 32),
        ),  # its 8x8 layers take the ghost route
        "scatter-linear": (build_model("scatter-linear", "mnist", scatter_groups=27), (81, 7, 7)),
        # a user model's hidden shapes: Linear over positions [B, T, in] (ghost for small T)
        "positions": (
            nn.Sequential(
                nn.Unflatten(1, (4, 24)), nn.Linear(24, 40), nn.Tanh(), nn.Flatten(), nn.Linear(160, 3)
            ),
            (96,),
        ),
        "many-positions": (
            nn.Sequential(
                nn.Unflatten(1, (30, 4)), nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(180, 3)
            ),
            (120,),
        ),
        "conv-no-bias": (
            nn.Sequential(
                nn.Conv2d(8, 32, 3, padding=1, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 16, 4)
            ),
            (8, 4, 4),
        ),
    }


MODES = ("flat", "mask", "adaptive")


def _stage1(d: int, mode: str, gen: torch.Generator):
    if mode == "flat":
        return None, None, None
    mask = torch.rand(d, generator=gen) < 0.6
    if mode == "mask":
        return mask, None, None
    center = 0.01 * torch.randn(d, generator=gen)
    scale = 0.5 + torch.rand(d, generator=gen)
    return mask, center, scale


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(_models()))
def test_the_ghost_clipped_sum_equals_the_materialised_one(name, mode):
    model, shape = _models()[name]
    gen = torch.Generator().manual_seed(1)
    b = 7
    x = torch.randn(b, *shape, generator=gen)
    y = torch.randint(0, 3, (b,), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    mask, center, scale = _stage1(sum(sizes), mode, gen)
    # a clip norm between two standardized rows' norms: some rows are clipped, some not
    ref_rows = torch.cat(NativeGradSampler(model)(per_example_loss, x, y)[0], dim=1).clone()
    probe = SegmentAccumulator(sizes, clip_norm=1.0, mask=mask, center=center, scale=scale)
    z = torch.cat(probe._standardize(list(torch.split(ref_rows.clone(), sizes, dim=1)), False), dim=1)
    norms = z.norm(dim=1).sort().values
    clip = float(norms[2] + norms[3]) / 2

    def accumulator():
        return SegmentAccumulator(sizes, clip_norm=clip, mask=mask, center=center, scale=scale)

    ref = accumulator()
    ref.add(list(torch.split(ref_rows, sizes, dim=1)))
    ghost = accumulator()
    import copy

    GhostClipper(copy.deepcopy(model)).accumulate(ghost, per_example_loss, x, y)
    for k, (a, g) in enumerate(zip(ref.totals, ghost.totals)):
        torch.testing.assert_close(g, a, rtol=2e-4, atol=2e-5, msg=f"segment {k}")
    assert (ghost.count, ghost.clipped) == (ref.count, ref.clipped) and 0 < ref.clipped < b
    r1 = ref.release(noise_multiplier=1.0, expected_batch_size=b, generator=torch.Generator().manual_seed(5))
    r2 = ghost.release(
        noise_multiplier=1.0, expected_batch_size=b, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(r2.values, r1.values, rtol=2e-4, atol=2e-5)


def test_the_ghost_route_is_taken_where_it_is_cheaper():
    """Per layer: Linear on [B, in] always; conv and multi-position Linear only when
    2 P^2 < out * patch (Li et al. 2022) and stage 1 is flat; the rest is materialised."""
    from common.ghost import _ConvGhost, _LinearGhost, _Rows

    model = build_model("cifar-cnn", "cifar10")
    clipper = GhostClipper(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    order, backprops, _ = clipper._forward_backward(per_example_loss, x, y)
    kinds = {}
    for m in order:
        if isinstance(m, nn.Conv2d):
            kinds[(m.in_channels, m.out_channels)] = type(
                clipper._plan(m, "weight", clipper._inputs[m], backprops[m], None, None)
            )
        if isinstance(m, nn.Linear):
            assert isinstance(
                clipper._plan(m, "weight", clipper._inputs[m], backprops[m], None, None), _LinearGhost
            )
    assert kinds[(3, 32)] is _Rows  # 32x32 maps: P^2 = 1M > 32 * 27
    assert kinds[(128, 128)] is _ConvGhost  # 8x8 maps: P^2 = 4096 < 128 * 1152
    conv = next(
        m for m in order if isinstance(m, nn.Conv2d) and m.out_channels == 128 and m.in_channels == 128
    )
    w = torch.ones(conv.weight.numel())
    assert type(clipper._plan(conv, "weight", clipper._inputs[conv], backprops[conv], w, None)) is _Rows


@pytest.mark.parametrize("mode", MODES)
def test_the_functional_api_releases_what_privatize_step_releases_on_the_rows(mode):
    from common.ghost import private_gradient
    from common.per_sample import per_sample_grad_matrix
    from common.privacy import privatize_step

    model, shape = _models()["mnist-cnn"]
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, *shape, generator=gen), torch.randint(0, 10, (9,), generator=gen)
    d = sum(p.numel() for p in model.parameters())
    mask, center, scale = _stage1(d, mode, gen)
    # no noise: privatize_step draws it for one [d] segment, the API per parameter (other streams)
    kw = dict(
        mask=mask, center=center, scale=scale, clip_norm=0.05, noise_multiplier=0.0, expected_batch_size=9.0
    )
    ours = private_gradient(
        model, per_example_loss, x, y, generator=torch.Generator().manual_seed(7), max_physical_batch=4, **kw
    )
    rows = per_sample_grad_matrix(model, per_example_loss, x, y, backend="native")
    ref = privatize_step(rows, generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-6)


def test_the_engine_takes_the_ghost_path_by_default_and_releases_what_the_rows_give():
    from common.config import TrainConfig
    from common.data import TensorData
    from common.engine import DPEngine

    def engine(backend):
        torch.manual_seed(0)
        cfg = TrainConfig(
            method="dpsgd", epsilon=8.0, batch_size=16, max_physical_batch=8, per_sample_backend=backend
        )
        return DPEngine(
            build_model("mnist-cnn", "mnist"), cfg, n_train=64, device=torch.device("cpu"),
            noise_generator=torch.Generator().manual_seed(1), sampling_generator=torch.Generator().manual_seed(2),
        )  # fmt: skip

    data = TensorData(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    ghost, rows = engine("auto"), engine("native")
    assert ghost.ghost and not rows.ghost
    idx = torch.arange(0, 64, 3)
    a = ghost._private_release(data, idx, "flat", 1.0)
    b = rows._private_release(data, idx, "flat", 1.0)
    torch.testing.assert_close(a[0].values, b[0].values, rtol=2e-4, atol=2e-6)
    assert a[2] == b[2]


def test_a_row_close_to_the_center_keeps_its_norm_despite_cancellation():
    """The standardized norm ||G ⊙ w + k||² of a row near the center is a small difference of
    large terms; the clipping must not see it smaller than it is (float64 for those terms)."""
    from common.ghost import _LinearGhost

    torch.manual_seed(0)
    layer = nn.Linear(200, 8)
    x = torch.randn(1, 200).repeat(6, 1) + 1e-3 * torch.randn(6, 200)
    y = torch.zeros(6, dtype=torch.long)
    rows = torch.cat(NativeGradSampler(nn.Sequential(layer))(per_example_loss, x, y)[0], dim=1).double()
    w = torch.ones(layer.weight.numel(), dtype=torch.float32)
    k = -(rows[:, : layer.weight.numel()].mean(0)).float()  # center = the rows' mean: tiny standardized rows
    truth = (rows[:, : layer.weight.numel()] * w.double() + k.double()).square().sum(1)
    a, out = x, layer(x)
    g = torch.autograd.grad(per_example_loss(out, y).sum(), out)[0]
    got = _LinearGhost(a, g, w, k, layer.weight.shape).norm_sq().double()
    assert truth.max() < 1e-3 * (rows[:, : layer.weight.numel()].square().sum(1)).min()  # the hard case
    torch.testing.assert_close(got, truth, rtol=1e-4, atol=0)
