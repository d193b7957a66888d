"""Server optimizers on the aggregated (already private) update, and learning-rate schedules.

The server's aggregated update ``Δ_t`` (the weighted average of the clients' released
updates, DESIGN.md §3) is a pseudo-gradient: ``x_{t+1} = x_t + step(Δ_t)``. Everything here
is post-processing of released quantities, so it costs no privacy.

The formulas are those of Reddi et al. 2021 ("Adaptive Federated Optimization"), as in
Flower's ``flwr.serverapp.strategy`` (FedAvgM, FedAdagrad, FedAdam, FedYogi), written for a
flat parameter vector with a mask: coordinates outside the mask neither move nor update
their optimizer state (they receive no update and no noise). One difference from Flower:
FedAdam's bias correction counts the server optimizer's own steps ``t = 1, 2, ...``
(Kingma & Ba 2015) where Flower uses ``server_round + 1``.

- ``fedavg``:     x += η Δ
- ``fedavgm``:    v = μ v + Δ;                            x += η v       (Hsu et al. 2019)
- ``fedadagrad``: m = β1 m + (1-β1) Δ; v = v + Δ²;          x += η m / (√v + τ)
- ``fedadam``:    m = β1 m + (1-β1) Δ; v = β2 v + (1-β2) Δ²; x += η_t m / (√v + τ),
                  η_t = η √(1-β2^t) / (1-β1^t)
- ``fedyogi``:    m as Adam; v = v - (1-β2) Δ² sign(v - Δ²); x += η m / (√v + τ)
"""

from __future__ import annotations

import math

import torch

from common.config import LR_SCHEDULES, SERVER_OPTIMIZERS


def lr_factor(schedule: str, index: int, total: int) -> float:
    """Multiplier of the base learning rate at position ``index`` (0-based) of ``total``.

    ``constant``: 1. ``cosine``: ½(1 + cos(π·index/total)), from 1 down towards 0 (never 0
    inside the plan). ``linear``: 1 - index/total.
    """
    if total <= 0 or index < 0:
        raise ValueError(f"lr schedule position {index} of {total}")
    frac = min(index, total) / total
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return 1.0 - frac
    raise ValueError(f"unknown lr schedule '{schedule}' ({', '.join(LR_SCHEDULES)})")


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS` over a flat vector of ``d`` parameters."""

    def __init__(
        self,
        kind: str,
        d: int,
        *,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer '{kind}' ({', '.join(SERVER_OPTIMIZERS)})")
        self.kind = kind
        self.d = d
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m = torch.zeros(d, dtype=torch.float64)  # FedAvgM velocity, or the first moment
        self.v = torch.zeros(d, dtype=torch.float64)  # second moment (adaptive methods)
        self.t = 0

    def step(self, params: torch.Tensor, delta: torch.Tensor, *, lr: float, mask: torch.Tensor | None = None):
        """The new flat parameters after applying the aggregated update ``delta``."""
        if self.kind == "fedavg":  # in the parameters' own precision (as before server optimizers)
            self.t += 1
            delta = delta.to(params.dtype)
            return params + lr * (delta if mask is None else delta * mask.to(delta.device, delta.dtype))
        delta = delta.double()
        act = torch.ones(self.d, dtype=torch.bool) if mask is None else mask.cpu().bool()
        g = delta[act]
        self.t += 1
        if self.kind == "fedavgm":
            self.m[act] = self.momentum * self.m[act] + g
            self.m[~act] = 0.0  # a frozen coordinate does not remember (nor move later through it)
            move = self.m[act]
        else:
            m = self.beta1 * self.m[act] + (1.0 - self.beta1) * g
            v = self.v[act]
            g2 = g * g
            if self.kind == "fedadagrad":
                v = v + g2
                eta = lr
            elif self.kind == "fedadam":
                v = self.beta2 * v + (1.0 - self.beta2) * g2
                eta = lr * math.sqrt(1.0 - self.beta2**self.t) / (1.0 - self.beta1**self.t)
            else:  # fedyogi
                v = v - (1.0 - self.beta2) * g2 * torch.sign(v - g2)
                eta = lr
            self.m[act], self.v[act] = m, v
            move = (eta / lr) * m / (torch.sqrt(v) + self.tau)
        out = params.detach().double().clone()
        out[act] += lr * move
        return out.to(params.dtype)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "m": self.m.clone(), "v": self.v.clone(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"server optimizer state is for '{state.get('kind')}', not '{self.kind}'")
        self.m, self.v, self.t = state["m"].clone(), state["v"].clone(), int(state["t"])
