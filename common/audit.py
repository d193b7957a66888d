"""One-run privacy auditing (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS).

m canaries are each included in the training set independently with probability 1/2.
After training, the auditor scores every canary, guesses "included" for the k+ highest
scores and "excluded" for the k- lowest, and abstains on the rest. Under eps-DP, the
number of correct guesses among r = k+ + k- is stochastically dominated by
Binomial(r, e^eps / (1 + e^eps)) (Theorem 3.1 of the paper, pure-DP case). The empirical
lower bound is the smallest eps that this test cannot reject at confidence 1 - beta.

Approximations (stated, conservative): the delta of (eps, delta)-DP is handled by adding
``m * delta`` to the tail probability (it can only lower the bound), and choosing the best
of several abstention levels is paid for with a Bonferroni correction (beta / #levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binom


def tail_probability(num_guesses: int, num_correct: int, epsilon: float) -> float:
    """P[Binomial(r, e^eps/(1+e^eps)) >= v]."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(binom.sf(num_correct - 1, num_guesses, p))


def epsilon_lower_bound(
    num_guesses: int, num_correct: int, *, beta: float = 0.05, delta_slack: float = 0.0
) -> float:
    """Largest eps rejected at level beta: the empirical lower bound (0 if none is)."""
    if num_guesses <= 0:
        return 0.0
    if not 0 <= num_correct <= num_guesses:
        raise ValueError(f"{num_correct} correct out of {num_guesses} guesses")

    def rejected(eps: float) -> bool:
        return tail_probability(num_guesses, num_correct, eps) + delta_slack <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2
        if hi > 100:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    beta: float = 0.05,
    delta: float = 0.0,
    guess_fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
) -> dict:
    """Best lower bound over abstention levels (guessing the top/bottom fraction/2 each)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.shape[0]
    order = np.argsort(-scores, kind="stable")
    level_beta = beta / len(guess_fractions)
    best: dict = {}
    for frac in guess_fractions:
        k = max(1, int(round(frac * m / 2)))
        if 2 * k > m:
            k = m // 2
        top, bottom = order[:k], order[m - k :]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(2 * k, correct, beta=level_beta, delta_slack=m * delta)
        if not best or eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "guesses": 2 * k, "correct": correct}
    return {**best, "canaries": m, "beta": beta}
