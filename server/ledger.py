"""The server's privacy ledger: every client's composed DP events and epsilon per round.

Sample-level DP (DESIGN.md §1): a client spends privacy only in the rounds it takes
part in; nothing is claimed for client sampling. A sampled client's round is recorded
*when it is sent* (conservatively: a client that fails after training may still have
spent it), so a failure never under-counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from common.accounting import Phase, PrivacyTracker, accountant_used, budget_epsilon, compute_epsilon
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
        # the entries this process recorded, by round: what :meth:`revoke` may withdraw (a
        # charge read back from disk, an interrupted attempt's, is never withdrawn)
        self._recorded: dict[int, list[dict]] = {}

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

    def record(self, client: str, server_round: int, phase: Phase) -> None:
        """Charge ``phase`` to ``client``. The round's epsilon is derived later
        (:meth:`fill_epsilons`, or :meth:`prefetch` while clients train): the spend itself,
        the phases, is what must be on disk before a round is sent."""
        tracker = self._tracker(client)
        tracker.spend(phase)
        entry = {"round": server_round, **phase.to_dict(), "epsilon": None, "total_steps": tracker.steps}
        self.history[client].append(entry)
        self._recorded.setdefault(server_round, []).append(entry)

    def revoke(self, server_round: int) -> list[str]:
        """Withdraw the charges this attempt at ``server_round`` recorded: only for a round
        whose outputs nobody can ever read (secure aggregation refused to unmask it). A charge
        of the same round from an interrupted attempt (read back with :meth:`from_dict` on a
        resume) stays: its clients may have trained and replied before the interruption.
        The clients it named."""
        withdrawn = {id(h) for h in self._recorded.pop(server_round, [])}
        names = []
        for c, entries in self.history.items():
            kept = [h for h in entries if id(h) not in withdrawn]
            if len(kept) == len(entries):
                continue
            names.append(c)
            tracker = PrivacyTracker(
                delta=self.delta, accountant=self.accountant, target_epsilon=self.target_epsilon
            )
            for h in kept:
                tracker.spend(Phase(h["noise_multiplier"], h["sample_rate"], h["steps"]))
                h["total_steps"] = tracker.steps
            self.clients[c], self.history[c] = tracker, kept
        return names

    def _pending(self) -> list[tuple[str, int, tuple[Phase, ...]]]:
        """(client, index, composed phases) of every history entry whose epsilon is not set."""
        out = []
        for c, entries in self.history.items():
            if all(h["epsilon"] is not None for h in entries):
                continue
            t = PrivacyTracker(delta=self.delta, accountant=self.accountant)
            for i, h in enumerate(entries):
                t.spend(Phase(h["noise_multiplier"], h["sample_rate"], h["steps"]))
                if h["epsilon"] is None:
                    out.append((c, i, tuple(t.phases)))
        return out

    def fill_epsilons(self) -> None:
        """Set the epsilon of every history entry recorded since the last fill."""
        for c, i, phases in self._pending():
            self.history[c][i]["epsilon"] = self._epsilon(list(phases))

    def prefetch(self, planned: dict[str, Phase]) -> None:
        """Compute (into the accountant's per-process cache) what the end of this round and
        the check of the next one will ask for: every pending epsilon and, for ``planned``
        next-round phases, the budget check's. Meant for a thread while clients train."""
        self.fill_epsilons()
        for c, ph in planned.items():
            if c in self.clients:
                budget_epsilon(
                    self.clients[c]._merge(ph), delta=self.delta, accountant=self.accountant,
                    target=self.target_epsilon,
                )  # fmt: skip

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

    def to_dict(self, *, pending: bool = False, round_epsilons: bool = True) -> dict:
        """The whole ledger. ``pending=True`` (the write-ahead copy, written before clients
        train) leaves epsilons not yet derived as null instead of computing them;
        ``round_epsilons=False`` computes each client's total but not every round's (one
        accountant call per client instead of one per round: the own-share ledger, whose
        small noise makes each call slow)."""
        if not pending and round_epsilons:
            self.fill_epsilons()
        summary = {"max_epsilon": None, "mean_epsilon": None, "pending": True} if pending else self.summary()
        return {
            "private": self.private,
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "clients": {
                c: {
                    "epsilon": None if pending else self.epsilon(c),
                    # the accountant that produced it (PLD falls back to RDP's bound at small noise)
                    "epsilon_accountant": accountant_used(t.phases, self.accountant),
                    "phases": [p.to_dict() for p in t.phases],
                    "rounds": self.history[c],
                }
                for c, t in sorted(self.clients.items())
            },
            **summary,
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
