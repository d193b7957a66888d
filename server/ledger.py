"""The server's privacy ledger: every client's composed DP events and epsilon per round.

Sample-level DP (DESIGN.md §1): a client spends privacy only in the rounds it takes
part in; nothing is claimed for client sampling. A sampled client's round is recorded
*when it is sent* (conservatively: a client that fails after training may still have
spent it), so a failure never under-counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from common.accounting import Phase, PrivacyTracker, budget_epsilon, compute_epsilon
from common.errors import BudgetError


class PrivacyLedger:
    """``private=False`` (a non-private run): nothing is charged and every epsilon it reports
    is infinite, never 0 (which would read as perfectly private)."""

    def __init__(
        self, *, delta: float, accountant: str, target_epsilon: float | None, private: bool = True
    ) -> None:
        self.private = private
        self.delta = delta
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.clients: dict[str, PrivacyTracker] = {}
        self.history: dict[str, list[dict]] = {}

    def _tracker(self, client: str) -> PrivacyTracker:
        if client not in self.clients:
            self.clients[client] = PrivacyTracker(
                delta=self.delta, accountant=self.accountant, target_epsilon=self.target_epsilon
            )
            self.history[client] = []
        return self.clients[client]

    def _epsilon(self, phases: list[Phase]) -> float:
        return compute_epsilon(phases=phases, delta=self.delta, accountant=self.accountant)

    def epsilon_after(self, client: str, phase: Phase) -> float:
        return self._epsilon(self._tracker(client)._merge(phase))

    def check_round(self, planned: dict[str, Phase]) -> dict[str, float]:
        """An upper bound on the epsilon each client would reach (fine-grid wherever it
        decides the check, :func:`~common.accounting.budget_epsilon`); BudgetError naming
        those that would exceed the target."""
        after = {
            c: budget_epsilon(
                self._tracker(c)._merge(ph),
                delta=self.delta,
                accountant=self.accountant,
                target=self.target_epsilon,
            )
            for c, ph in planned.items()
        }
        if self.target_epsilon is not None:
            over = {c: e for c, e in after.items() if e > self.target_epsilon * (1 + 1e-9)}
            if over:
                worst = ", ".join(f"{c}: {e:.4f}" for c, e in sorted(over.items())[:5])
                raise BudgetError(
                    f"the next round would take {len(over)} client(s) past the target epsilon "
                    f"{self.target_epsilon:g} (delta {self.delta:g}): {worst}; stopping before it"
                )
        return after

    def record(self, client: str, server_round: int, phase: Phase) -> float:
        tracker = self._tracker(client)
        tracker.spend(phase)
        eps = self._epsilon(tracker.phases)
        self.history[client].append(
            {"round": server_round, **phase.to_dict(), "epsilon": eps, "total_steps": tracker.steps}
        )
        return eps

    def epsilon(self, client: str) -> float:
        if not self.private:
            return math.inf
        tracker = self.clients.get(client)
        return 0.0 if tracker is None or not tracker.phases else self._epsilon(tracker.phases)

    def summary(self, clients: Iterable[str] | None = None) -> dict[str, float]:
        if not self.private:
            return {"max_epsilon": math.inf, "mean_epsilon": math.inf}
        names = list(self.clients if clients is None else clients)
        eps = [self.epsilon(c) for c in names]
        return {
            "max_epsilon": max(eps) if eps else 0.0,
            "mean_epsilon": sum(eps) / len(eps) if eps else 0.0,
        }

    def to_dict(self) -> dict:
        return {
            "private": self.private,
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "clients": {
                c: {
                    "epsilon": self.epsilon(c),
                    "phases": [p.to_dict() for p in t.phases],
                    "rounds": self.history[c],
                }
                for c, t in sorted(self.clients.items())
            },
            **self.summary(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        ledger = cls(
            delta=data["delta"],
            accountant=data["accountant"],
            target_epsilon=data["target_epsilon"],
            private=bool(data.get("private", True)),
        )
        for c, entry in data["clients"].items():
            t = ledger._tracker(c)
            t.phases = [Phase(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in entry["phases"]]
            ledger.history[c] = list(entry["rounds"])
        return ledger
