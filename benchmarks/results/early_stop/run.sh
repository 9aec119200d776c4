#!/usr/bin/env bash
# The measurements of README.md in this folder. Run from the repository root:
#   PY=.venv/bin/python MNIST=datasets/mnist bash benchmarks/results/early_stop/run.sh
# Each case runs twice, pruning.stop_when_frozen=false then =true, in separate output roots (no shared bise
# cache); the "on" root gets a copy of the "off" root's vanilla cache entries (the same vanilla model).
set -euo pipefail
PY=${PY:-.venv/bin/python}
MNIST=${MNIST:-datasets/mnist}
OUT=${OUT:-outputs/early_stop}
LOGS=benchmarks/results/early_stop/logs
mkdir -p "$LOGS" "$OUT/off/cache" "$OUT/on/cache"

run() {  # run NAME OVERRIDES...: the pair off / on
  local name=$1; shift
  for mode in off on; do
    local stop=false; [ "$mode" = on ] && stop=true
    if [ "$mode" = on ]; then  # share the vanilla model (and its metrics), never the search
      for stage in vanilla vanilla_metrics; do
        mkdir -p "$OUT/on/cache/$stage"
        find "$OUT/off/cache/$stage" -maxdepth 1 \( -name '*.pt' -o -name '*.json' \) -exec cp -n {} "$OUT/on/cache/$stage/" \;
      done
    fi
    echo "== $name $mode $(date -Is)"
    PYTHONPATH=. "$PY" -m bise_cli run "$@" "pruning.stop_when_frozen=$stop" "output_root=$OUT/$mode" \
      "hydra.run.dir=$OUT/$mode/runs/$name" "hydra.verbose=bise_cli.method.search" > "$LOGS/${name}_$mode.log" 2>&1
  done
}

run quickstart_seed0 experiment=quickstart seed=0 "dataset.root=$MNIST"
run quickstart_seed1 experiment=quickstart seed=1 "dataset.root=$MNIST"
# The paper preset without the stages that do not depend on the masks (reweighted_ft, dfr_train, lff).
run paper_mcmnist_seed0 experiment=paper/multicolor_mnist seed=0 "dataset.root=$MNIST" \
  "stages=[vanilla,bise,bise_ft,random,magnitude]"

PYTHONPATH=. "$PY" benchmarks/early_stop_compare.py \
  quickstart_seed0 "$OUT/off/runs/quickstart_seed0" "$OUT/on/runs/quickstart_seed0" \
  quickstart_seed1 "$OUT/off/runs/quickstart_seed1" "$OUT/on/runs/quickstart_seed1" \
  paper_mcmnist_seed0 "$OUT/off/runs/paper_mcmnist_seed0" "$OUT/on/runs/paper_mcmnist_seed0" \
  | tee benchmarks/results/early_stop/table.md
