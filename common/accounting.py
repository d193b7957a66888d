"""Privacy accounting with Google's ``dp-accounting`` (DESIGN.md §1).

A training history is a composition of DP events, one per phase::

    Composed([SelfComposed(PoissonSampled(q, Gaussian(sigma_pre)), T_pre),
              SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)])

PLD (Koskela et al.; Doroshenko et al. 2022) is the default accountant; RDP (Mironov
2017; Mironov, Talwar & Zhang 2019) an option. Neighbouring relation: add/remove one
example (the relation Poisson-subsampled Gaussian analyses assume).

:func:`calibrate_noise` finds the smallest noise multiplier (to a relative tolerance)
whose plan stays within the target epsilon; it never returns a value that overshoots.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from common.config import ACCOUNTANTS
from common.errors import BudgetError, ConfigError

MAX_NOISE_MULTIPLIER = 1e3
# Below this noise multiplier a PLD grows to GBs and minutes (sigma 0.1: 1.8 GB, 30 s; 0.05:
# 6.8 GB, 100 s) while epsilon is already > ~50. There the RDP epsilon is used instead: an
# upper bound on the PLD one (never optimistic), computed in milliseconds.
PLD_MIN_NOISE = 0.3
MAX_STEPS = 10**8


@dataclass(frozen=True)
class Phase:
    """``steps`` Poisson-subsampled Gaussian releases at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        # ConfigError is a ValueError that the command line reports as one line
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError("noise-multiplier", self.noise_multiplier, "must be a finite number > 0")
        if not (0 < self.sample_rate <= 1):
            raise ConfigError("sample-rate", self.sample_rate, "must be in (0, 1]")
        if not (0 <= self.steps <= MAX_STEPS) or int(self.steps) != self.steps:
            raise ConfigError("steps", self.steps, f"must be an integer in [0, {MAX_STEPS:.0e}]")

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sample_rate < 1:
            step = dp_accounting.PoissonSampledDpEvent(self.sample_rate, gaussian)
        else:
            step = gaussian
        return dp_accounting.SelfComposedDpEvent(step, int(self.steps))

    def to_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


def compose(phases: Sequence[Phase]) -> dp_accounting.DpEvent:
    """One DpEvent for a whole history (empty phases are dropped)."""
    events = [p.event() for p in phases if p.steps > 0]
    if not events:
        return dp_accounting.NoOpDpEvent()
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


# PLD value-discretization intervals. Both give upper bounds on epsilon (dp-accounting's
# pessimistic estimate rounds every privacy loss up); the fine grid is dp-accounting's
# default and is what is reported and calibrated, the coarse one (tens of times faster,
# within ~0.01 of the fine value at epsilon 8 and ~0.3 at epsilon 2) only proves that a
# check passes: see :func:`budget_epsilon`.
PLD_FINE_GRID = 1e-4
PLD_COARSE_GRID = 1e-2
PLD_SEARCH_GRID = 1e-3  # noise calibration's bisection (refined on the fine grid)


def make_accountant(
    accountant: str = "pld", *, grid: float = PLD_FINE_GRID
) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=grid)
    if accountant == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"unknown accountant '{accountant}' (pld, rdp)")


def epsilon_of_event(
    event: dp_accounting.DpEvent, delta: float, accountant: str = "pld", *, grid: float = PLD_FINE_GRID
) -> float:
    acc = make_accountant(accountant, grid=grid)
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return 0.0
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=1)
def _warn_rdp_fallback() -> None:
    logging.getLogger(__name__).warning(
        "noise multiplier below %g: epsilon comes from the RDP accountant (an upper bound on "
        "PLD's, which would need GBs of memory there)",
        PLD_MIN_NOISE,
    )


@functools.lru_cache(maxsize=512)
def _step_pld(noise_multiplier: float, sample_rate: float, grid: float):
    """PLD of one Poisson-subsampled Gaussian release: the expensive part of PLD accounting
    (~1 s at the fine grid, in Python), built once per (sigma, q) in a process."""
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=grid,
        sampling_prob=sample_rate,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _pld_epsilon(phases: Sequence[Phase], delta: float, grid: float) -> float:
    """Exactly what ``PLDAccountant(grid)`` computes for ``compose(phases)`` (same calls in the
    same order), with the single-step PLDs memoised."""
    total = pld.privacy_loss_distribution.identity(value_discretization_interval=grid)
    for p in phases:
        if p.steps == 0:
            continue
        if p.sample_rate < 1:
            part = _step_pld(float(p.noise_multiplier), float(p.sample_rate), grid).self_compose(int(p.steps))
        else:  # T Gaussian releases = one with sigma / sqrt(T) (the accountant's closed form)
            part = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=p.noise_multiplier / math.sqrt(p.steps),
                value_discretization_interval=grid,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
        total = total.compose(part)
    return float(total.get_epsilon_for_delta(delta))


def accountant_used(phases: Sequence[Phase], accountant: str) -> str:
    """The accountant whose epsilon :func:`compute_epsilon` reports for ``phases``: ``rdp``
    where ``pld`` was asked for but a phase's noise is below :data:`PLD_MIN_NOISE` (the RDP
    epsilon, an upper bound on PLD's, is used there); what a result must name.

    >>> accountant_used([Phase(0.25, 0.01, 100)], "pld"), accountant_used([Phase(1.0, 0.01, 100)], "pld")
    ('rdp', 'pld')
    """
    if accountant == "pld" and any(p.steps and p.noise_multiplier < PLD_MIN_NOISE for p in phases):
        return "rdp"
    return accountant


@functools.lru_cache(maxsize=4096)
def _epsilon_of_phases(phases: tuple[Phase, ...], delta: float, accountant: str, grid: float) -> float:
    if not (0 < delta < 1) or not math.isfinite(delta):
        raise ConfigError("delta", delta, "must be in (0, 1): delta = 1 promises nothing")
    if accountant not in ACCOUNTANTS:
        raise ConfigError("accountant", accountant, "allowed: " + ", ".join(ACCOUNTANTS))
    if accountant_used(phases, accountant) != accountant:
        _warn_rdp_fallback()
        accountant = "rdp"  # an upper bound on the PLD epsilon (see PLD_MIN_NOISE)
    if accountant == "pld":
        return _pld_epsilon(phases, delta, grid)
    return epsilon_of_event(compose(phases), delta, accountant, grid=grid)


def compute_epsilon(
    *,
    delta: float,
    accountant: str = "pld",
    phases: Sequence[Phase] | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
) -> float:
    """Epsilon at ``delta`` after ``phases`` (or one phase given by its three numbers).

    >>> round(compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250,
    ...                       delta=1e-5, accountant="rdp"), 3)
    7.329
    """
    if phases is None:
        if noise_multiplier is None or sample_rate is None or steps is None:
            raise ValueError("give phases, or noise_multiplier, sample_rate and steps")
        phases = [Phase(noise_multiplier, sample_rate, steps)]
    # memoised per process: every client of a simulation worker with the same history, and
    # the server's ledger and its checks, share one evaluation
    return _epsilon_of_phases(tuple(phases), float(delta), accountant, PLD_FINE_GRID)


def budget_epsilon(phases: Sequence[Phase], *, delta: float, accountant: str, target: float | None) -> float:
    """An upper bound on epsilon after ``phases``, as cheap as the check against ``target`` allows.

    For PLD the coarse grid is tried first: when its (pessimistic) bound is already within
    ``target`` the check is settled; otherwise, and always when there is no target, the
    fine-grid epsilon is returned. The result is never below the fine-grid epsilon, so
    ``budget_epsilon(...) <= target`` is exactly as strict as the fine-grid check.
    """
    key = (tuple(phases), float(delta), accountant)
    if accountant == "pld" and target is not None:
        coarse = _epsilon_of_phases(*key, PLD_COARSE_GRID)
        if coarse <= target:
            return coarse
    return _epsilon_of_phases(*key, PLD_FINE_GRID)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    accountant: str = "pld",
    fixed_phases: Sequence[Phase] = (),
    rel_tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier (within ``rel_tol``) such that ``fixed_phases`` followed by
    ``steps`` releases at ``sample_rate`` stay within ``target_epsilon``.

    Bisection on sigma, always keeping a feasible upper end, so the result never
    overshoots the target. RDP (fast) gives the bracket for PLD, since PLD <= RDP.
    Raises :class:`BudgetError` when no sigma <= 1000 reaches the target.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("epsilon", target_epsilon, "must be a finite number > 0")
    if not (0 < delta < 1):
        raise ConfigError("delta", delta, "must be in (0, 1): delta = 1 promises nothing")
    if steps <= 0:
        raise BudgetError(f"nothing to calibrate: {steps} steps planned")

    def eps(sigma: float, acc: str) -> float:
        phases = (*fixed_phases, Phase(sigma, sample_rate, steps))
        if acc == "pld-coarse":
            return _epsilon_of_phases(phases, float(delta), "pld", PLD_SEARCH_GRID)
        return compute_epsilon(phases=phases, delta=delta, accountant=acc)

    def search(acc: str, lo: float, hi: float) -> float:
        while eps(hi, acc) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise BudgetError(
                    f"target epsilon {target_epsilon:g} at delta {delta:g} cannot be reached with "
                    f"{steps} steps at sample rate {sample_rate:.4g}"
                    + (" after the fixed phases" if fixed_phases else "")
                    + f" by any noise multiplier <= {MAX_NOISE_MULTIPLIER:g}; "
                    "plan fewer steps or epochs, a smaller sample rate, or a larger epsilon"
                )
        while (hi - lo) > rel_tol * hi:
            mid = 0.5 * (lo + hi)
            if eps(mid, acc) <= target_epsilon:
                hi = mid
            else:
                lo = mid
        return hi

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # RDP's "failed to converge ... excluding this order" noise
    try:
        sigma_rdp = search("rdp", 0.0, 1.0)
    finally:
        absl_logger.setLevel(level)
    if accountant == "rdp" or sigma_rdp < PLD_MIN_NOISE:
        return sigma_rdp  # RDP's sigma is feasible under PLD too (PLD <= RDP)
    # PLD: bisect on a coarser grid (an upper bound on the fine epsilon, so its answer is
    # feasible on the fine grid too), then walk down on the fine grid while the next
    # rel_tol step is still within the target (almost always zero or one fine evaluation)
    hi = search("pld-coarse", 0.0, sigma_rdp)
    while True:
        lower = hi * (1 - rel_tol)
        if eps(lower, accountant) > target_epsilon:
            return hi
        hi = lower


class PrivacyTracker:
    """The composed privacy spend of one data holder (a client, or the central trainer).

    :meth:`check` refuses (``BudgetError``) a phase that would take the holder past the
    target; :meth:`spend` records a phase that was run.
    """

    def __init__(self, *, delta: float, accountant: str = "pld", target_epsilon: float | None = None) -> None:
        self.delta = delta
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.phases: list[Phase] = []

    def _merge(self, phase: Phase) -> list[Phase]:
        """Add ``phase``, merged into the phase of the identical mechanism (same sigma and q)
        wherever it is: composition is commutative, and interleaved events (training rounds
        and validation releases) then keep the list short instead of growing every round."""
        out = list(self.phases)
        for i, p in enumerate(out):
            if p.noise_multiplier == phase.noise_multiplier and p.sample_rate == phase.sample_rate:
                out[i] = Phase(phase.noise_multiplier, phase.sample_rate, p.steps + phase.steps)
                return out
        out.append(phase)
        return out

    def epsilon(self, extra: Phase | None = None) -> float:
        phases = self._merge(extra) if extra is not None else self.phases
        return compute_epsilon(phases=phases, delta=self.delta, accountant=self.accountant)

    def check(self, phase: Phase, *, slack: float = 1e-9) -> float:
        """An upper bound on epsilon after ``phase`` (:func:`budget_epsilon`); BudgetError
        if the fine-grid epsilon would exceed the target."""
        eps = budget_epsilon(
            self._merge(phase), delta=self.delta, accountant=self.accountant, target=self.target_epsilon
        )
        if self.target_epsilon is not None and eps > self.target_epsilon * (1 + slack):
            raise BudgetError(
                f"running {phase.steps} more steps (sigma={phase.noise_multiplier:.4g}, "
                f"q={phase.sample_rate:.4g}) would reach epsilon {eps:.4f} > target "
                f"{self.target_epsilon:g} (delta {self.delta:g}); stopping before it"
            )
        return eps

    def spend(self, phase: Phase) -> None:
        if phase.steps > 0:
            self.phases = self._merge(phase)

    @property
    def steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def to_dict(self) -> dict:
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_accountant": accountant_used(self.phases, self.accountant),
            "target_epsilon": self.target_epsilon,
            "phases": [p.to_dict() for p in self.phases],
        }
