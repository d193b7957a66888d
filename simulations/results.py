"""Reading finished run folders: one row per run (settings + outcome), for tables and plots."""

from __future__ import annotations

import json
import os

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


def collect(root: str) -> list[dict]:
    """One row per run folder under ``root`` (any depth) that has a summary.json."""
    rows = []
    for dirpath, _dirs, files in sorted(os.walk(root)):
        if "summary.json" not in files:
            continue
        with open(os.path.join(dirpath, "summary.json")) as fh:
            summary = json.load(fh)
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
