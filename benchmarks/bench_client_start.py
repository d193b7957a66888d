"""What a fresh ClientApp process pays before it can train (Flower's deployment runtime starts
one per message): importing the app, then reading the silo's dataset, once with the
project's direct file reader and once the way it was done before (torchvision's dataset
classes, which import torchvision). Each variant runs in a new Python process, ``--repeats``
times; the median wall time is reported.

    python -m benchmarks.bench_client_start --json [--dataset mnist] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks.output import emit

VARIANTS = {
    "import client.app": "import client.app",
    "+ read the dataset (direct reader)": (
        "import client.app\nfrom common.data import load_dataset\nload_dataset({ds!r}, {root!r}, True)\n"
        "import sys\nassert 'torchvision' not in sys.modules"
    ),
    "+ read the dataset (torchvision, as before)": (
        "import client.app\nimport torchvision\n"
        "cls = {{'mnist': torchvision.datasets.MNIST, 'fashionmnist': torchvision.datasets.FashionMNIST,"
        " 'cifar10': torchvision.datasets.CIFAR10}}[{ds!r}]\nd = cls({root!r}, train=True, download=False)\n"
        "import torch\ntorch.as_tensor(d.data).float()"
    ),
}


def run(code: str, repeats: int) -> list[float]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist", choices=("mnist", "fashionmnist", "cifar10"))
    ap.add_argument("--data-dir", default=os.environ.get("ADADPIGU_DATA_DIR", "data"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, code in VARIANTS.items():
        times = run(code.format(ds=args.dataset, root=os.path.abspath(args.data_dir)), args.repeats)
        rows.append(
            {"variant": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        )
    result = {"dataset": args.dataset, "repeats": args.repeats, "rows": rows}
    emit(
        result,
        out=args.out,
        as_json=args.json,
        lines=(
            f"{r['variant']:45s} median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f})"
            for r in rows
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
