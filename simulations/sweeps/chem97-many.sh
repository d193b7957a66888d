#!/usr/bin/env bash
# Issue 26, Chem97 with one silo per education authority (131 silos): the federated sweep
# (chem97-many.toml), every silo alone under the same plan, and the table in docs/data/chem97-many.
#   bash simulations/sweeps/chem97-many.sh          (after chem97.sh wrote results/data/chem97-131)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${ADADPIGU_DATA_DIR:-../shared/data}"
SCHEMA=simulations/schemas/chem97.toml
export OMP_NUM_THREADS=1
[ -f results/data/chem97-131/silos.toml ] || adadpigu split --dataset custom --schema "$SCHEMA" \
  --source "$DATA/chem97/chem97.csv" --partitioner column --by lea --silos 0 --format csv --out results/data/chem97-131
adadpigu sweep simulations/sweeps/chem97-many.toml
for seed in 0 1 2; do
  for model in logreg mlp; do
    for eps in 3 nonprivate; do
      out="results/chem97-many-alone/$model-$eps-seed$seed"
      [ -f "$out/alone.json" ] && continue
      method=(--method dpsgd --epsilon "$eps")
      [ "$eps" = nonprivate ] && method=(--method nonprivate)
      adadpigu alone --data-dir results/data/chem97-131 --dataset custom --schema "$SCHEMA" --features pixels \
        --model "$model" --test-fraction 0.2 --epochs 30 --sample-rate 0.05 --lr 0.5 --clip-norm 1.0 \
        --seed "$seed" --out-dir "$out" "${method[@]}" >/dev/null
    done
  done
done
python -m simulations.own_data_table --federated results/chem97-many --alone results/chem97-many-alone \
  --label "federated (131 silos)" --out docs/data/chem97-many
