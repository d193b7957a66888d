"""Accounting with dp-accounting: golden values, PLD <= RDP, calibration, budget checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.accounting import Phase, PrivacyTracker, calibrate_noise, compute_epsilon
from common.errors import BudgetError


def test_rdp_golden_value():
    # Golden value from the issue / Opacus & TF-Privacy RDP analyses (sigma 1.5, q 0.04, 2250 steps).
    eps = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.3291, abs=1e-3)


def test_pld_tighter_than_rdp_and_matches_design_value():
    pld = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="pld")
    rdp = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp")
    assert pld <= rdp
    assert pld == pytest.approx(6.77, abs=0.02)  # DESIGN.md §1


def test_two_phases_compose_more_than_either():
    a = Phase(2.0, 0.01, 300)
    b = Phase(1.0, 0.01, 300)
    both = compute_epsilon(phases=[a, b], delta=1e-5)
    assert both > compute_epsilon(phases=[a], delta=1e-5)
    assert both > compute_epsilon(phases=[b], delta=1e-5)
    # identical phases compose like one long phase
    one = compute_epsilon(phases=[Phase(1.0, 0.01, 600)], delta=1e-5, accountant="rdp")
    two = compute_epsilon(phases=[Phase(1.0, 0.01, 300), Phase(1.0, 0.01, 300)], delta=1e-5, accountant="rdp")
    assert one == pytest.approx(two, rel=1e-9)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.001, 0.2),
    steps=st.integers(10, 400),
    accountant=st.sampled_from(["rdp", "pld"]),
)
def test_calibration_never_overshoots_and_lands_within_2_percent(target, q, steps, accountant):
    sigma = calibrate_noise(target, 1e-5, q, steps, accountant=accountant)
    eps = compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant
    )
    assert eps <= target
    assert eps >= 0.98 * target


def test_calibration_with_fixed_pretraining_phase():
    pre = Phase(3.0, 0.02, 100)
    sigma = calibrate_noise(4.0, 1e-5, 0.02, 900, fixed_phases=[pre])
    eps = compute_epsilon(phases=[pre, Phase(sigma, 0.02, 900)], delta=1e-5)
    assert 0.98 * 4.0 <= eps <= 4.0


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(BudgetError, match="cannot be reached"):
        calibrate_noise(1e-4, 1e-9, 1.0, 10**5, accountant="rdp")


def test_tracker_refuses_a_phase_that_would_exceed_target():
    tracker = PrivacyTracker(delta=1e-5, target_epsilon=2.0, accountant="rdp")
    ok = Phase(2.0, 0.01, 200)
    tracker.check(ok)
    tracker.spend(ok)
    assert tracker.steps == 200
    with pytest.raises(BudgetError, match="would reach epsilon"):
        tracker.check(Phase(0.5, 0.5, 1000))
    assert tracker.steps == 200  # nothing recorded for the refused phase


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.9, 0.047, 420), (1.5, 0.0095, 4200), (0.75, 0.05, 60), (3.0, 0.01, 10)],
)
def test_budget_epsilon_is_never_below_the_fine_grid_and_decides_checks_identically(sigma, q, steps):
    """The coarse-first check is an upper bound and accepts/refuses exactly as the fine one."""
    from common.accounting import PLD_COARSE_GRID, budget_epsilon, compose, epsilon_of_event

    phases = [Phase(sigma, q, steps)]
    fine = compute_epsilon(phases=phases, delta=1e-5)
    coarse = epsilon_of_event(compose(phases), 1e-5, grid=PLD_COARSE_GRID)
    assert coarse >= fine  # pessimistic discretization: coarser is looser, never tighter
    for target in (fine * 0.999, fine, fine * 1.0005, (fine + coarse) / 2, coarse * 1.01, None):
        got = budget_epsilon(phases, delta=1e-5, accountant="pld", target=target)
        assert got >= fine
        if target is not None:
            assert (got <= target) == (fine <= target)


def test_tracker_check_accepts_up_to_the_fine_grid_target():
    """A plan calibrated to exactly the target on the fine grid passes the (coarse-first) check."""
    sigma = calibrate_noise(2.0, 1e-5, 0.01, 1000)
    tracker = PrivacyTracker(delta=1e-5, target_epsilon=2.0)
    eps = tracker.check(Phase(sigma, 0.01, 1000))
    assert eps <= 2.0
    tracker.spend(Phase(sigma, 0.01, 1000))
    with pytest.raises(BudgetError):
        tracker.check(Phase(sigma, 0.01, 100))


def test_epsilon_is_memoised_per_history():
    from common.accounting import _epsilon_of_phases

    phases = [Phase(1.1, 0.02, 123)]
    compute_epsilon(phases=phases, delta=1e-5)
    hits = _epsilon_of_phases.cache_info().hits
    compute_epsilon(phases=[Phase(1.1, 0.02, 123)], delta=1e-5)
    assert _epsilon_of_phases.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    "phases",
    [
        [Phase(0.9, 0.047, 420)],
        [Phase(0.9, 0.047, 42), Phase(0.8, 0.047, 420)],
        [Phase(2.0, 1.0, 5)],
        [Phase(1.2, 0.01, 0), Phase(1.1, 0.02, 30)],
    ],
)
def test_memoised_pld_is_bit_identical_to_dp_accounting(phases):
    """Our PLD path (single-step PLDs built once) gives exactly PLDAccountant's epsilon."""
    from dp_accounting import pld

    from common.accounting import compose

    acc = pld.PLDAccountant()
    acc.compose(compose(phases))
    assert compute_epsilon(phases=phases, delta=1e-5) == acc.get_epsilon(1e-5)


def test_tiny_noise_is_bounded_by_rdp_not_a_gigabyte_pld():
    """Below PLD_MIN_NOISE the PLD would take GBs and minutes: the RDP upper bound is used,
    in milliseconds, and it is never below the PLD value where both are computable."""
    import time

    from common.accounting import PLD_MIN_NOISE, calibrate_noise, compute_epsilon

    t = time.time()
    tiny = compute_epsilon(noise_multiplier=0.01, sample_rate=0.01, steps=1000, delta=1e-5, accountant="pld")
    assert time.time() - t < 5 and tiny > 100
    assert tiny == compute_epsilon(
        noise_multiplier=0.01, sample_rate=0.01, steps=1000, delta=1e-5, accountant="rdp"
    )
    at = dict(sample_rate=0.01, steps=200, delta=1e-5)
    assert compute_epsilon(noise_multiplier=PLD_MIN_NOISE, accountant="pld", **at) <= compute_epsilon(
        noise_multiplier=PLD_MIN_NOISE, accountant="rdp", **at
    )
    sigma = calibrate_noise(5000.0, 1e-5, 0.01, 1000, accountant="pld")  # a huge target: tiny sigma
    assert 0 < sigma < PLD_MIN_NOISE


def test_delta_one_and_non_finite_numbers_are_refused():
    import math

    from common.accounting import Phase, calibrate_noise, compute_epsilon
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="delta"):
        compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1.0)
    for bad in (math.nan, math.inf, 0.0):
        with pytest.raises(ConfigError, match="noise-multiplier"):
            Phase(bad, 0.1, 10)
    with pytest.raises(ConfigError, match="epsilon"):
        calibrate_noise(math.nan, 1e-5, 0.1, 10)
