#!/usr/bin/env bash
# Tuning on the own-model example for real (issue 22, part 2): the example's files, the default preset once,
# then the Optuna sweeps of BISE (+FT) and of the reweighted-FT control with the same number of trials, all in
# one output root (the user's vanilla model is evaluated once and read from the stage cache by every run).
# From the repository root:  OUT=outputs N=12 STEP=all bash benchmarks/results/tune_own_model/run.sh
# STEP: default (files + default run) | bise (the BISE sweep) | control (the control's sweep) | table | all.
# The two sweeps are independent and may run at once (STEP=bise and STEP=control in two shells). 1 CPU thread each.
set -euo pipefail
OUT=${OUT:-outputs}
N=${N:-12}
STEP=${STEP:-all}
PY=${PY:-python}
HERE=benchmarks/results/tune_own_model
export OMP_NUM_THREADS=1
timed() {  # name, command...: wall and CPU seconds of one step into timings.tsv
  local name=$1; shift
  echo "== $(date -u +%T) $name: $*"
  /usr/bin/time -f "$name\t%e\t%U\t%S" -a -o "$HERE/timings.tsv" "$@"
}
if [[ $STEP == default || $STEP == all ]]; then
  timed example_files "$PY" -m bise_cli.examples.own_model --out "$OUT/example_own_model"
  timed default_run "$PY" -m bise_cli run experiment=example/own_model output_root="$OUT" threads=1
fi
if [[ $STEP == bise || $STEP == all ]]; then
  timed "sweep_bise_n$N" "$PY" -m bise_cli run -m hydra/sweeper=optuna experiment=tune/own_model \
    hydra.sweeper.n_trials="$N" output_root="$OUT" threads=1 || echo "sweep exit $?"
fi
if [[ $STEP == control || $STEP == all ]]; then
  timed "sweep_control_n$N" "$PY" -m bise_cli run -m hydra/sweeper=optuna experiment=tune/own_model_control \
    hydra.sweeper.n_trials="$N" output_root="$OUT" threads=1 || echo "sweep exit $?"
fi
if [[ $STEP == table || $STEP == all ]]; then
  "$PY" -m bise_cli table "$OUT/sweeps"
  "$PY" -m bise_cli table "$OUT/runs"
fi
