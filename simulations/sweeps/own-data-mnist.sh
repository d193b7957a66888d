#!/usr/bin/env bash
# Issue 26: the MNIST own-data check (own-data-mnist.toml): writes the per-silo PNG folders of the
# Dirichlet(0.5) partition for seeds 0-2, then runs the sweep (resumable) and its report.
#   bash simulations/sweeps/own-data-mnist.sh      (from the project root, venv active)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for seed in 0 1 2; do
  out=results/data/mnist-dir05-seed$seed
  [ -f "$out/silos.toml" ] || adadpigu split --dataset mnist --silos 10 --partitioner dirichlet --alpha 0.5 \
    --seed "$seed" --format imagefolder --out "$out"
done
adadpigu sweep simulations/sweeps/own-data-mnist.toml
adadpigu report results/own-data-mnist --group dataset --out docs/data/own-data-mnist
