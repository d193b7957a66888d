"""Bytes per client and round: sparse AdaDPIGU updates and packed-bit masks vs dense float32.

Builds the real messages (Flower ``ArrayRecord``/``ConfigRecord``) that the strategy and
the client exchange, for r in {0.2, 0.6, 1.0}, and counts their payload bytes.

    python -m benchmarks.bench_comm --json [--model mnist-cnn] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from common import protocol as P
from common.federated import sparse_encode
from common.masks import MaskBuilder, pack_mask
from common.models import build_model

DATASET = {"mnist-cnn": "mnist", "cifar-cnn": "cifar10", "resnet18-gn": "cifar10"}


def config_bytes(rc: ConfigRecord) -> int:
    return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in rc.values())


def measure(model_name: str, ratio: float) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, DATASET[model_name])
    d = sum(p.numel() for p in model.parameters())
    dense = 4 * d
    mask = None if ratio >= 1.0 else MaskBuilder(torch.rand(d), [d]).mask(ratio)
    model_bytes = ArrayRecord(model.state_dict()).count_bytes()
    base_cfg = ConfigRecord(
        {
            P.SERVER_ROUND: 1,
            P.PHASE: P.PHASE_TRAIN,
            P.NOISE_MULTIPLIER: 1.0,
            P.SAMPLE_RATE: 0.01,
            P.LOCAL_STEPS: 10,
            P.RETENTION_RATIO: ratio,
            P.MASK_VERSION: 1,
            P.NUM_PARAMETERS: d,
        }
    )
    bits = b"" if mask is None else pack_mask(mask)
    down_with_mask = model_bytes + config_bytes(base_cfg) + len(bits)
    down_without = model_bytes + config_bytes(base_cfg)
    update = sparse_encode(torch.randn(d), mask)
    up = ArrayRecord({P.UPDATE: Array(update)}).count_bytes() + 8 * 6  # + six metrics
    return {
        "model": model_name,
        "retention_ratio": ratio,
        "parameters": d,
        "dense_bytes": dense,
        "up_bytes": up,
        "up_ratio_to_dense": up / dense,
        "up_ratio_to_r_dense": up / (ratio * dense),
        "down_bytes_mask_changed": down_with_mask,
        "down_bytes_mask_unchanged": down_without,
        "mask_bits_bytes": len(bits),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mnist-cnn", "cifar-cnn"], choices=list(DATASET))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.6, 1.0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = [measure(m, r) for m in args.models for r in args.ratios]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{row['model']:12s} r={row['retention_ratio']:.1f} up {row['up_bytes']:>9d} B "
                f"({row['up_ratio_to_dense']:.3f} x dense, {row['up_ratio_to_r_dense']:.3f} x r*dense) "
                f"down {row['down_bytes_mask_changed']:>9d} B with mask bits ({row['mask_bits_bytes']} B)"
            )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
