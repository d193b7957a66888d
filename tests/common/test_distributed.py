"""The lattice maths of distributed noise (common.distributed): the discrete Gaussian sampler,
conditional rounding, the plan's wrap bound and what it is worth in epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common.accounting import Phase, compute_epsilon
from common.distributed import (
    HALF,
    SecureRandom,
    conditional_round,
    discrete_gaussian,
    discrete_gaussian_pmf,
    mask_stream,
    plan_lattice,
    rounding_bound_sq,
)
from common.errors import ConfigError
from common.privacy import LatticeAccumulator, SegmentAccumulator


@pytest.mark.parametrize("sigma", [0.8, 2.0, 7.5])
def test_discrete_gaussian_matches_its_distribution(sigma):
    x = discrete_gaussian(200_000, sigma, SecureRandom(("test", sigma)))
    span = int(math.ceil(4 * sigma))
    support = np.arange(-span, span + 1)
    pmf = discrete_gaussian_pmf(support, sigma)
    var = float((pmf * support**2).sum() / pmf.sum())  # the exact variance (tails are negligible)
    assert abs(x.mean()) < 4 * math.sqrt(var / x.size)
    assert abs(x.var() / var - 1) < 0.02
    # chi-square goodness of fit on the central support (+ both tails lumped)
    observed = np.array([(x == k).sum() for k in support] + [(np.abs(x) > span).sum()])
    expected = np.append(pmf, max(1.0 - pmf.sum(), 1e-12)) * x.size
    keep = expected > 5
    chi2 = (((observed - expected) ** 2 / expected)[keep]).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3


def test_large_scale_discrete_gaussian_has_the_continuous_moments():
    x = discrete_gaussian(100_000, 4.0e5, SecureRandom(1))
    assert abs(x.std() / 4.0e5 - 1) < 0.01 and abs(x.mean()) < 4 * 4.0e5 / math.sqrt(x.size)
    assert stats.kstest(x / 4.0e5, "norm").pvalue > 1e-3


def test_secure_random_is_os_seeded_unless_a_seed_is_given():
    assert not np.array_equal(SecureRandom().uint64(8), SecureRandom().uint64(8))
    assert np.array_equal(SecureRandom(("s", 1)).uint64(8), SecureRandom(("s", 1)).uint64(8))
    u = SecureRandom().uniform(100_000)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    m = mask_stream(b"k" * 32, 0, 100_000)
    assert m.dtype == np.uint32 and abs(m.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    assert not np.array_equal(m[:100], mask_stream(b"k" * 32, 1, 100))  # instances differ


def test_conditional_rounding_keeps_the_norm_bound_and_is_nearly_unbiased():
    rng = SecureRandom(0)
    c, dim = 50.0, 400
    rows = np.random.default_rng(0).normal(size=(64, dim))
    rows *= (c / np.linalg.norm(rows, axis=1))[:, None]
    bound = rounding_bound_sq(c, dim)
    out = conditional_round(rows, bound, rng)
    assert out.dtype == np.int64
    assert ((out**2).sum(1) <= bound).all()
    assert np.abs(out - rows).max() < 1.0  # each coordinate rounds to a neighbour
    mean = np.mean([conditional_round(rows[:1], bound, rng)[0] for _ in range(400)], axis=0)
    assert np.abs(mean - rows[0]).mean() < 0.1


def test_plan_cannot_wrap_and_rounding_barely_adds_sensitivity():
    plan = plan_lattice(
        clip_norm=1.0, dim=26_000, noise_multiplier=1.1, survivors=10, silos=10, expected_total_batch=1024
    )
    assert plan.worst_coordinate(10) < HALF
    assert 0 < plan.rounding_inflation < 1e-3
    assert plan.noise_multiplier == pytest.approx(1.1, rel=1e-12)  # tau underflows at this scale
    assert plan.tau == 0.0
    with pytest.raises(ConfigError, match="32-bit secure sum"):
        plan_lattice(
            clip_norm=1.0, dim=10**9, noise_multiplier=1.0, survivors=2, silos=2, expected_total_batch=10**6
        )


def test_distributed_epsilon_equals_central_for_all_silos_and_grows_with_fewer():
    q, steps, delta = 0.02, 300, 1e-5
    central = compute_epsilon(phases=[Phase(1.0, q, steps)], delta=delta, accountant="pld")
    full = plan_lattice(
        clip_norm=1.0, dim=5000, noise_multiplier=1.0, survivors=10, silos=10, expected_total_batch=500
    )
    eps_full = compute_epsilon(phases=[Phase(full.noise_multiplier, q, steps)], delta=delta, accountant="pld")
    assert eps_full == pytest.approx(central, rel=1e-6)
    # the same shares, but only t = 7 assumed honest: less noise counted, larger epsilon
    t7 = plan_lattice(
        clip_norm=1.0, dim=5000, noise_multiplier=1.0, survivors=10, silos=10, expected_total_batch=500
    )
    t7 = type(t7)(**{**t7.__dict__, "survivors": 7})
    eps7 = compute_epsilon(phases=[Phase(t7.noise_multiplier, q, steps)], delta=delta, accountant="pld")
    assert eps7 > eps_full * 1.05
    assert t7.noise_multiplier == pytest.approx(math.sqrt(7 / 10), rel=1e-9)
    # one share alone is the single-share mechanism: scale s over sensitivity Delta_2
    assert full.own_share_noise_multiplier == pytest.approx(full.share_std / full.delta2)
    assert full.own_share_noise_multiplier == pytest.approx(1.0 / math.sqrt(10), rel=1e-9)


def test_lattice_sum_is_the_float_clipped_sum_within_the_rounding_bound():
    torch.manual_seed(0)
    grads = torch.randn(40, 300) * 3
    mask = torch.rand(300) < 0.6
    gamma = 1000.0
    bound = rounding_bound_sq(gamma * 1.0, int(mask.sum()))
    lat = LatticeAccumulator(
        [300], clip_norm=1.0, gamma=gamma, bound_sq=bound, rng=SecureRandom(0), mask=mask
    )
    lat.add([grads.clone()])
    ref = SegmentAccumulator([300], clip_norm=1.0, mask=mask)
    ref.add([grads.clone()])
    float_sum = ref.totals[0][mask].double().numpy()
    err = lat.int_totals / gamma - float_sum
    assert np.abs(err).max() <= 40 / gamma  # at most one lattice unit per row and coordinate
    assert lat.count == 40 and lat.clipped == 40
    with pytest.raises(TypeError):
        lat.release(noise_multiplier=1.0, expected_batch_size=1.0, generator=None)
