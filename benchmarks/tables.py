"""Markdown tables for docs/BENCHMARKS.md from the benchmarks' JSON files.

python -m benchmarks.tables docs/data/bench_step_cpu_mnist.json docs/data/bench_sim.json ...
"""

from __future__ import annotations

import json
import sys


def _rows(path: str) -> list[dict]:
    with open(path) as fh:
        data = json.load(fh)
    return data["rows"] if isinstance(data, dict) else data


def step_table(rows: list[dict]) -> str:
    """The step table; with an ``opacus-ghost`` reference (newer files) a column for it."""
    ghost = any(r.get("ratio_opacus_ghost") is not None for r in rows)
    out = [
        "| model | batch | method | median ms | peak MB | × non-private | × Opacus |"
        + (" × Opacus ghost |" if ghost else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if ghost else ""),
    ]

    def ratio(v) -> str:
        return "–" if v is None else f"{v:.2f}"

    for r in rows:
        out.append(
            f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['median_ms']:.1f} | {r['peak_mb']:,.0f} "
            f"| {ratio(r['ratio_nonprivate'])} | {ratio(r['ratio_opacus'])} |"
            + (f" {ratio(r.get('ratio_opacus_ghost'))} |" if ghost else "")
        )
    return "\n".join(out)


def sim_table(rows: list[dict]) -> str:
    out = [
        "| clients | examples/silo | local steps | s/round | clients' phase s | ideal s | ratio | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['clients']} | {r['examples_per_client']} | {r['local_steps']} (B = {r['batch_size']}) "
            f"| {r['round_seconds_median']:.2f} | {r.get('client_phase_seconds_median', float('nan')):.2f} "
            f"| {r['ideal_round_seconds']:.2f} | {r['overhead_ratio']:.2f} | {r['peak_rss_mb']:,.0f} MB |"
        )
    return "\n".join(out)


def accounting_table(rows: list[dict]) -> str:
    out = ["| what | ours (s) | PLDAccountant (s) | speed-up |", "|---|---|---|---|"]
    for r in rows:
        ref = "" if r["pldaccountant_seconds"] is None else f"{r['pldaccountant_seconds']:.3f}"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        out.append(f"| {r['what']} | {r['seconds']:.3f} | {ref} | {speed} |")
    return "\n".join(out)


def render(path: str) -> str:
    rows = _rows(path)
    if not rows:
        return f"({path}: no rows)"
    first = rows[0]
    if "ratio_opacus" in first:
        return step_table(rows)
    if "overhead_ratio" in first:
        return sim_table(rows)
    if "pldaccountant_seconds" in first:
        return accounting_table(rows)
    raise ValueError(f"{path}: not a bench_step, bench_sim or bench_accounting file")


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        print(f"<!-- {path} -->\n{render(path)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
