"""Flower simulation overhead: wall time per round against the ideal, and peak memory.

The ideal round time is the clients' summed compute divided by the cores Ray may use:
``clients * local_steps * t_step / cores``, where ``t_step`` is one DP step of the same
engine measured serially in this process first. Peak memory is the largest summed RSS of
this process and all its descendants (Ray workers included), sampled every 0.2 s.

    python -m benchmarks.bench_sim --clients 10 50 100 --json --out docs/data/bench_sim.json
    python -m benchmarks.bench_sim --clients 10 --local-steps 1 --rounds 50 --json   # DP-FedSGD rounds
    python -m benchmarks.bench_sim --clients 10 --local-steps 1 --rounds 1000 --json # a long plan
    python -m benchmarks.bench_sim --smoke --json

Columns besides the ratio: ``server_seconds_median`` (the round period minus the clients'
phase: the server's own checks, aggregation, evaluation and files) and
``flower_ray_seconds_median`` (the clients' phase minus their ideal compute: Flower's
messages and Ray's scheduling, what is not ours).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import torch


def _tree(root: int) -> tuple[list[int], dict[int, int]]:
    """``root`` and its descendants, and every process's RSS in pages (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree, rss


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries in every worker, Ray's shared
    object store) divided among the processes sharing them, so sums do not double count."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_memory_mb(root: int) -> tuple[float, float]:
    """(summed RSS, summed PSS) of ``root`` and its descendants, in MB."""
    tree, rss = _tree(root)
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(rss.get(p, 0) for p in tree) * page / 2**20, sum(_pss_kb(p) for p in tree) / 1024


class PeakMemory:
    """Peak summed RSS (counts shared pages once per process) and peak summed PSS (what the
    processes together occupy) of this process tree, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = _tree_memory_mb(os.getpid())
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def step_time(cfg, n_train: int) -> float:
    """Median seconds of one DP step of ``cfg``'s engine on random data (serial)."""
    from common.data import TensorData
    from common.engine import DPEngine, make_generator
    from common.models import build_model_for

    model = build_model_for(cfg)
    eng = DPEngine(
        model,
        cfg,
        n_train=n_train,
        device=torch.device("cpu"),
        noise_generator=make_generator(0, "n"),
        sampling_generator=make_generator(0, "s"),
    )
    data = TensorData(torch.randn(n_train, 1, 28, 28), torch.randint(0, 10, (n_train,)))
    for _ in range(5):
        eng.step(data, mode="flat", noise_multiplier=1.0)
    times = []
    for _ in range(40):
        t = time.perf_counter()
        eng.step(data, mode="flat", noise_multiplier=1.0)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _configs(clients: int, *, per_client: int, rounds: int, batch: int, out_dir: str, local_steps: int = 0):
    from common.config import FederatedConfig, TrainConfig

    cfg = TrainConfig(
        method="dpsgd",
        epsilon=8.0,
        batch_size=batch,
        train_subset=clients * per_client,
        test_subset=1000,
        seed=0,
        out_dir=out_dir,
        validation_fraction=0.1,
    )
    fed = FederatedConfig(
        num_server_rounds=rounds,
        importance_rounds=0,
        local_epochs=1.0,
        local_steps=local_steps,
        min_available_nodes=clients,
        min_train_nodes=clients,
        fraction_evaluate=0.0,
    )
    return cfg, fed


def client_step_time(*, per_client: int, batch: int, local_steps: int = 0) -> tuple[float, int]:
    """One client's DP step time (serial, one thread) and its local steps per round; the
    same for every client count (every silo has ``per_client`` examples). Measured once,
    before any Ray process exists, so that all rows share one ideal per client."""
    from common.federated import ClientPlan

    cfg, fed = _configs(
        1, per_client=per_client, rounds=1, batch=batch, out_dir="unused", local_steps=local_steps
    )
    n_train = int(round(per_client * 0.9))
    plan = ClientPlan.for_silo(cfg, fed, n_train)
    torch.set_num_threads(1)
    return step_time(cfg.replace(sample_rate=plan.sample_rate), n_train), plan.local_steps


def run_one(
    clients: int,
    *,
    per_client: int,
    rounds: int,
    batch: int,
    cores: int,
    out_dir: str,
    t_step: float,
    local_steps: int,
) -> dict:
    from simulations.launcher import simulate

    cfg, fed = _configs(
        clients, per_client=per_client, rounds=rounds, batch=batch, out_dir=out_dir, local_steps=local_steps
    )
    with PeakMemory() as mem:
        t0 = time.time()
        summary = simulate(cfg, fed, num_supernodes=clients, num_cpus=1.0, ray_num_cpus=cores)
        total = time.time() - t0
    if summary is None or "error" in summary:
        raise RuntimeError(f"simulation failed: {summary and summary['error']}")
    with open(os.path.join(summary["run_dir"], "metrics.json")) as fh:
        rows = [r for r in json.load(fh) if r["round"] > 0]
    # a round's full period (including the server's per-round files and checkpoint) is the
    # time between the starts of consecutive rounds
    starts = [r["started_at"] for r in rows]
    periods = [b - a for a, b in zip(starts, starts[1:])] or [rows[0]["seconds"]]
    round_s = statistics.median(periods)
    clients_s = statistics.median(r["seconds_clients"] for r in rows)
    ideal = clients * local_steps * t_step / cores
    return {
        "clients": clients,
        "examples_per_client": per_client,
        "local_steps": local_steps,
        "batch_size": batch,
        "cores": cores,
        "step_ms": t_step * 1e3,
        "round_seconds_median": round_s,
        "client_phase_seconds_median": clients_s,
        "ideal_round_seconds": ideal,
        "overhead_ratio": round_s / ideal,
        "server_seconds_median": statistics.median(
            [b - a for a, b in zip([r["seconds_clients"] for r in rows[:-1]], periods)] or [0.0]
        ),
        "flower_ray_seconds_median": max(clients_s - ideal, 0.0),
        "rounds": len(rows),
        "total_seconds": total,
        "peak_rss_mb": mem.peak,
        "peak_pss_mb": mem.peak_pss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    p.add_argument("--per-client", type=int, default=600, help="examples per silo (MNIST subset)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=0, help="Poisson steps per round (0 = one local epoch)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out-dir", default="runs/bench_sim")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 clients, 1 round, tiny silos (CI)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.per_client, args.rounds = [2], 100, 2
    t_step, local_steps = client_step_time(
        per_client=args.per_client, batch=args.batch_size, local_steps=args.local_steps
    )
    rows = []
    for n in args.clients:
        row = run_one(
            n,
            per_client=args.per_client,
            rounds=args.rounds,
            batch=args.batch_size,
            cores=args.cores,
            out_dir=args.out_dir,
            t_step=t_step,
            local_steps=local_steps,
        )
        rows.append(row)
        print(
            json.dumps(row)
            if args.json
            else f"{n:4d} clients: {row['round_seconds_median']:.2f} s/round vs ideal {row['ideal_round_seconds']:.2f} s "
            f"(x{row['overhead_ratio']:.2f}), peak {row['peak_rss_mb']:.0f} MB RSS, {row['peak_pss_mb']:.0f} MB PSS",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "cores": args.cores,
                    "command": "python -m benchmarks.bench_sim " + " ".join(sys.argv[1:]),
                    "rows": rows,
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
