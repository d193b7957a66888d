"""CLI sub-commands that run Flower: ``adadpigu simulate``, ``sweep``, ``report``, ``audit``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time

from common.config import CENTRALIZED_ONLY, CENTRALIZED_ONLY_VALUES, FederatedConfig, refuse_centralized_only
from common.errors import ConfigError, UserError
from simulations.flags import add_setting_flags
from simulations.launcher import simulate
from simulations.processes import kill_descendants


def _add_fed_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, FederatedConfig, "fed")


def _fed_from_args(args: argparse.Namespace) -> FederatedConfig:
    values = {
        k[len("fed_") :].replace("_", "-"): v
        for k, v in vars(args).items()
        if k.startswith("fed_") and v is not None
    }
    return FederatedConfig.from_mapping(values)


@contextlib.contextmanager
def _stop_everything_on_interrupt(grace: float = 10.0):
    """Ctrl-C / SIGTERM during a simulation: let Flower unwind for ``grace`` seconds, then stop
    every process this one started (Ray's included) and exit 130, whatever still hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def reap_then_exit() -> None:
        time.sleep(grace)
        kill_descendants(os.getpid(), grace=2.0)
        print("adadpigu: error: interrupted (stopped after waiting for Flower)", file=sys.stderr, flush=True)
        os._exit(130)

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=reap_then_exit, daemon=True).start()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def cmd_simulate(args: argparse.Namespace, config_from_args) -> int:
    refuse_centralized_only(
        {
            k: getattr(args, "cfg_" + k.replace("-", "_"), None)
            for k in (*CENTRALIZED_ONLY, *CENTRALIZED_ONLY_VALUES)
        }
    )
    cfg = config_from_args(args)
    fed = _fed_from_args(args)
    try:
        with _stop_everything_on_interrupt():
            summary = _simulate_from_args(cfg, fed, args)
    except KeyboardInterrupt:
        kill_descendants(os.getpid(), grace=2.0)
        print(
            "adadpigu: error: interrupted; the run folder (see the [plan] line) resumes with "
            "--resume <run folder>",
            file=sys.stderr,
        )
        return 130
    return _report_simulation(summary, args)


def _simulate_from_args(cfg, fed: FederatedConfig, args: argparse.Namespace) -> dict | None:
    return simulate(
        cfg,
        fed,
        num_supernodes=args.num_supernodes,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        ray_num_cpus=args.ray_num_cpus,
        ray_address=args.ray_address,
        command="adadpigu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )


def _report_simulation(summary: dict | None, args: argparse.Namespace) -> int:
    if summary is None:
        print("adadpigu: error: the federated run did not complete (see the log above)", file=sys.stderr)
        return 2
    if "error" in summary:
        print(f"adadpigu: error: {summary['error']}", file=sys.stderr)
        return 2
    if summary["stop_reason"] != "completed":  # resumable: the run folder says where it stopped
        print(
            f"adadpigu: error: the run stopped after round {summary['rounds_completed']}: "
            f"{summary['stop_reason']} (run folder {summary['run_dir']})",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.file)
    if args.dry_run:
        for cell in sweep.cells():
            print(json.dumps(cell))
        return 0
    rows = run_sweep(sweep)
    print(f"{len(rows)} runs collected in {sweep.out_dir}/results.csv and results.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from simulations.results import collect_finished
    from simulations.sweep import write_tables

    rows = collect_finished(args.dir)
    if not rows:
        raise UserError(f"no finished runs (summary.json) under {args.dir}")
    group = [g for g in args.group.split(",") if g]
    unknown = [g for g in group if not any(g in row for row in rows)]
    if unknown:
        raise ConfigError("group", unknown[0], f"is not a setting of any run under {args.dir}")
    csv_path, md_path = write_tables(rows, args.out or args.dir, group)
    print(open(md_path).read(), end="")
    print(f"({len(rows)} runs; {csv_path})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from simulations.results import collect_finished
    from simulations.sweep import paired_difference

    rows = collect_finished(*args.dir)
    where = " ".join(args.dir)
    if not rows:
        raise UserError(f"no finished runs (summary.json) under {where}")
    pair_on = [k.strip() for k in args.pair_on.split(",") if k.strip()] if args.pair_on else None
    res = paired_difference(rows, by=args.by, a=args.a, b=args.b, pair_on=pair_on)
    if res["pairs"] == 0:
        what = f"pair on {', '.join(pair_on)}" if pair_on else f"differ only in {args.by}"
        raise UserError(f"no two runs under {where} {what} ({args.a} vs {args.b})")
    if args.json:
        print(json.dumps(res))
        return 0
    ci = res.get("ci95")
    ci_s = f"95% interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "one pair: no interval"
    print(
        f"{args.a} - {args.b} ({res['metric']}, {res['pairs']} paired runs): "
        f"{100 * res['mean']:+.2f} points, {ci_s}"
    )
    return 0


def cmd_audit(args: argparse.Namespace, config_from_args) -> int:
    from simulations.audit import run_audit

    if not 0 < args.beta < 1:
        raise ConfigError("beta", args.beta, "must be in (0, 1)")
    result = run_audit(config_from_args(args), canaries=args.canaries, beta=args.beta)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def register(sub, add_config_flags, config_from_args) -> None:
    p = sub.add_parser("sweep", help="run a grid of experiments from a TOML file (resumable)")
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables (CSV, Markdown) from a folder of finished runs")
    p.add_argument("dir")
    p.add_argument("--group", default="method,dataset,epsilon", help="comma-separated settings to group by")
    p.add_argument("--out", default=None, help="folder for results.csv / results.md (default: DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="paired difference of two values of a setting (e.g. methods) over seeds, with a 95%% interval",
    )
    p.add_argument("dir", nargs="+", help="one or more folders of finished runs")
    p.add_argument("--by", default="method", help="the setting that differs (default: method)")
    p.add_argument(
        "--a",
        default="adadpigu",
        help="first side: a value of --by, or key=value[,key=value] (default: adadpigu)",
    )
    p.add_argument("--b", default="dpsgd", help="second side, as --a (default: dpsgd)")
    p.add_argument(
        "--pair-on",
        default=None,
        help="pair runs on these settings only, e.g. seed (default: every setting but the sides')",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "audit", help="one-run canary audit (Steinke, Nasr & Jagielski 2023) of a training run"
    )
    add_config_flags(p)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the lower bound")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: cmd_audit(a, config_from_args))

    # optional sub-commands living in their own modules (each exposes register(sub, add_config_flags,
    # config_from_args))
    import importlib

    for module in ("simulations.deploy", "simulations.plots", "simulations.split", "simulations.alone"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub, add_config_flags, config_from_args)

    p = sub.add_parser("simulate", help="federated simulation with Flower's Ray backend")
    add_config_flags(p, federated=True)
    _add_fed_flags(p)
    p.add_argument("--num-supernodes", type=int, default=10, help="number of silos (clients)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per client (Ray resources)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPU share per client, e.g. 0.1")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="join a running Ray cluster (HOST:PORT of `ray start --head`, or 'auto') instead of "
        "starting one; its nodes run the clients",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: cmd_simulate(a, config_from_args))
