"""The table of a natural-silo experiment (docs/RESULTS.md, "Chem97"): federated runs, every
silo alone under the same budget (``adadpigu alone``) and the pooled centralized references,
mean ± std over seeds per (model, epsilon), written as CSV and Markdown.

    python -m simulations.own_data_table --federated results/chem97-federated \\
        --pooled results/chem97-pooled --alone results/chem97-alone --out docs/data/chem97
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _key(cfg: dict) -> tuple[str, str]:
    eps = "∞ (non-private)" if cfg.get("method") == "nonprivate" else f"{float(cfg['epsilon']):g}"
    return cfg["model"], eps


def _runs(folder: str) -> dict[tuple[str, str], list[float]]:
    """Finished run folders (summary.json) of a sweep: the released model's test accuracy."""
    out: dict[tuple[str, str], list[float]] = {}
    for path in glob.glob(os.path.join(folder, "**", "summary.json"), recursive=True):
        summary = json.load(open(path))
        cfg = json.load(open(os.path.join(os.path.dirname(path), "config.json")))
        cfg = cfg.get("train", cfg)
        if summary.get("stop_reason", "completed") != "completed":
            continue
        acc = summary.get("test_accuracy_best_val", summary.get("test_accuracy"))
        if acc is not None and not math.isnan(acc):
            out.setdefault(_key(cfg), []).append(acc)
    return out


def _alone(folder: str) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for path in glob.glob(os.path.join(folder, "*", "alone.json")):
        result = json.load(open(path))
        key = _key({"model": result["model"], "method": result["method"], "epsilon": result["epsilon"]})
        out.setdefault(key, []).append(result["test_accuracy_weighted"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--federated", required=True)
    ap.add_argument("--pooled", default=None)
    ap.add_argument("--alone", default=None)
    ap.add_argument("--out", required=True, help="path without extension: .csv and .md are written")
    ap.add_argument("--label", default="federated (10 silos)", help="the federated column's header")
    args = ap.parse_args(argv)
    fed = _runs(args.federated)
    pooled = _runs(args.pooled) if args.pooled else {}
    alone = _alone(args.alone) if args.alone else {}
    keys = sorted(set(fed) | set(alone) | set(pooled), key=lambda k: (k[0], k[1].startswith("∞"), k[1]))
    rows = [
        {
            "model": m,
            "epsilon": e,
            "federated": _mean_std(fed.get((m, e), [])),
            "alone": _mean_std(alone.get((m, e), [])),
            "pooled": _mean_std(pooled.get((m, e), [])),
            "federated_runs": len(fed.get((m, e), [])),
            "alone_runs": len(alone.get((m, e), [])),
            "pooled_runs": len(pooled.get((m, e), [])),
        }
        for m, e in keys
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"| model | ε per silo | {args.label} | each silo alone | pooled centrally |",
        "|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['epsilon']} | {r['federated']} | {r['alone']} | {r['pooled']} |"
            for r in rows
        ),
    ]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
