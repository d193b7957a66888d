"""The privatizer: clipping bound, noise scale, masking, determinism, naive oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy import (
    ReleasedGradient,
    SegmentAccumulator,
    clip_factors,
    privatize_step,
    row_norms,
    standardize,
)


def naive_privatize(grads, *, mask, center, scale, clip_norm, expected_batch_size):
    """Obviously-correct reference without noise: a loop over rows."""
    d = grads.shape[1]
    mask = torch.ones(d, dtype=torch.bool) if mask is None else mask
    center = torch.zeros(d) if center is None else center
    scale = torch.ones(d) if scale is None else scale
    total = torch.zeros(d, dtype=torch.float64)
    for row in grads:
        z = torch.where(mask, (row - center) / scale, torch.zeros(d))
        n = float(z.norm())
        total += z.double() * min(1.0, clip_norm / n if n > 0 else 1.0)
    out = scale.double() * total / expected_batch_size + center.double()
    return torch.where(mask, out, torch.zeros(d, dtype=torch.float64)).float()


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 12),
    d=st.integers(1, 40),
    clip=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**31 - 1),
    use_mask=st.booleans(),
    use_stats=st.booleans(),
)
def test_clipped_standardized_rows_have_norm_at_most_c(b, d, clip, seed, use_mask, use_stats):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, d, generator=g) * 10 ** torch.empty(1).uniform_(-3, 3, generator=g)
    mask = (torch.rand(d, generator=g) < 0.6) if use_mask else None
    center = torch.randn(d, generator=g) if use_stats else None
    scale = torch.rand(d, generator=g) + 0.05 if use_stats else None
    z = standardize(
        [grads],
        mask=None if mask is None else [mask],
        center=None if center is None else [center],
        scale=None if scale is None else [scale],
    )
    factors = clip_factors(row_norms(z), clip)
    clipped = z[0] * factors[:, None]
    assert torch.all(clipped.norm(dim=1) <= clip * (1 + 1e-5))
    if mask is not None:
        assert torch.all(clipped[:, ~mask] == 0)


def test_noise_std_on_active_and_exact_zero_on_inactive():
    d, b, sigma, c = 40000, 32, 1.3, 0.7
    mask = torch.arange(d) % 3 != 0
    out = privatize_step(
        torch.zeros(b, d),
        mask=mask,
        center=None,
        scale=None,
        clip_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=b,
        generator=torch.Generator().manual_seed(0),
    )
    expected = sigma * c / b
    assert float(out[mask].std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(out[mask].mean())) < 5 * expected / math.sqrt(int(mask.sum()))
    assert torch.all(out[~mask] == 0)


def test_noise_is_scaled_per_coordinate_by_scale():
    d, b = 20000, 10
    scale = torch.where(torch.arange(d) < d // 2, torch.tensor(1.0), torch.tensor(4.0))
    out = privatize_step(
        torch.zeros(b, d),
        mask=None,
        center=None,
        scale=scale,
        clip_norm=1.0,
        noise_multiplier=2.0,
        expected_batch_size=b,
        generator=torch.Generator().manual_seed(1),
    )
    assert float(out[: d // 2].std()) == pytest.approx(0.2, rel=0.05)
    assert float(out[d // 2 :].std()) == pytest.approx(0.8, rel=0.05)


def test_sigma_zero_no_clipping_equals_mean_gradient():
    torch.manual_seed(0)
    grads = torch.randn(16, 50)
    out = privatize_step(
        grads,
        mask=None,
        center=None,
        scale=None,
        clip_norm=1e9,
        noise_multiplier=0.0,
        expected_batch_size=16,
        generator=None,
    )
    torch.testing.assert_close(out, grads.mean(0))


def test_standardize_restore_is_identity_without_clipping_or_noise():
    torch.manual_seed(0)
    grads = torch.randn(8, 30)
    center, scale = torch.randn(30), torch.rand(30) + 0.5
    mask = torch.arange(30) % 2 == 0
    out = privatize_step(
        grads,
        mask=mask,
        center=center,
        scale=scale,
        clip_norm=1e9,
        noise_multiplier=0.0,
        expected_batch_size=8,
        generator=None,
    )
    torch.testing.assert_close(out[mask], grads.mean(0)[mask], atol=1e-6, rtol=1e-5)
    assert torch.all(out[~mask] == 0)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(0, 10),
    d=st.integers(1, 30),
    clip=st.floats(0.01, 5.0),
    seed=st.integers(0, 10**6),
    use_mask=st.booleans(),
    use_stats=st.booleans(),
)
def test_matches_naive_reference(b, d, clip, seed, use_mask, use_stats):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(b, d, generator=g)
    mask = (torch.rand(d, generator=g) < 0.5) if use_mask else None
    center = torch.randn(d, generator=g) * 0.1 if use_stats else None
    scale = torch.rand(d, generator=g) + 0.1 if use_stats else None
    expected_b = max(b, 1) * 1.5
    got = privatize_step(
        grads,
        mask=mask,
        center=center,
        scale=scale,
        clip_norm=clip,
        noise_multiplier=0.0,
        expected_batch_size=expected_b,
        generator=None,
    )
    ref = naive_privatize(
        grads, mask=mask, center=center, scale=scale, clip_norm=clip, expected_batch_size=expected_b
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_segments_and_chunks_equal_single_matrix_without_noise():
    torch.manual_seed(3)
    grads = torch.randn(12, 25)
    mask = torch.rand(25) < 0.7
    center, scale = torch.randn(25) * 0.1, torch.rand(25) + 0.2
    sizes = [10, 5, 10]
    acc = SegmentAccumulator(sizes, clip_norm=0.5, mask=mask, center=center, scale=scale)
    for rows in (grads[:5], grads[5:]):  # two physical chunks
        acc.add(list(torch.split(rows, sizes, dim=1)))
    seg = acc.release(noise_multiplier=0.0, expected_batch_size=12.0, generator=None).values
    single = privatize_step(
        grads,
        mask=mask,
        center=center,
        scale=scale,
        clip_norm=0.5,
        noise_multiplier=0.0,
        expected_batch_size=12.0,
        generator=None,
    )
    torch.testing.assert_close(seg, single)


def test_same_seed_same_output_other_seed_differs():
    grads = torch.randn(8, 100)

    def run(seed):
        return privatize_step(
            grads,
            mask=None,
            center=None,
            scale=None,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=8,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_empty_batch_still_adds_noise():
    out = privatize_step(
        torch.zeros(0, 1000),
        mask=None,
        center=None,
        scale=None,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(out.std()) == pytest.approx(0.1, rel=0.15)


def test_released_gradient_cannot_be_forged():
    with pytest.raises(TypeError, match="only by common.privacy"):
        ReleasedGradient(torch.zeros(3), torch.zeros(3), None)


def test_noisy_release_identical_to_naive_oracle_with_the_same_seed():
    """The optimized path and the obviously-correct loop agree to float precision, noise included."""
    torch.manual_seed(7)
    d, b, sigma, c = 300, 9, 1.1, 0.4
    grads = torch.randn(b, d)
    mask = torch.rand(d) < 0.6
    center, scale = torch.randn(d) * 0.05, torch.rand(d) + 0.3
    got = privatize_step(
        grads,
        mask=mask,
        center=center,
        scale=scale,
        clip_norm=c,
        noise_multiplier=sigma,
        expected_batch_size=12.0,
        generator=torch.Generator().manual_seed(42),
    )
    # oracle: clipped sum by a loop, then the same generator's draw, then restore
    total = torch.zeros(d, dtype=torch.float64)
    for row in grads:
        z = torch.where(mask, (row - center) / scale, torch.zeros(d))
        total += z.double() * min(1.0, c / float(z.norm()))
    noise = torch.randn(d, generator=torch.Generator().manual_seed(42)).double()
    noisy = total + sigma * c * noise
    ref = torch.where(
        mask, scale.double() * noisy / 12.0 + center.double(), torch.zeros(d, dtype=torch.float64)
    )
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_in_place_standardization_is_bit_identical_to_the_reference_stages(stats, use_mask):
    """The engine's fast path (rows standardized in place in the sampler's scratch
    buffers) releases exactly the same bits, noise included, as the public stages."""
    torch.manual_seed(11)
    sizes, b = [40, 7, 53], 16
    d = sum(sizes)
    grads = torch.randn(b, d)
    mask = (torch.rand(d) < 0.6) if use_mask else None
    center, scale = (torch.randn(d) * 0.05, torch.rand(d) + 0.3) if stats else (None, None)

    def release(consume):
        acc = SegmentAccumulator(sizes, clip_norm=0.4, mask=mask, center=center, scale=scale)
        for rows in (grads[:9], grads[9:]):
            parts = [p.clone() for p in torch.split(rows, sizes, dim=1)]
            acc.add(parts, consume=consume)
        out = acc.release(
            noise_multiplier=1.3, expected_batch_size=14.0, generator=torch.Generator().manual_seed(5)
        )
        return out.values, acc.clipped

    (fast, c1), (ref, c2) = release(True), release(False)
    assert torch.equal(fast, ref) and c1 == c2
