"""The README's main job, timed as a newcomer runs it: ``flwr run . --stream`` with the shipped
settings (10 silos, one CPU each), first with an empty ScatterNet feature cache (what a first
run pays: the features are computed once per dataset) and then with the cache it left (every
later run). Each run gets a fresh ``FLWR_HOME``; the local SuperLink and SuperExec that
``flwr run`` leaves behind are stopped after it (found by that ``FLWR_HOME`` in their
environment). Wall time and the released model's test accuracy per run.

    python -m benchmarks.bench_main_job --json --out docs/data/bench_main_job.json
    python -m benchmarks.bench_main_job --run-config "num-server-rounds=2 train-subset=2000" --json  # smoke
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.output import emit
from simulations.processes import processes_with_env, stop_processes

FEDERATION_CONFIG = "num-supernodes=10 client-resources-num-cpus=1"


def run_once(root: str, cache_dir: str, out_dir: str, run_config: str, timeout: float) -> dict:
    flwr_home = tempfile.mkdtemp(prefix="flwr-home-")
    env = {
        **os.environ,
        "FLWR_HOME": flwr_home,
        "ADADPIGU_CACHE_DIR": cache_dir,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    overrides = f"out-dir='{out_dir}' {run_config}".strip()
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    cmd = [
        flwr if os.path.exists(flwr) else "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        FEDERATION_CONFIG,
        "--run-config",
        overrides,
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, "timed out"
    seconds = time.perf_counter() - t0
    stop_processes(processes_with_env("FLWR_HOME", flwr_home), grace=3.0)
    shutil.rmtree(flwr_home, ignore_errors=True)
    summaries = sorted(glob.glob(os.path.join(out_dir, "*", "summary.json")), key=os.path.getmtime)
    summary = json.load(open(summaries[-1])) if summaries and rc == 0 else {}
    if rc == 0 and not summary:  # flwr run exits 0 when the ServerApp fails: no summary is a failure
        rc = 1
    return {
        "returncode": rc,
        "seconds": seconds,
        "test_accuracy_final": summary.get("test_accuracy_final"),
        "max_epsilon": summary.get("max_epsilon"),
        "rounds": summary.get("rounds_completed"),
        **({"log_tail": tail} if rc != 0 else {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="", help="extra run-config overrides (e.g. a smoke plan)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="bench-main-job-")
    cache = os.path.join(work, "cache")
    rows = []
    try:
        for label in ("first run (empty feature cache)", "second run (cached features)"):
            row = run_once(root, cache, os.path.join(work, "runs"), args.run_config, args.timeout)
            rows.append({"run": label, **row})
            if row["returncode"] != 0:
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": f'flwr run . --stream --federation-config "{FEDERATION_CONFIG}"',
        "run_config_overrides": args.run_config,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    emit(
        result,
        out=args.out,
        as_json=args.json,
        lines=(
            f"{r['run']:34s} {r['seconds']:7.1f} s  test acc {r['test_accuracy_final']}  rc {r['returncode']}"
            for r in rows
        ),
    )
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
