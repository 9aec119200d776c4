#!/usr/bin/env bash
# GPU check of bise: ONE command of at most 8 minutes (480 s) on a machine with one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_check)
#   DEVICE=cpu REDUCED=1 bash benchmarks/gpu_check.sh OUT_DIR   (the same steps on the CPU, smaller: the bundled
#                                                     5k digits, width 0.25, 64 px CelebA; a dry run)
#   SKIP="exact text" ...                            (leave out the named steps)
#
# Time budget per step (seconds; each step runs under `timeout` and a step that runs out is reported, the next
# one still runs, so the whole stays within the sum: 470 s, plus a few seconds of summaries):
#   setup        30  CUDA check, nvidia-smi, the .devkit wheels into /tmp/site when hydra is missing
#   data         20  generated files in the real layouts: CelebA (2000 random JPEGs, read at 224 px), Corrupted
#                    CIFAR-10 (DFA tree, ~2400 PNGs) and a WordPiece vocabulary for the synthetic text
#   exact        50  tests/test_prune_exact.py with BISE_TEST_DEVICE=cuda, the cases that need no extra wheel
#                    (pruned == gated for simple_convnet, resnet18, mlp, bert and hf on the GPU; the automatic
#                    torchvision/timm gates need Torch-Pruning and are left to CPU CI)
#   throughput   80  one epoch of every loop of the BiasedMNIST paper cell on full MNIST: images/s, peak memory,
#                    synchronising calls (torch.cuda.set_sync_debug_mode), and the full cell extrapolated
#   paper_cell  150  experiment=paper/biased_mnist rho=0.99 seed=0, EVERY stage of the preset, shortened: 2
#                    vanilla / LfF epochs, 4 mask epochs (2 temperature drops, the paper's 50 head epochs each),
#                    2 fine-tuning epochs; each stage's wall time from run.log ("stage X recorded: S s")
#   celeba       60  experiment=paper/celeba on the generated CelebA at 224 px (ResNet18, ImageNet encode, flips)
#                    [vanilla, bise, bise_ft, lff], the data on the GPU (data_on_device=auto)
#   cifar10c     40  experiment=paper/cifar10c on the generated release (crop + flip, also in the search)
#                    [vanilla, bise, lff], the data in pinned host memory (data_on_device=never)
#   text         40  experiment=quickstart_text with a tiny random BERT (backbone.pretrained=tiny) and the
#                    generated vocabulary (no MiniLM wheel), [vanilla, bise, bise_ft]
# What it measures (the closing note of summary.txt repeats it): whether every stage runs on CUDA (the device
# crashes of issue 19 would stop celeba, cifar10c and the identification-free paper cell at their first batch),
# per-loop images/s, peak memory and host synchronisations per epoch (target: at most one per loop epoch), the
# paper cell's per-stage times and its extrapolated full length, and pruned == gated on the GPU.
#
# Only three files land in OUT_DIR (the device tool returns at most 8): summary.txt, throughput.json and
# logs.tar.gz (every log, record and data summary; the work tree is $WORK, default /tmp/bise_gpu_check).
# On a bare GPU machine (its own CUDA torch, no internet) run ../shared/tools/device-kit here first and send
# .devkit/ along (hydra, omegaconf, antlr4, mlxtend, torch-pruning wheels); MNIST ships in datasets/mnist.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=$(mkdir -p "${1:-${OUT:-./gpu_check}}" && cd "${1:-${OUT:-./gpu_check}}" && pwd)
work=${WORK:-/tmp/bise_gpu_check}
rm -rf "$work" && mkdir -p "$work/logs"
DEVICE=${DEVICE:-cuda}
REDUCED=${REDUCED:-0}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
started_all=$SECONDS

# Sizes and limits: the GPU budget above, or a small CPU dry run on one thread (limits there only stop a hang).
if [ "$REDUCED" = 1 ]; then
    CELEBA_IMAGES=200; CELEBA_SIZE=64; CIFAR_PER_CLASS=20; TEXT_SIZE=400; CPU_THREADS=(threads=1); scale=8
    # The 5k real digits bundled with mlxtend, 1000 of them for training, a quarter-width SimpleConvNet.
    MNIST_DATA=(dataset.source=embedded dataset.max_samples=1000 backbone.width=0.25); THREADS_ARG=(--threads 1)
else
    CELEBA_IMAGES=2000; CELEBA_SIZE=224; CIFAR_PER_CLASS=200; TEXT_SIZE=2000; CPU_THREADS=(); scale=1
    MNIST_DATA=(); THREADS_ARG=()
fi
limit() { echo $(( $1 * scale )); }

# ---- setup (budget 30 s)
if [ "$DEVICE" = cuda ]; then
    if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>"$work/torch_check.err"; then
        echo "gpu_check: no CUDA GPU visible to $python; run it on a GPU machine or with DEVICE=cpu REDUCED=1" >&2
        exit 2
    fi
    nvidia-smi > "$work/logs/nvidia-smi.txt" 2>&1 || true
fi
if ! "$python" -c 'import hydra, omegaconf, mlxtend' 2>/dev/null; then
    if ls .devkit/whl/*.whl >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devkit/whl/*.whl || exit 2
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: hydra-core or mlxtend is missing and there is no .devkit/whl: run ../shared/tools/device-kit" >&2
        exit 2
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mnist=${MNIST:-}
for candidate in datasets/mnist .devkit/mnist ../shared/data/mnist; do
    [ -z "$mnist" ] && ls "$candidate"/*ubyte* >/dev/null 2>&1 && mnist=$candidate
done
[ -z "$mnist" ] && { echo "gpu_check: no MNIST IDX files (datasets/mnist, .devkit/mnist or \$MNIST)" >&2; exit 2; }
[ "$REDUCED" = 1 ] || MNIST_DATA=(dataset.source=files "dataset.root=$mnist")
note "gpu_check $(date -u +%FT%TZ) device=$DEVICE reduced=$REDUCED: $("$python" -c 'import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "torch", torch.__version__)')"
note "setup: $((SECONDS - started_all)) s (budget 30)"

# run_step NAME LIMIT CMD...: CMD under timeout, its output in logs/NAME.log, its verdict and time in summary.txt
run_step() {
    local name=$1 budget=$2; shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then note "[$name] skipped (SKIP)"; return 0; fi
    local lim; lim=$(limit "$budget")
    local started=$SECONDS rc
    timeout "$lim" "$@" > "$work/logs/$name.log" 2>&1; rc=$?
    local verdict=ok
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${lim}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED rc=$rc (tail of logs/$name.log below)"
    note "[$name] $verdict in $((SECONDS - started)) s (budget $budget s)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && tail -n 5 "$work/logs/$name.log" | sed 's/^/    /' | tee -a "$summary"
    return 0
}

# bise NAME BUDGET OVERRIDES...: one run into $work/runs/NAME, then its stage times and headline metrics
bise() {
    local name=$1 budget=$2; shift 2
    run_step "$name" "$budget" "$python" -m bise_cli run "$@" device="$DEVICE" "output_root=$work/outputs" \
        cache=false deterministic=true ${CPU_THREADS[@]+"${CPU_THREADS[@]}"}
    local dir; dir=$(ls -td "$work"/outputs/runs/*/ 2>/dev/null | head -n 1)
    [ -z "$dir" ] && return 0
    mkdir -p "$work/runs/$name" && cp "$dir"/{run.log,metrics.jsonl,data_summary.json,status.json} "$work/runs/$name/" 2>/dev/null
    rm -rf "$work/outputs/runs"
    "$python" benchmarks/gpu_steps.py stages "$work/runs/$name" --out "$work/runs/$name/stage_times.json" \
        > /dev/null 2>&1 || true
    "$python" - "$work/runs/$name" <<'PY' | tee -a "$summary"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
times = json.loads((run / "stage_times.json").read_text()) if (run / "stage_times.json").exists() else {}
if times.get("stages"):
    print("    stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times["stages"].items()))
if times.get("seconds_per_epoch_after_the_first"):
    print("    s/epoch: " + ", ".join(f"{k} {v:.2f}" for k, v in times["seconds_per_epoch_after_the_first"].items()))
if (run / "data_summary.json").exists():
    placed = json.loads((run / "data_summary.json").read_text()).get("data_on_device") or {}
    print(f"    data: {placed.get('reason')}")
if (run / "metrics.jsonl").exists():
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        keys = ("acc_unbiased", "acc", "sparsity_units", "latency_ms_b100", "peak_gpu_memory_mb")
        print(f"    {r['stage']}: " + ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                                             for k in keys if r.get(k) is not None))
PY
}

# ---- data (budget 20 s)
started=$SECONDS
"$python" benchmarks/gpu_steps.py celeba "$work/data/celeba" --images "$CELEBA_IMAGES" > "$work/logs/data.log" 2>&1
"$python" benchmarks/gpu_steps.py cifar10c "$work/data/cifar10c" --per-class "$CIFAR_PER_CLASS" >> "$work/logs/data.log" 2>&1
"$python" benchmarks/gpu_steps.py tokenizer "$work/data/tokenizer" >> "$work/logs/data.log" 2>&1
note "[data] $((SECONDS - started)) s (budget 20)"

# ---- exactness (budget 50 s)
run_step exact 50 env BISE_TEST_DEVICE="$DEVICE" "$python" -m pytest -q -p no:cacheprovider tests/test_prune_exact.py \
    -k "not torchvision and not timm"
tail -n 2 "$work/logs/exact.log" | sed 's/^/    /' | tee -a "$summary"

# ---- throughput (budget 80 s)
run_step throughput 80 "$python" benchmarks/gpu_steps.py throughput --device "$DEVICE" --out "$out/throughput.json" \
    ${THREADS_ARG[@]+"${THREADS_ARG[@]}"} "${MNIST_DATA[@]}"
grep -E "images/s|min$|^paper" "$work/logs/throughput.log" | sed 's/^/    /' | tee -a "$summary"

# ---- the paper cell, shortened: every stage (budget 150 s)
bise paper_cell 150 experiment=paper/biased_mnist rho=0.99 seed=0 "${MNIST_DATA[@]}" \
    train.epochs=2 'train.milestones=[1]' pruning.tau_period=2 pruning.tau_min=0.25 finetune.epochs=2

# ---- CelebA-shaped (budget 60 s) and Corrupted-CIFAR-10-shaped (budget 40 s) runs on generated images
# Random pixels carry no bias to probe: the fresh leakage probe (which fails a run whose probe does not learn) is off.
tiny_search=(pruning.tau_period=1 pruning.tau_min=0.5 pruning.head_pretrain_epochs=2 pruning.head_refine_epochs=2
             leakage_probe.epochs=0 bootstrap.n=0 latency.repeats=3 backbone.weights=none)
bise celeba 60 experiment=paper/celeba "dataset.root=$work/data/celeba" dataset.image_size="$CELEBA_SIZE" \
    "dataset.cache_dir=$work/cache" train.epochs=1 finetune.epochs=1 "${tiny_search[@]}" \
    'stages=[vanilla,bise,bise_ft,lff]'
bise cifar10c 40 experiment=paper/cifar10c "dataset.root=$work/data/cifar10c" "dataset.cache_dir=$work/cache" \
    train.epochs=1 "${tiny_search[@]}" data_on_device=never 'stages=[vanilla,bise,lff]'

# ---- text on a tiny BERT (budget 40 s)
bise text 40 experiment=quickstart_text backbone.pretrained=tiny "dataset.tokenizer=$work/data/tokenizer" \
    dataset.synthetic_size="$TEXT_SIZE" train.epochs=1 finetune.epochs=1 pruning.head_pretrain_epochs=5 \
    pruning.head_refine_epochs=2 leakage_probe.epochs=0 bootstrap.n=0 'stages=[vanilla,bise,bise_ft]'

note "total: $((SECONDS - started_all)) s (budget 480 s)"
note "what this measured: whether every stage of the paper cell and the CelebA-, CIFAR-10-C- and text-shaped"
note "pipelines runs on device=$DEVICE (a device mismatch at a first batch is the bug class of issue 19: see the"
note "step's log), images/s, peak memory and synchronising calls per loop epoch (throughput.json; target <= 1 per"
note "epoch), each stage's seconds, the full paper cell extrapolated, and pruned == gated on the device (exact)."
note "GPU figures go into README's GPU section."
tar -czf "$out/logs.tar.gz" -C "$work" logs runs 2>/dev/null
note "logs and records: $out/logs.tar.gz"
