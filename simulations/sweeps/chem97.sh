#!/usr/bin/env bash
# Issue 26, Chem97 with natural silos: writes the per-silo folders, then runs (resumably) the
# federated sweep, the pooled centralized references, every silo alone under the same budget,
# and collects the table of docs/RESULTS.md ("Chem97") into docs/data/chem97.csv / .md.
#   bash simulations/sweeps/chem97.sh            (from the project root, venv active)
# Each step skips what is finished already; run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${ADADPIGU_DATA_DIR:-../shared/data}"
SCHEMA=simulations/schemas/chem97.toml
export OMP_NUM_THREADS=1

for silos in 10 0; do
  out=results/data/chem97-$([ "$silos" = 0 ] && echo 131 || echo "$silos")
  [ -f "$out/silos.toml" ] || adadpigu split --dataset custom --schema "$SCHEMA" --source "$DATA/chem97/chem97.csv" \
    --partitioner column --by lea --silos "$silos" --format csv --out "$out"
done

adadpigu sweep simulations/sweeps/chem97-federated.toml
adadpigu sweep simulations/sweeps/chem97-pooled.toml

# every silo alone: the same plan as the federated rows (30 epochs = 30 rounds of one local epoch)
alone() { # alone ROOT OUT SEED MODEL EPS|nonprivate [extra flags]
  local root="$1" out="$2" seed="$3" model="$4" eps="$5"
  shift 5
  [ -f "$out/alone.json" ] && return 0
  local method=(--method dpsgd --epsilon "$eps")
  [ "$eps" = nonprivate ] && method=(--method nonprivate)
  adadpigu alone --data-dir "$root" --dataset custom --schema "$SCHEMA" --features pixels --model "$model" \
    --test-fraction 0.2 --epochs 30 --lr 0.5 --clip-norm 1.0 --seed "$seed" --out-dir "$out" "${method[@]}" "$@" >/dev/null
}
for seed in 0 1 2; do
  for model in logreg mlp; do
    for eps in 1 3 8 nonprivate; do
      alone results/data/chem97-10 "results/chem97-alone/$model-$eps-seed$seed" "$seed" "$model" "$eps" --batch-size 64
    done
  done
done

python -m simulations.own_data_table --federated results/chem97-federated --pooled results/chem97-pooled \
  --alone results/chem97-alone --out docs/data/chem97
