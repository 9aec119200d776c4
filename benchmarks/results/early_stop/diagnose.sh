#!/usr/bin/env bash
# Which gates keep the masks from freezing: the three searches of run.sh again (stop_when_frozen on, stages
# vanilla and bise only, the vanilla models of run.sh's "off" root), whose run.log ends with the line
# "masks never frozen: ... not final: ..." listing them. Run from the repository root after run.sh.
set -euo pipefail
PY=${PY:-.venv/bin/python}
MNIST=${MNIST:-datasets/mnist}
OUT=${OUT:-outputs/early_stop}
LOGS=benchmarks/results/early_stop/logs
for stage in vanilla vanilla_metrics; do
  mkdir -p "$OUT/diag/cache/$stage"
  find "$OUT/off/cache/$stage" -maxdepth 1 \( -name '*.pt' -o -name '*.json' \) -exec cp -n {} "$OUT/diag/cache/$stage/" \;
done
diagnose() {
  local name=$1; shift
  PYTHONPATH=. "$PY" -m bise_cli run "$@" "stages=[vanilla,bise]" "output_root=$OUT/diag" \
    "hydra.run.dir=$OUT/diag/runs/$name" > "$LOGS/diag_$name.log" 2>&1
  grep -h "masks never frozen\|masks frozen after" "$OUT/diag/runs/$name/run.log" | sed "s/^/$name: /"
}
diagnose quickstart_seed0 experiment=quickstart seed=0 "dataset.root=$MNIST"
diagnose quickstart_seed1 experiment=quickstart seed=1 "dataset.root=$MNIST"
diagnose paper_mcmnist_seed0 experiment=paper/multicolor_mnist seed=0 "dataset.root=$MNIST"
