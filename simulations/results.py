"""Reading finished run folders: one row per run (settings + outcome), for tables and plots."""

from __future__ import annotations

import json
import os
import sys

# summary.json key -> results column
SUMMARY_KEYS = {
    "test_accuracy_best_val": "test_accuracy_best_val",
    "test_accuracy_final": "test_accuracy_final",
    "best_val_accuracy": "best_val_accuracy",
    "epsilon": "epsilon_spent",  # centralized
    "max_epsilon": "epsilon_spent",  # federated: the largest over clients
    "rounds_completed": "rounds_completed",
    "seconds": "seconds",
}


def stopped_early(summary: dict) -> str | None:
    """Why a run stopped before the end of its plan (a federated run's ``stop_reason``:
    budget, too few clients, secure aggregation); None for a run that finished its plan."""
    reason = summary.get("stop_reason", "completed")
    return None if reason == "completed" else str(reason)


def collect(root: str, *, stopped: list[tuple[str, str]] | None = None) -> list[dict]:
    """One row per run folder under ``root`` (any depth) whose summary.json says it finished
    its plan. Runs that stopped early are left out (they are not results of their settings);
    ``stopped``, when given, receives (folder, reason) for each."""
    rows = []
    for dirpath, _dirs, files in sorted(os.walk(root)):
        if "summary.json" not in files:
            continue
        with open(os.path.join(dirpath, "summary.json")) as fh:
            summary = json.load(fh)
        reason = stopped_early(summary)
        if reason is not None:
            if stopped is not None:
                stopped.append((dirpath, reason))
            continue
        config = {}
        if os.path.exists(os.path.join(dirpath, "config.json")):
            with open(os.path.join(dirpath, "config.json")) as fh:
                config = json.load(fh)
        flat = {**config.get("train", config), **config.get("federated", {})} if "train" in config else config
        row = {k: flat.get(k) for k in sorted(flat)}
        for k, col in SUMMARY_KEYS.items():
            if summary.get(k) is not None:
                row[col] = summary[k]
        row["run_dir"] = dirpath
        command = os.path.join(dirpath, "command.txt")
        if os.path.exists(command):
            row["command"] = open(command).read().strip()
        rows.append(row)
    return rows


def collect_finished(*roots: str) -> list[dict]:
    """:func:`collect` over ``roots``, saying on stderr which runs were left out for stopping
    before the end of their plan (what report, compare and plot show)."""
    stopped: list[tuple[str, str]] = []
    rows = [row for root in roots for row in collect(root, stopped=stopped)]
    if stopped:
        print(f"left out {len(stopped)} run(s) that stopped before the end of their plan:", file=sys.stderr)
        for path, reason in stopped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return rows
