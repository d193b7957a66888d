"""Flower's deployment runtime (`adadpigu deploy-local`: a SuperLink and one SuperNode per
silo as separate processes): time per message minus its compute.

Each round sends one training message to every silo; the silos train in parallel. The
clients' phase of a round (``seconds_clients`` in metrics.json: from sending to the last
reply) minus the compute of one client's local steps (``local_steps * t_step``, measured
serially in this process first) is what the runtime adds per message: process start-up,
imports, data decoding, (de)serialisation and transport.

    python -m benchmarks.bench_deploy --silos 2 --rounds 6 --json --out docs/data/bench_deploy.json
    python -m benchmarks.bench_deploy --smoke --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-client", type=int, default=600, help="examples per silo (MNIST subset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 silos, 2 rounds (CI)")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--out-dir", default=None, help="where the run folder goes (default: a temporary folder, removed)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.silos, args.rounds, args.per_client = 2, 2, 200
    from benchmarks.bench_sim import _configs, step_time
    from common.federated import ClientPlan
    from simulations.deploy import deploy_local

    cfg, fed = _configs(1, per_client=args.per_client, rounds=1, batch=args.batch_size, out_dir="unused",
                        local_steps=args.local_steps)  # fmt: skip
    n_train = int(round(args.per_client * 0.9))
    plan = ClientPlan.for_silo(cfg, fed, n_train)
    torch.set_num_threads(1)
    t_step = step_time(cfg.replace(sample_rate=plan.sample_rate), n_train)
    overrides = {
        "method": "dpsgd", "epsilon": 8.0, "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "batch-size": args.batch_size, "train-subset": args.silos * args.per_client, "test-subset": 1000,
        "min-available-nodes": args.silos, "min-train-nodes": args.silos, "seed": 0,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        overrides["out-dir"] = args.out_dir or tmp  # never the caller's ./runs
        t0 = time.time()
        result = deploy_local(
            overrides, silos=args.silos, superlink_port=0, base_supernode_port=0, log=lambda s: None
        )
        total = time.time() - t0
        row = _row(args, result, plan, t_step, total)
    print(json.dumps(row) if args.json else
          f"{args.silos} silos: {row['overhead_seconds_per_message']:.2f} s per message beyond its "
          f"{row['compute_seconds_per_message'] * 1e3:.0f} ms of compute (clients' phase "
          f"{row['client_phase_seconds_median']:.2f} s)")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": "python -m benchmarks.bench_deploy " + " ".join(sys.argv[1:]), "rows": [row]}, fh,
                      indent=2)  # fmt: skip
    return 0


def _row(args, result: dict, plan, t_step: float, total: float) -> dict:
    if result["returncode"] != 0 or result["summary"] is None:
        raise SystemExit(f"bench_deploy: the run failed: {result.get('errors')}; logs {result.get('logs')}")
    with open(os.path.join(result["run_dir"], "metrics.json")) as fh:
        rows = [r for r in json.load(fh) if r["round"] > 0]
    clients_s = statistics.median(r["seconds_clients"] for r in rows)
    compute = plan.local_steps * t_step
    row = {
        "silos": args.silos,
        "rounds": len(rows),
        "local_steps": plan.local_steps,
        "step_ms": t_step * 1e3,
        "client_phase_seconds_median": clients_s,
        "compute_seconds_per_message": compute,
        "overhead_seconds_per_message": clients_s - compute,
        "round_seconds_median": statistics.median(r["seconds"] for r in rows),
        "total_seconds": total,
        "cores": os.cpu_count(),
    }
    return row


if __name__ == "__main__":
    sys.exit(main())
