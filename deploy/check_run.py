#!/usr/bin/env python3
"""Check a finished run folder (summary, metrics, privacy ledger) after a deployment run.

    python deploy/check_run.py RUN_DIR --silos 2 --rounds 2 --min-accuracy 0.15
    python deploy/check_run.py RUN_DIR --silos 2 --rounds 4 --expect-failed    # a silo was stopped

Used by ``deploy/compose_e2e.sh`` on the run folders it copies out of the ``runs`` volume.
Standard library only. Checks:

* ``summary.json``: the number of silos, the rounds completed (``--rounds``; with
  ``--expect-failed`` a run that stopped early must say why: ``stop_reason`` ``clients: ...``),
  ``max_epsilon`` within the target, the final test accuracy above ``--min-accuracy``.
* ``metrics.json``: rounds 0..R in order, epsilon never decreasing and within the target.
* ``ledger.json``: one account per silo (``silo-0`` .. ``silo-{N-1}``), each round's training
  charged at most once (a noisy validation or federated test release, sample rate 1, is an
  entry of its own: at most one of each per round), ``total_steps`` the running sum of ``steps``, epsilon never decreasing and
  within the target, the ledger's ``max_epsilon`` the largest account; and for every round,
  the silos charged are exactly as many as the clients the round was sent to (``clients``
  in metrics): nothing double-charged, nothing charged for a silo that was not asked.
* ``--expect-failed``: some round counted a failed client (a SuperNode stopped mid-run).
* ``--federated-test``: the test accuracy is the silos' federated release (no central test
  set), reported with the std of its noise.

Prints one JSON line with what it found; exit code 1 and one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EPS_SLACK = 1e-9


def _load(run: Path, name: str):
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} missing from {run}")
    with open(path) as fh:
        return json.load(fh)


def check(
    run: Path,
    *,
    silos: int,
    rounds: int,
    min_accuracy: float = 0.0,
    expect_failed: bool = False,
    federated_test: bool = False,
) -> tuple[list[str], dict]:
    """Problems found (empty = fine) and a short report."""
    try:
        summary = _load(run, "summary.json")
        metrics = _load(run, "metrics.json")
        ledger = _load(run, "ledger.json")
    except (OSError, ValueError) as exc:
        return [str(exc)], {}
    target = float(summary.get("target_epsilon") or ledger.get("target_epsilon") or math.inf)
    problems: list[str] = []
    _check_summary(summary, ledger, target, silos, rounds, min_accuracy, expect_failed, problems)
    failed = _check_metrics(metrics, summary.get("rounds_completed"), target, expect_failed, problems)
    per_silo = _check_ledger(ledger, metrics, target, silos, problems)
    if federated_test and not (
        str(summary.get("test_source", "")).startswith("federated")
        and float(summary.get("test_accuracy_std") or 0) > 0
    ):
        problems.append(
            f"summary: test_source {summary.get('test_source')!r}, std {summary.get('test_accuracy_std')}: "
            "expected a noisy federated test release"
        )
    report = {
        "run": run.name,
        "silos": silos,
        "rounds_completed": summary.get("rounds_completed"),
        "stop_reason": str(summary.get("stop_reason")),
        "max_epsilon": summary.get("max_epsilon"),
        "target_epsilon": target,
        "test_accuracy_final": summary.get("test_accuracy_final"),
        "test_source": summary.get("test_source"),
        "failed_clients": failed,
        "charged_rounds": per_silo,
    }
    return problems, report


def _check_summary(
    summary: dict, ledger: dict, target: float, silos: int, rounds: int, min_accuracy: float,
    expect_failed: bool, problems: list[str],
) -> None:  # fmt: skip
    """Append the summary's problems."""
    if summary.get("num_silos") != silos:
        problems.append(f"summary: num_silos {summary.get('num_silos')}, expected {silos}")
    done = summary.get("rounds_completed")
    reason = str(summary.get("stop_reason"))
    if expect_failed:
        if not (reason == "completed" and done == rounds) and not (reason.startswith("clients:") and done):
            problems.append(f"summary: {done} rounds, stop_reason {reason!r}: neither completed nor a reason")
    elif done != rounds or reason != "completed":
        problems.append(f"summary: {done} rounds ({reason}), expected {rounds} (completed)")
    max_eps = summary.get("max_epsilon")
    if ledger.get("private", True) and not (
        isinstance(max_eps, int | float) and 0 < max_eps <= target + EPS_SLACK
    ):
        problems.append(f"summary: max_epsilon {max_eps} not within (0, {target}]")
    acc = summary.get("test_accuracy_final")
    if min_accuracy > 0 and not (isinstance(acc, int | float) and acc > min_accuracy):
        problems.append(f"summary: final test accuracy {acc} not above {min_accuracy}")


def _check_metrics(metrics: list, done, target: float, expect_failed: bool, problems: list[str]) -> int:
    """Append the metrics' problems; return the failed clients counted over the rounds."""
    round_numbers = [r.get("round") for r in metrics]
    if round_numbers != list(range(len(metrics))) or (done is not None and len(metrics) != done + 1):
        problems.append(f"metrics: rounds {round_numbers}, expected 0..{done}")
    last = 0.0
    for row in metrics:
        eps = row.get("max_epsilon")
        if eps is None or (isinstance(eps, float) and math.isnan(eps)):
            continue
        if eps + EPS_SLACK < last or eps > target + EPS_SLACK:
            problems.append(
                f"metrics: round {row.get('round')} max_epsilon {eps} (previous {last}, target {target})"
            )
        last = max(last, eps)
    failed = sum(int(r.get("failed_clients") or 0) for r in metrics if r.get("round", 0) > 0)
    if expect_failed and failed < 1:
        problems.append("metrics: no round counted a failed client, but a SuperNode was stopped")
    return failed


def _check_ledger(ledger: dict, metrics: list, target: float, silos: int, problems: list[str]) -> dict:
    """Append the ledger's problems; return the rounds charged per silo."""
    accounts = ledger.get("clients", {})
    want = {f"silo-{i}" for i in range(silos)}
    if set(accounts) != want:
        problems.append(f"ledger: accounts {sorted(accounts)}, expected {sorted(want)}")
    charged: dict[int, int] = {}
    per_silo: dict[str, list[int]] = {}
    for name, acct in sorted(accounts.items()):
        rows = acct.get("rounds", [])
        training = [r for r in rows if float(r.get("sample_rate", 0)) < 1]
        per_silo[name] = [int(r["round"]) for r in training]
        _check_account(name, acct, rows, target, problems)
        for r in training:
            charged[int(r["round"])] = charged.get(int(r["round"]), 0) + 1
    if accounts:
        top = max(float(a.get("epsilon", 0.0)) for a in accounts.values())
        if abs(float(ledger.get("max_epsilon", -1)) - top) > 1e-9:
            problems.append(f"ledger: max_epsilon {ledger.get('max_epsilon')} != largest account {top}")
    if ledger.get("private", True):
        for row in metrics:
            r = row.get("round", 0)
            if r and row.get("clients") is not None and charged.get(r, 0) != int(row["clients"]):
                problems.append(
                    f"ledger: round {r} charged {charged.get(r, 0)} silos, sent to {row['clients']}"
                )
        extra = sorted(set(charged) - {r.get("round") for r in metrics})
        if extra:
            problems.append(f"ledger: rounds {extra} charged but not in metrics")
    return per_silo


def _check_account(name: str, acct: dict, rows: list, target: float, problems: list[str]) -> None:
    seen = [int(r["round"]) for r in rows]
    trained = [int(r["round"]) for r in rows if float(r.get("sample_rate", 0)) < 1]
    released = [int(r["round"]) for r in rows if float(r.get("sample_rate", 0)) >= 1]
    if (
        len(set(trained)) != len(trained)
        or seen != sorted(seen)
        or any(released.count(r) > 2 for r in released)
    ):
        problems.append(f"ledger: {name} charged rounds {seen} (a round twice, or out of order)")
    steps, eps_prev = 0, 0.0
    for r in rows:
        steps += int(r["steps"])
        if int(r["total_steps"]) != steps:
            problems.append(f"ledger: {name} round {r['round']} total_steps {r['total_steps']} != {steps}")
        if float(r["epsilon"]) + EPS_SLACK < eps_prev or float(r["epsilon"]) > target + EPS_SLACK:
            problems.append(f"ledger: {name} round {r['round']} epsilon {r['epsilon']} (target {target})")
        eps_prev = float(r["epsilon"])
    if rows and abs(float(acct.get("epsilon", -1)) - eps_prev) > 1e-9:
        problems.append(f"ledger: {name} epsilon {acct.get('epsilon')} != its last round's {eps_prev}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--silos", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True, help="rounds the plan asked for")
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="final test accuracy must exceed it")
    parser.add_argument("--expect-failed", action="store_true", help="a SuperNode was stopped during the run")
    parser.add_argument(
        "--federated-test", action="store_true", help="no central test set: a noisy federated release"
    )
    args = parser.parse_args(argv)
    problems, report = check(
        args.run_dir,
        silos=args.silos,
        rounds=args.rounds,
        min_accuracy=args.min_accuracy,
        expect_failed=args.expect_failed,
        federated_test=args.federated_test,
    )
    print(json.dumps(report))
    for p in problems:
        print(f"check_run: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
