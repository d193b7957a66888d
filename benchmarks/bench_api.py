"""The documented functional API against the engine's own DP-SGD step, paired: the steps
run interleaved in one process (same load, same thread count), so their ratio holds on a
busy machine too.

    python -m benchmarks.bench_api [--batch 256] [--iters 25] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_step import make_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-cnn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = {
        m: make_step(m, args.model, args.batch, torch.device("cpu"), 1024)
        for m in ("nonprivate", "dpsgd", "api")
    }
    for f in steps.values():
        f()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.iters):
        for m, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) * 1000 for m, v in times.items()}
    result = {
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "iters": args.iters,
        "median_ms": med,
        "api_over_engine_dpsgd": med["api"] / med["dpsgd"],
        "api_over_nonprivate": med["api"] / med["nonprivate"],
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
