"""The one-run auditor: sound on synthetic scores, positive on a non-private run, never above
the accountant on a DP run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.audit import audit_scores, epsilon_lower_bound, tail_probability
from common.config import TrainConfig
from simulations.audit import run_audit


def randomized_response_scores(eps: float, m: int, seed: int):
    """Each canary's score says 'in' or 'out' correctly with probability e^eps/(1+e^eps)
    (eps-DP randomized response), plus Gaussian jitter that only orders ties."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
    said_in = np.where(truthful, included, ~included)
    scores = np.where(said_in, 1.0, -1.0) + 0.01 * rng.standard_normal(m)
    return scores, included


@pytest.mark.parametrize("true_eps", [1.0, 2.0, 4.0])
def test_lower_bound_is_below_and_close_to_the_true_epsilon(true_eps):
    bounds = [
        audit_scores(*randomized_response_scores(true_eps, 20000, s))["epsilon_lower_bound"] for s in range(5)
    ]
    # sound at 95% confidence per trial: at most one of five seeded trials may exceed, and barely
    assert sum(b > true_eps for b in bounds) <= 1
    assert max(bounds) <= 1.05 * true_eps and np.mean(bounds) <= true_eps
    assert min(bounds) >= 0.7 * true_eps  # strong signal: within 30%


def test_no_signal_gives_zero():
    rng = np.random.default_rng(0)
    res = audit_scores(rng.standard_normal(2000), rng.random(2000) < 0.5)
    assert res["epsilon_lower_bound"] < 0.3


def test_binomial_tail_and_bound_monotone():
    assert tail_probability(100, 50, 0.0) > 0.5
    assert epsilon_lower_bound(100, 100) > epsilon_lower_bound(100, 90) > epsilon_lower_bound(100, 70)
    assert epsilon_lower_bound(100, 50) == 0.0


def small_cfg(data_dir, tmp_path, **kw):
    base = dict(
        train_subset=2000,
        test_subset=300,
        epochs=30,
        batch_size=64,
        seed=0,
        data_dir=data_dir,
        out_dir=str(tmp_path),
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_non_private_run_has_a_clearly_positive_lower_bound(data_dir, tmp_path):
    res = run_audit(
        small_cfg(data_dir, tmp_path, method="nonprivate", lr=0.05), canaries=200, log=lambda s: None
    )
    assert res["epsilon_lower_bound"] > 1.0


@pytest.mark.slow
def test_dp_run_bound_is_not_above_the_accountant(data_dir, tmp_path):
    res = run_audit(
        small_cfg(data_dir, tmp_path, method="dpsgd", epsilon=2.0), canaries=200, log=lambda s: None
    )
    assert res["accountant_epsilon"] <= 2.0
    assert res["epsilon_lower_bound"] <= res["accountant_epsilon"]
