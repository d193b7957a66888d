"""Coordinate-wise adaptive clipping statistics (AdaCliP, Pichapati et al. 2019).

DESIGN.md §2, Phase 2 step 6, computed from the *released* gradient only::

    m <- beta1 m + (1 - beta1) g_hat
    v  = (g_hat - m)^2 - noise_std^2          (noise_std_j = b_j sigma C / (q n), public)
    s <- beta2 s + (1 - beta2) clamp(v, h1, h2)
    a  = m,   b_j = base * w_j,   w_j ∝ s_j^(1/4) ("optimal") or s_j^(1/2) ("sqrt")

Both averages are bias-corrected (as in Adam). ``w`` is normalised to mean(w^2) = 1 over
the active coordinates (``base`` = 1 in training), so with uniform statistics the clip
``C`` of standardized rows is exactly the flat DP-SGD clip and the total noise energy is
DP-SGD's; adaptivity only redistributes clipping budget and noise across coordinates
(s^(1/4) minimises the expected noise, AdaCliP Thm. 3). A separate clip norm for the
standardized rows would be redundant: scaling C and b together changes nothing.
"""

from __future__ import annotations

import torch

from common.privacy import ReleasedGradient


class AdaClipStatistics:
    """Running mean ``m`` and variance ``s`` of released gradients."""

    def __init__(
        self,
        d: int,
        *,
        beta1: float = 0.99,
        beta2: float = 0.9,
        h1: float = 1e-10,
        h2: float = 1e2,
        scale_rule: str = "optimal",
        device: torch.device | str = "cpu",
    ) -> None:
        if scale_rule not in ("optimal", "sqrt"):
            raise ValueError(f"unknown scale rule '{scale_rule}' (optimal, sqrt)")
        self.beta1, self.beta2, self.h1, self.h2 = beta1, beta2, h1, h2
        self.scale_rule = scale_rule
        self.m = torch.zeros(d, device=device)
        self.s = torch.zeros(d, device=device)
        self.t1 = torch.zeros(d, device=device)  # per-coordinate update counts (bias correction)

    def update_from_released(self, released: ReleasedGradient) -> None:
        """One AdaCliP update on the coordinates that were released (active)."""
        if not isinstance(released, ReleasedGradient):
            raise TypeError("clipping statistics are updated from ReleasedGradient only (after noise)")
        g = released.values
        active = released.mask
        m_new = self.beta1 * self.m + (1 - self.beta1) * g
        t_new = self.t1 + 1
        m_hat = m_new / (1 - self.beta1**t_new)
        v = (g - m_hat).square() - released.noise_std.square()
        s_new = self.beta2 * self.s + (1 - self.beta2) * v.clamp(self.h1, self.h2)
        if active is None:
            self.m, self.s, self.t1 = m_new, s_new, t_new
        else:
            self.m = torch.where(active, m_new, self.m)
            self.s = torch.where(active, s_new, self.s)
            self.t1 = torch.where(active, t_new, self.t1)

    def center(self) -> torch.Tensor:
        """``a``: the bias-corrected mean (0 where nothing was released yet)."""
        denom = 1 - self.beta1**self.t1
        return torch.where(self.t1 > 0, self.m / denom.clamp_min(1e-12), torch.zeros_like(self.m))

    def variance(self) -> torch.Tensor:
        denom = 1 - self.beta2**self.t1
        s_hat = self.s / denom.clamp_min(1e-12)
        return torch.where(self.t1 > 0, s_hat, torch.full_like(self.s, float("nan")))

    def scale(self, mask: torch.Tensor | None, base: float) -> torch.Tensor:
        """``b``: per-coordinate scale, ``base * w`` with mean(w^2) = 1 on active coordinates.

        Coordinates without statistics yet get the mean weight of the others (or 1).
        """
        s_hat = self.variance()
        w = s_hat.clamp_min(self.h1).pow(0.25 if self.scale_rule == "optimal" else 0.5)
        known = ~torch.isnan(s_hat)
        sel = known if mask is None else known & mask
        fill = w[sel].mean() if bool(sel.any()) else torch.tensor(1.0, device=w.device)
        w = torch.where(known, w, fill)
        active = torch.ones_like(known) if mask is None else mask
        rms = w[active].square().mean().sqrt() if bool(active.any()) else torch.tensor(1.0)
        return base * w / rms.clamp_min(1e-30)

    def reset(self) -> None:
        """Forget everything (a client without statistics yet)."""
        self.m.zero_()
        self.s.zero_()
        self.t1.zero_()

    def state(self) -> dict[str, torch.Tensor]:
        return {"m": self.m.clone(), "s": self.s.clone(), "t": self.t1.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.m = state["m"].to(self.m.device).float()
        self.s = state["s"].to(self.s.device).float()
        self.t1 = state["t"].to(self.t1.device).float()
