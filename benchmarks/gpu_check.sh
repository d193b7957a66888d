#!/usr/bin/env bash
# Prepared GPU check (<= 8 minutes on an H200): step benchmarks on CUDA and a simulation
# with 50 concurrent clients sharing the one GPU. Writes into ${OUT:-gpu-results}/.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"; mkdir -p "$OUT"
export ADADPIGU_DATA_DIR="${ADADPIGU_DATA_DIR:-$(cd .. && pwd)/shared/data}" FLWR_TELEMETRY_ENABLED=0
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -e .
else
  . .venv/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 240 python -m benchmarks.bench_step --device cuda --models mnist-cnn cifar-cnn resnet18-gn \
  --batch-sizes 256 1024 --iters 20 --chunk 256 --json --out "$OUT/bench_step_cuda.json" | tee "$OUT/bench_step_cuda.jsonl"
# 50 clients, each a 2% share of the GPU, 16 CPU cores for Ray.
timeout 240 adadpigu simulate --num-supernodes 50 --num-cpus 0.3 --num-gpus 0.02 --ray-num-cpus 16 \
  --num-server-rounds 3 --importance-rounds 1 --min-available-nodes 50 --min-train-nodes 50 \
  --batch-size 64 --local-epochs 1 --epsilon 8 --seed 0 --out-dir "$OUT/sim" --json | tail -n 1 | tee "$OUT/sim50.json"
# De et al. (2022)'s CIFAR-10 model, WRN-16-4 with GroupNorm, at their recipe's step (augmentation
# multiplicity, large batch, lr 4 without momentum, EMA of the weights), one epoch only: its
# step time tells how long the full recipe (875 steps of 4096 x 16 augmented images at
# epsilon 8, about 80 epochs) takes on this GPU; the full run needs a longer lease than a check.
timeout 300 adadpigu train --device cuda --dataset cifar10 --model wrn16-4 --augmult 4 --batch-size 1024 \
  --max-physical-batch 512 --epochs 1 --epsilon 8 --lr 4 --momentum 0 --ema-decay 0.999 --seed 0 \
  --method dpsgd --out-dir "$OUT/wrn" --json | tail -n 1 | tee "$OUT/wrn16-4.json"
