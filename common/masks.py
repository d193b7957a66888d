"""Importance scores, top-k masks and progressive unfreezing (AdaDPIGU, arXiv 2507.06525 §4).

DP-correct version (DESIGN.md §2): importance accumulates over *released* gradients
only (:class:`~common.privacy.ReleasedGradient`), never over clipped per-sample
gradients before noise as the published code does.

- ``squared`` (default): ``s_j = mean_t(g_hat_{t,j}^2) - mean_t(noise_std_{t,j}^2)``, an
  unbiased estimate of ``mean_t(E[g_{t,j}])^2`` + variance, debiased for the known noise.
- ``abs``: ``s_j = mean_t |g_hat_{t,j}|`` (the paper's choice).

A ranking orders coordinates by importance (ties: lower index first). The mask at
ratio r is the first ``ceil(r d)`` coordinates of the ranking, so masks for growing r
are nested: unfreezing never re-freezes and always opens the most important frozen
coordinates first.

Dynamic mask (``mask-refresh`` m > 0, the paper's own proposed next step): the ranking is
re-scored every m stages from :class:`MovementScores`, the squared change of the weights
over the last window (post-processing of released updates, no privacy cost). A dynamic
mask may re-freeze coordinates whose movement fell behind others'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from common.privacy import ReleasedGradient


class ImportanceAccumulator:
    """Running sums of released gradients for importance (released tensors only)."""

    def __init__(self, d: int, estimator: str = "squared", device: torch.device | str = "cpu") -> None:
        if estimator not in ("squared", "abs"):
            raise ValueError(f"unknown importance estimator '{estimator}' (squared, abs)")
        self.estimator = estimator
        self.total = torch.zeros(d, device=device, dtype=torch.float64)
        self.noise_var = torch.zeros(d, device=device, dtype=torch.float64)
        self.steps = 0

    def reset(self) -> None:
        self.total.zero_()
        self.noise_var.zero_()
        self.steps = 0

    def update_from_released(self, released: ReleasedGradient) -> None:
        if not isinstance(released, ReleasedGradient):
            raise TypeError("importance is updated from ReleasedGradient only (after noise)")
        g = released.values.double()
        self.total += g.square() if self.estimator == "squared" else g.abs()
        self.noise_var += released.noise_std.double().square()
        self.steps += 1

    def scores(self) -> torch.Tensor:
        return importance_scores(self.total, self.noise_var, self.steps, self.estimator)


def importance_scores(
    total: torch.Tensor, noise_var: torch.Tensor, steps: int, estimator: str
) -> torch.Tensor:
    """Scores from released sums (also used by the server on aggregated client sums)."""
    if steps <= 0:
        return torch.zeros_like(total)
    mean = total / steps
    if estimator == "squared":
        return mean - noise_var / steps
    return mean


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Coordinates from most to least important; ties keep the lower index first."""
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    return torch.sort(s, descending=True, stable=True).indices


def top_k_count(ratio: float, d: int) -> int:
    """``ceil(r d)`` with a guard against floating error (0.6 * 10 -> 6, not 7)."""
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio}")
    return min(d, max(1, math.ceil(round(ratio * d, 9))))


class MaskBuilder:
    """Masks for any ratio from one fixed ranking (global or per layer).

    ``sizes`` are the parameter tensors' sizes; with ``scope="per-layer"`` each tensor
    keeps its own ``ceil(r d_l)`` most important coordinates.
    """

    def __init__(self, scores: torch.Tensor, sizes: Sequence[int], scope: str = "global") -> None:
        if scope not in ("global", "per-layer"):
            raise ValueError(f"unknown mask scope '{scope}' (global, per-layer)")
        if scores.numel() != sum(sizes):
            raise ValueError(f"{scores.numel()} scores for {sum(sizes)} parameters")
        self.d = int(scores.numel())
        self.scope = scope
        self.sizes = list(sizes)
        self.device = scores.device
        if scope == "global":
            self.order = [ranking(scores)]
        else:
            self.order = [ranking(s) for s in torch.split(scores, self.sizes)]

    def mask(self, ratio: float) -> torch.Tensor:
        out = torch.zeros(self.d, dtype=torch.bool, device=self.device)
        if self.scope == "global":
            out[self.order[0][: top_k_count(ratio, self.d)]] = True
            return out
        offset = 0
        for n, order in zip(self.sizes, self.order):
            out[offset + order[: top_k_count(ratio, n)]] = True
            offset += n
        return out


class MovementScores:
    """Importance from how far the released updates moved each weight (dynamic masks).

    A window starts at weights ``theta_0``; at its end each coordinate that was active
    throughout the window scores ``(theta_1 - theta_0)^2 / (sum of learning rates)^2``,
    the square of its mean released step, divided by the mean of those scores over the
    coordinates measured (scores of different windows are compared on one scale although
    gradients shrink as training goes on). Coordinates frozen at some point of the window
    were not measured and keep their last score. The first window (the importance phase,
    all coordinates active) scores every coordinate.
    """

    def __init__(self, d: int) -> None:
        self.d = d
        self.scores = torch.zeros(d, dtype=torch.float64)
        self.start: torch.Tensor | None = None
        self.measured = torch.ones(d, dtype=torch.bool)
        self.lr_sum = 0.0

    def begin(self, flat: torch.Tensor) -> None:
        """Start a window at these weights."""
        self.start = flat.detach().to("cpu", torch.float64).clone()
        self.measured = torch.ones(self.d, dtype=torch.bool)
        self.lr_sum = 0.0

    def observe(self, mask: torch.Tensor | None, lr: float) -> None:
        """One update of the window, made with ``mask`` active (None: all) and step ``lr``."""
        if mask is not None:
            self.measured &= mask.detach().to("cpu", torch.bool)
        self.lr_sum += float(lr)

    def refresh(self, flat: torch.Tensor) -> torch.Tensor:
        """End the window at ``flat``: re-score the measured coordinates, start the next
        window there, and return the scores of every coordinate."""
        if self.start is None:
            raise RuntimeError("MovementScores.refresh before begin")
        if self.lr_sum <= 0 or not bool(self.measured.any()):
            self.begin(flat)
            return self.scores.clone()
        now = flat.detach().to("cpu", torch.float64)
        fresh = ((now - self.start) / self.lr_sum).square()[self.measured]
        mean = float(fresh.mean())
        if math.isfinite(mean) and mean > 0:
            self.scores[self.measured] = fresh / mean
        self.begin(now)
        return self.scores.clone()

    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "start": None if self.start is None else self.start.clone(),
            "measured": self.measured.clone(),
            "lr_sum": self.lr_sum,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].clone()
        self.start = None if state["start"] is None else state["start"].clone()
        self.measured = state["measured"].clone()
        self.lr_sum = float(state["lr_sum"])


class UnfreezeSchedule:
    """Retention ratio r per stage (epoch or round) of the training phase.

    ``linear``: r0 at the first stage, r_max at the last, linear in between.
    ``none``: r0 throughout (static mask). ``steps``: an explicit list, last value held.
    """

    def __init__(self, kind: str, r0: float, r_max: float, values: Sequence[float] = ()) -> None:
        if kind not in ("linear", "none", "steps"):
            raise ValueError(f"unknown schedule '{kind}'")
        if kind == "steps" and not values:
            raise ValueError("a steps schedule needs values")
        self.kind, self.r0, self.r_max, self.values = kind, float(r0), float(r_max), tuple(values)

    def ratio(self, stage: int, num_stages: int) -> float:
        if stage < 0 or num_stages <= 0:
            raise ValueError(f"stage {stage} of {num_stages}")
        if self.kind == "none":
            return self.r0
        if self.kind == "steps":
            return self.values[min(stage, len(self.values) - 1)]
        if num_stages == 1:
            return self.r_max
        frac = min(stage, num_stages - 1) / (num_stages - 1)
        return self.r0 + (self.r_max - self.r0) * frac

    def to_dict(self) -> dict:
        return {"kind": self.kind, "r0": self.r0, "r_max": self.r_max, "values": list(self.values)}


def pack_mask(mask: torch.Tensor) -> bytes:
    """Bool mask -> packed bits (1 bit per coordinate, little-endian within a byte)."""
    import numpy as np

    return np.packbits(mask.detach().cpu().numpy().astype(bool), bitorder="little").tobytes()


def unpack_mask(data: bytes, d: int) -> torch.Tensor:
    import numpy as np

    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=d, bitorder="little")
    if bits.shape[0] != d:
        raise ValueError(f"packed mask holds {bits.shape[0]} bits, expected {d}")
    return torch.from_numpy(bits.astype(bool))
