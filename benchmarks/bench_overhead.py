"""A run's fixed costs and its whole-run throughput against the bare PyTorch loop, for one or more source trees.

For a short vanilla run (`--epochs`, default 3; BiasedMNIST from `--mnist`, `--max-samples` training images,
SimpleConvNet `--width`) it times, in one process and alternating:
- the bare loop: the same backbone, SGD, batch size and epochs over the same training tensors, nothing else;
- `pipeline.run` with stages=[vanilla] and an empty cache, from each source tree given with `--trees` (e.g. the
  merge commit exported with `git archive` and this checkout), in a subprocess whose own clock starts at
  `pipeline.run` (imports excluded), reporting the run's wall time and its training time (`train_seconds`).
It prints per tree: whole-run seconds, training seconds, fixed cost (the difference: data fingerprint, the cost
estimate, evaluation with the leakage probe, latency, records and report) and the throughput ratio
bare seconds / run seconds. Compare ratios within one invocation (a shared machine's absolute figures drift).

    python benchmarks/bench_overhead.py --trees /tmp/before,. --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, tempfile
sys.path.insert(0, sys.argv[1] + "/tests")
from conftest import compose_config
from bise_cli.run import pipeline
cfg = compose_config(json.loads(sys.argv[2]))
with tempfile.TemporaryDirectory() as tmp:
    cfg["output_root"] = tmp
    started = time.perf_counter()
    records = pipeline.run(cfg, tmp + "/run")
    wall = time.perf_counter() - started
    status = json.loads(open(tmp + "/run/status.json").read())
print(json.dumps({"wall": wall, "train": records[0]["train_seconds"], "estimate": status.get("estimated_seconds")}))
"""


def overrides(args) -> list[str]:
    return ["dataset=biased_mnist", "dataset.source=files", f"dataset.root={args.mnist}",
            f"dataset.max_samples={args.max_samples}", f"backbone.width={args.width}", f"train.epochs={args.epochs}",
            "train.milestones=[1000]", "stages=[vanilla]", "cache=false", f"threads={args.threads}"]


def bare_loop(args) -> float:
    """Seconds of the bare PyTorch loop: the same model, data, optimiser and epochs, nothing else."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "tests"))
    from bise_cli.models import build_backbone
    from bise_cli.run import pipeline

    from conftest import compose_config

    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides(args))
    split = pipeline.load_data(cfg)["train"]
    t = cfg["train"]
    model = build_backbone("simple_convnet", 10, width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    x_all, y_all = split.x, split.y
    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(y_all))
        for i in range(0, len(order), t["batch_size"]):
            idx = order[i:i + t["batch_size"]]
            loss = F.cross_entropy(model(split.encode(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - started


def whole_run(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), json.dumps(overrides(args))], cwd=tree, env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=".", help="comma-separated source trees to time (default: this one)")
    parser.add_argument("--mnist", default=str(REPO / "datasets" / "mnist"))
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    bare, runs = [], {tree: [] for tree in trees}
    for _ in range(args.reps):  # alternated, so a change in the machine's load hits every variant alike
        bare.append(bare_loop(args))
        for tree in trees:
            runs[tree].append(whole_run(tree, args))
    b = sorted(bare)[len(bare) // 2]
    print(f"{args.epochs}-epoch vanilla run, BiasedMNIST {args.max_samples} training images, width {args.width}, "
          f"{args.threads} thread(s), median of {args.reps}")
    print("| tree | whole run (s) | training (s) | fixed cost (s) | estimate (s) | bare loop (s) | ratio bare/run |")
    print("|---|---|---|---|---|---|---|")
    for tree, results in runs.items():
        r = sorted(results, key=lambda x: x["wall"])[len(results) // 2]
        print(f"| {tree} | {r['wall']:.1f} | {r['train']:.1f} | {r['wall'] - r['train']:.1f} | "
              f"{r['estimate'] if r['estimate'] is not None else '-'} | {b:.1f} | {b / r['wall']:.2f} |")


if __name__ == "__main__":
    main()
