"""One optimizer step: non-private, our dpsgd and adadpigu (r = 0.6) as the engine runs them
(ghost clipping where the model allows, common/ghost.py) and with materialised per-sample rows
(``-rows``), Opacus DP-SGD with per-sample gradients (hooks) and with ghost clipping, and the
documented functional API (``private_gradient``).

Same model, same fixed batch (no Poisson sampling, so every method sees B examples);
median wall time of ``--iters`` steps after ``--warmup`` steps; peak memory (CUDA: max
allocated; CPU: peak RSS of a fresh subprocess per row). Ratios are to the non-private
step and to Opacus (flat-clipping DP-SGD with hooks, the external reference); the
``ratio_opacus_ghost`` column to Opacus' ghost clipping (``grad_sample_mode="ghost"``).

    python -m benchmarks.bench_step --json                 # full grid (slow on a CPU)
    python -m benchmarks.bench_step --smoke --json         # tiny, seconds (CI)
    python -m benchmarks.bench_step --models mnist-cnn --batch-sizes 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

# "api": the documented functional API (per_sample_grads + privatize_step on a flat [B, d]
# matrix, then an SGD step), DP-SGD like "dpsgd"
METHODS = ("nonprivate", "dpsgd", "adadpigu", "dpsgd-rows", "adadpigu-rows", "opacus", "opacus-ghost", "api")
MODELS = {
    "mnist-cnn": "mnist",
    "cifar-cnn": "cifar10",
    "resnet18-gn": "cifar10",
    "scatter-linear": "cifar10",  # on CIFAR-10's ScatterNet features (243 x 8 x 8)
    "scatter-cnn": "cifar10",
}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def input_shape(model_name: str) -> tuple[int, ...]:
    shape = SHAPES[MODELS[model_name]]
    if model_name.startswith("scatter-"):
        from common.scatter import feature_shape

        return feature_shape(shape)
    return shape


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(method: str, model_name: str, batch: int, device: torch.device, chunk: int):
    """A zero-argument callable that takes one optimizer step of ``method``."""
    from common.config import TrainConfig
    from common.data import TensorData
    from common.engine import DPEngine, make_generator
    from common.masks import MaskBuilder
    from common.models import build_model

    torch.manual_seed(0)
    dataset = MODELS[model_name]
    x = torch.randn(batch, *input_shape(model_name), device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = build_model(model_name, dataset).to(device)
    if method == "opacus-ghost":
        return _opacus_ghost_step(model, x, y, batch, chunk)
    if method == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(model, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.1, momentum=0.9),
            noise_multiplier=1.0,
            max_grad_norm=0.1,
            expected_batch_size=batch,
        )

        def step() -> None:
            # BatchMemoryManager's pattern: zero_grad before every physical batch (DPOptimizer keeps
            # the clipped sum across skipped steps), skip the step on all but the last one
            for i in range(0, batch, chunk):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(gsm(x[i : i + chunk]), y[i : i + chunk]).mul(
                    min(chunk, batch - i) / batch
                ).backward()
                opt.signal_skip_step(do_skip=i + chunk < batch)
                opt.step()

        return step
    if method == "api":
        return _api_step(model, x, y, batch, chunk, device)
    backend = "native" if method.endswith("-rows") else "auto"
    method = method.removesuffix("-rows")
    cfg = TrainConfig(
        method=method,
        per_sample_backend=backend,
        epsilon=None if method != "nonprivate" else 8.0,
        noise_multiplier=1.0 if method != "nonprivate" else None,
        batch_size=batch,
        sample_rate=1.0,
        lr=0.1,
        max_physical_batch=chunk,
        seed=0,
    )
    engine = DPEngine(
        model,
        cfg,
        n_train=batch,
        device=device,
        noise_generator=make_generator(0, "n", device=device),
        sampling_generator=make_generator(0, "s", device=device),
    )
    data = TensorData(x, y)
    idx = torch.arange(batch, device=device)
    if method == "nonprivate":
        return lambda: engine._apply(engine._nonprivate_gradient(data, idx)[0])
    if method == "dpsgd":
        return lambda: engine._apply(engine._private_release(data, idx, "flat", 1.0)[0])
    # adadpigu: a 60% mask and warm statistics, then the adaptive (phase 2) step
    engine._apply(engine._private_release(data, idx, "flat", 1.0)[0])
    engine.set_mask(MaskBuilder(torch.rand(engine.d, device=device), engine.sizes).mask(0.6))

    def adaptive() -> None:
        released = engine._private_release(data, idx, "adaptive", 1.0)[0]
        engine.stats.update_from_released(released)
        engine._apply(released)

    return adaptive


def _opacus_ghost_step(model, x, y, batch: int, chunk: int):
    """Opacus' ghost clipping (``grad_sample_mode="ghost"``: GradSampleModuleFastGradientClipping,
    its optimizer and loss wrapper), physical batches of ``chunk`` as virtual steps."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=0.1, use_ghost_clipping=True
        )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.1, momentum=0.9),
        noise_multiplier=1.0,
        max_grad_norm=0.1,
        expected_batch_size=batch,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(), "mean")

    def step() -> None:
        for i in range(0, batch, chunk):
            opt.zero_grad(set_to_none=True)
            criterion(gsm(x[i : i + chunk]), y[i : i + chunk]).backward()
            opt.signal_skip_step(do_skip=i + chunk < batch)
            opt.step()

    return step


def _api_step(model, x, y, batch: int, chunk: int, device: torch.device):
    """One DP-SGD step through the public functions only (what a user of the API writes):
    ``private_gradient``, the engine's path (ghost clipping where the model allows)."""
    from common.engine import make_generator, per_example_loss
    from common.ghost import private_gradient

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gen = make_generator(0, "n", device=device)

    def step() -> None:
        released = private_gradient(
            model,
            per_example_loss,
            x,
            y,
            clip_norm=0.1,
            noise_multiplier=1.0,
            expected_batch_size=batch,
            generator=gen,
            max_physical_batch=chunk,
        )
        for p, v in zip(params, torch.split(released, [p.numel() for p in params])):
            p.grad = v.view_as(p)
        opt.step()

    return step


def measure(
    method: str, model_name: str, batch: int, *, device: str, iters: int, warmup: int, chunk: int
) -> dict:
    dev = torch.device(device)
    step = make_step(method, model_name, batch, dev, chunk)
    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_ms": statistics.median(times) * 1e3, "peak_mb": peak_mb}


def _measure_in_subprocess(args: argparse.Namespace, method: str, model: str, batch: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_step", "--_one", method, model, str(batch),
           "--device", args.device, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--chunk", str(args.chunk)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model in args.models:
        for batch in args.batch_sizes:
            res = {}
            for method in args.methods:
                if args.in_process:
                    res[method] = measure(
                        method,
                        model,
                        batch,
                        device=args.device,
                        iters=args.iters,
                        warmup=args.warmup,
                        chunk=args.chunk,
                    )
                else:
                    res[method] = _measure_in_subprocess(args, method, model, batch)
            for method in args.methods:
                row = {
                    "model": model,
                    "batch_size": batch,
                    "method": method,
                    "median_ms": round(res[method]["median_ms"], 3),
                    "peak_mb": round(res[method]["peak_mb"], 1),
                    **{
                        f"ratio_{ref.replace('-', '_')}": (
                            round(res[method]["median_ms"] / res[ref]["median_ms"], 3) if ref in res else None
                        )
                        for ref in ("nonprivate", "opacus", "opacus-ghost")
                    },
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                }
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(
                        f"{model:14s} B={batch:5d} {method:13s} {row['median_ms']:9.2f} ms  "
                        f"{row['peak_mb']:8.1f} MB  x{row['ratio_nonprivate'] or 0:.2f} non-private  "
                        f"x{row['ratio_opacus'] or 0:.2f} Opacus  x{row['ratio_opacus_ghost'] or 0:.2f} Opacus ghost",
                        flush=True,
                    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--chunk", type=int, default=256, help="physical batch (virtual steps) for per-sample grads"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, in-process (for CI)")
    p.add_argument(
        "--in-process", action="store_true", help="no subprocess per row (peak RSS is then cumulative)"
    )
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        method, model, batch = args._one
        print(
            json.dumps(
                measure(
                    method,
                    model,
                    int(batch),
                    device=args.device,
                    iters=args.iters,
                    warmup=args.warmup,
                    chunk=args.chunk,
                )
            )
        )
        return 0
    if args.smoke:
        args.models, args.batch_sizes, args.iters, args.warmup, args.in_process = (
            ["mnist-cnn"],
            [8],
            2,
            1,
            True,
        )
    rows = run(args)
    if args.out:
        meta = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "command": "python -m benchmarks.bench_step "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
