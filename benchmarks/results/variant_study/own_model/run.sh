#!/usr/bin/env bash
# The variant study on the own-model example (README.md here): one `bise run` at a time, on one thread, from the
# repository root. Step 1 (once): python -m bise_cli.examples.own_model --out outputs/example_own_model
# Usage: run.sh VARIANT SEED...   VARIANT: paper | tau_period_4 | l0_0.3 | hard_concrete
set -euo pipefail
PY=${PY:-python}
RECORDS=benchmarks/results/variant_study/own_model/records
variant=$1; shift
case $variant in
  paper) extra=() ;;                                  # the example's defaults (tau_period 2, no L0 penalty)
  tau_period_4) extra=(pruning.tau_period=4) ;;       # tau halves every 4 epochs: 20 mask epochs to the same tau_min
  l0_0.3) extra=(pruning.sparsity_weight=0.3) ;;      # expected-L0 penalty, weight 0.3
  hard_concrete) extra=(pruning.estimator=hard_concrete) ;;  # Louizos et al.'s gates, beta 2/3
  *) echo "unknown variant $variant" >&2; exit 2 ;;
esac
mkdir -p "$RECORDS" outputs/variant_logs
for seed in "$@"; do
  log=outputs/variant_logs/${variant}_seed${seed}.log
  # bootstrap.n=0: the confidence intervals are not used here and do not change any metric
  OMP_NUM_THREADS=1 $PY -m bise_cli run experiment=example/own_model 'stages=[vanilla,bise]' threads=1 \
    bootstrap.n=0 seed="$seed" "${extra[@]}" > "$log" 2>&1
  run=$(ls -td outputs/runs/*/ | head -1)
  cp "$run/metrics.jsonl" "$RECORDS/${variant}_seed${seed}.jsonl"
  echo "$(date -u +%T) $variant seed $seed -> $run"
done
