"""Reading a silo's own data, as the deployment runtime does it: every message runs in a fresh
ClientApp process, so the first one decodes the silo's images (or parses its table) and
writes the tensor cache, and every later one reads the tensors (common/silos.py). Each
measurement is a fresh ``python`` process; the time is the read inside it (``local_splits``:
detect, decode or load, split), and the process's whole wall time beside it.

    python -m benchmarks.bench_silo_read --json --out docs/data/bench_silo_read.json

Data: MNIST split IID into 10 silos (``adadpigu split``, PNG image folders: one silo of
6,000 images), and Chem97 split by education authority into 10 silos (CSV: one silo of
about 3,100 rows); both written into a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.output import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import time, json
t0 = time.perf_counter()
from common.schema import load_schema
from common.silos import local_splits, LAST_READ
import os
schema = load_schema({schema!r})
s = local_splits({folder!r}, schema, validation_fraction=0.1, test_fraction=0.0)
info = LAST_READ[os.path.abspath({folder!r})]
print(json.dumps({{"read_seconds": info.seconds, "cached": info.cached, "records": len(s.train) + len(s.validation),
                   "import_and_read_seconds": time.perf_counter() - t0}}))
"""


def _split(args: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "simulations.cli", "split", *args], check=True, cwd=ROOT, capture_output=True
    )


def measure(folder: str, schema: str, cache: str, repeats: int) -> dict:
    env = {**os.environ, "ADADPIGU_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for _ in range(repeats + 1):  # the first: empty cache (decode); then cached
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(schema=schema, folder=folder)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_seconds"] = time.perf_counter() - t0
        runs.append(row)
    first, cached = runs[0], runs[1:]
    assert not first["cached"] and all(r["cached"] for r in cached)
    return {
        "records": first["records"],
        "decode_read_seconds": first["read_seconds"],
        "decode_process_seconds": first["process_seconds"],
        "cached_read_seconds_median": statistics.median(r["read_seconds"] for r in cached),
        "cached_process_seconds_median": statistics.median(r["process_seconds"] for r in cached),
        "speedup_read": first["read_seconds"] / statistics.median(r["read_seconds"] for r in cached),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="cached reads after the first")
    ap.add_argument(
        "--data-dir", default=os.environ.get("ADADPIGU_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="MNIST subset of 3,000, one cached read (CI)")
    args = ap.parse_args(argv)
    subset = ["--subset", "3000"] if args.smoke else []
    if args.smoke:
        args.repeats = 1
    work = tempfile.mkdtemp(prefix="bench-silo-read-")
    rows = []
    try:
        _split(["--dataset", "mnist", "--data-dir", args.data_dir, "--silos", "10", "--partitioner", "iid",
                "--format", "imagefolder", "--out", os.path.join(work, "mnist"), *subset])  # fmt: skip
        _split(["--dataset", "custom", "--schema", "simulations/schemas/chem97.toml", "--source",
                os.path.join(args.data_dir, "chem97", "chem97.csv"), "--partitioner", "column", "--by", "lea",
                "--silos", "10", "--format", "csv", "--out", os.path.join(work, "chem97")])  # fmt: skip
        for name, fmt in (("mnist", "imagefolder (PNG)"), ("chem97", "csv")):
            row = measure(
                os.path.join(work, name, "silo-0"),
                os.path.join(work, name, "schema.toml"),
                os.path.join(work, f"cache-{name}"),
                args.repeats,
            )
            rows.append({"data": name, "format": fmt, **row})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(
        {
            "command": "python -m benchmarks.bench_silo_read " + " ".join(argv or sys.argv[1:]),
            "cpus": os.cpu_count(),
            "rows": rows,
        },
        out=args.out,
        as_json=args.json,
        lines=(
            f"{r['data']:7s} {r['format']:18s} {r['records']:6d} records: decode {r['decode_read_seconds']:.2f} s, "
            f"cached {r['cached_read_seconds_median']:.3f} s ({r['speedup_read']:.0f}x); per message process "
            f"{r['decode_process_seconds']:.1f} s -> {r['cached_process_seconds_median']:.1f} s"
            for r in rows
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
