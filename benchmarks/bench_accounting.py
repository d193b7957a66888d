"""Cost of the privacy accounting a federated round needs, ours against dp-accounting's PLDAccountant.

Per round the server checks every client's budget before sending and records the spend
after; every client checks its own budget. With dp-accounting's ``PLDAccountant`` each of
those is a fresh accountant that rebuilds the PLD of one subsampled Gaussian release
(~1 s at the default grid, mostly Python). ``common.accounting`` builds that PLD once per
(sigma, q) and process, settles checks on a coarse pessimistic grid when it already
proves the budget holds, and calibrates on a 1e-3 grid before refining; its epsilons are
bit-identical to ``PLDAccountant`` (tests/test_accounting.py).

    python -m benchmarks.bench_accounting --json --out docs/data/bench_accounting.json
    python -m benchmarks.bench_accounting --smoke --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _timed(fn) -> tuple[float, float]:
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def run(
    *, sigma: float, q: float, steps_per_round: int, rounds: int, target: float, delta: float
) -> list[dict]:
    from dp_accounting import pld

    from common import accounting as A

    A._epsilon_of_phases.cache_clear()
    A._step_pld.cache_clear()
    rows = []

    def reference(steps: int) -> float:
        acc = pld.PLDAccountant()
        acc.compose(A.compose([A.Phase(sigma, q, steps)]))
        return acc.get_epsilon(delta)

    def row(what: str, seconds: float, ref_seconds: float | None, eps: float | None) -> None:
        rows.append(
            {
                "what": what,
                "seconds": round(seconds, 4),
                "pldaccountant_seconds": None if ref_seconds is None else round(ref_seconds, 4),
                "speedup": None if not ref_seconds else round(ref_seconds / max(seconds, 1e-9), 1),
                "epsilon": eps,
            }
        )

    # noise calibration for the whole plan
    total = steps_per_round * rounds
    sig, t_cal = _timed(lambda: A.calibrate_noise(target, delta, q, total))
    row(f"calibrate sigma for {total} steps at q={q:g} to epsilon {target:g}", t_cal, None, None)
    rows[-1]["sigma"] = sig
    A._epsilon_of_phases.cache_clear()
    A._step_pld.cache_clear()
    # the same history as the server's ledger records it, round by round
    for r in (1, 2, rounds):
        steps = r * steps_per_round
        phases = [A.Phase(sigma, q, steps)]
        eps, t_ours = _timed(lambda p=phases: A.compute_epsilon(phases=p, delta=delta))
        ref, t_ref = _timed(lambda s=steps: reference(s))
        if eps != ref:
            raise AssertionError(f"epsilon differs from PLDAccountant: {eps} vs {ref}")
        row(f"ledger epsilon after round {r} ({steps} steps)", t_ours, t_ref, eps)
        A._epsilon_of_phases.cache_clear()  # a new history each round: only the step PLD is reused
    # a client's budget check for its next round (coarse grid first)
    phases = [A.Phase(sigma, q, (rounds - 1) * steps_per_round)]
    tracker = A.PrivacyTracker(
        delta=delta, target_epsilon=A.compute_epsilon(phases=phases, delta=delta) * 1.5
    )
    tracker.phases = phases
    A._epsilon_of_phases.cache_clear()
    _, t_check = _timed(lambda: tracker.check(A.Phase(sigma, q, steps_per_round)))
    _, t_ref = _timed(lambda: reference(rounds * steps_per_round))
    row("client budget check before a round (well within budget)", t_check, t_ref, None)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigma", type=float, default=0.9)
    p.add_argument("--sample-rate", type=float, default=256 / 5400, help="B=256 of a 5,400-example silo")
    p.add_argument("--steps-per-round", type=int, default=21)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="few steps, a few seconds (CI)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.sigma, args.sample_rate, args.steps_per_round, args.rounds = 2.0, 0.05, 3, 3
    rows = run(
        sigma=args.sigma,
        q=args.sample_rate,
        steps_per_round=args.steps_per_round,
        rounds=args.rounds,
        target=args.target,
        delta=args.delta,
    )
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            ref = f" (PLDAccountant {r['pldaccountant_seconds']:.3f} s)" if r["pldaccountant_seconds"] else ""
            print(f"{r['what']}: {r['seconds']:.3f} s{ref}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"command": "python -m benchmarks.bench_accounting " + " ".join(sys.argv[1:]), "rows": rows},
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
