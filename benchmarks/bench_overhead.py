"""A run's fixed costs, part by part, and its whole-run throughput against the bare PyTorch loop, for one or more
source trees.

For a short vanilla run (BiasedMNIST from `--mnist` or the embedded digits, `--source`; `--max-samples` training
images, SimpleConvNet `--width`) it times, in one process and alternating (so a change in the machine's load
hits every variant alike):
- the bare loop: the same backbone, SGD, batch size and epochs over the same training tensors, nothing else;
- `pipeline.run` with stages=[vanilla] and an empty cache, from each source tree given with `--trees` (e.g. a
  worktree of the start commit and this checkout), in a subprocess. Its clock for the run starts at
  `pipeline.run` (imports excluded, timed apart); the process's own wall time (interpreter start, imports,
  config composition, run) is timed by the parent.
Two tables:
- fixed costs of a `--breakdown-epochs` (default 2) run, part by part: each part is the time spent inside one
  function of the run (wrapped in the child, so any tree can be timed): data load, fingerprint, cost estimate,
  model build, training, evaluation (and inside it the leakage probe), latency report, records, report, card,
  plots (inside report and card), status files; `fixed` = run wall time - training;
- the `--epochs` (default 3) run's wall time against the bare loop, as the ratio bare seconds / run seconds (and
  bare / process seconds, imports included), and against the bare loop plus bare forward passes over the splits
  the run evaluates (test, val, search): the evaluation's forward work is work the bare loop never does.
Compare ratios within one invocation (a shared machine's absolute figures drift); `uptime` is printed. Every
figure is also given in CPU seconds (`time.process_time`, one thread): on a machine loaded by other processes
the wall times swing by tens of percent between identical runs, the CPU times much less.

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

# (label, module, attribute): the functions whose time is a part of the run. A missing one (another tree's
# layout) is skipped and reads "-". Nested parts (the probe inside evaluation, plots inside report and card) are
# also counted in their parent.
PARTS = [  # the subpackage layout first, then the flat layout of older trees
    ("data load", "bise_cli.run.pipeline", "load_data"),
    ("fingerprint", "bise_cli.run.pipeline", "fingerprint_bundle"),
    ("cost estimate", "bise_cli.run.pipeline", "log_estimate"),
    ("model build", "bise_cli.run.stages", "build_backbone"),
    ("training", "bise_cli.run.stages", "fit"),
    ("evaluation", "bise_cli.run.stages", "evaluate_model"),
    ("  leakage probe", "bise_cli.method.evaluate", "fresh_probe_leakage"),
    ("latency report", "bise_cli.run.stages", "efficiency_report"),
    ("records", "bise_cli.run.records", "RunDir.add_record"),
    ("report", "bise_cli.reporting.card", "write_report"),  # inside the card since report.md is its text
    ("report", "bise_cli.run.pipeline", "write_report"),  # trees where the pipeline wrote the report itself
    ("card", "bise_cli.run.pipeline", "write_run_card"),
    ("  plots", "bise_cli.reporting.card", "plot_group_accuracy"),
    ("  plots", "bise_cli.reporting.plots", "plot_kept_units"),
    ("  plots", "bise_cli.reporting.plots", "plot_search_curves"),
    ("status files", "bise_cli.run.records", "RunDir.set_status"),
    ("status files", "bise_cli.run.records", "RunDir.finish"),
    ("data load", "bise_cli.pipeline", "load_data"),
    ("fingerprint", "bise_cli.pipeline", "fingerprint_bundle"),
    ("cost estimate", "bise_cli.pipeline", "log_estimate"),
    ("model build", "bise_cli.stages", "build_backbone"),
    ("training", "bise_cli.stages", "fit"),
    ("evaluation", "bise_cli.stages", "evaluate_model"),
    ("  leakage probe", "bise_cli.evaluate", "fresh_probe_leakage"),
    ("latency report", "bise_cli.stages", "efficiency_report"),
    ("records", "bise_cli.records", "RunDir.add_record"),
    ("report", "bise_cli.pipeline", "write_report"),
    ("card", "bise_cli.pipeline", "write_run_card"),
    ("  plots", "bise_cli.card", "plot_group_accuracy"),
    ("  plots", "bise_cli.plots", "plot_kept_units"),
    ("  plots", "bise_cli.plots", "plot_search_curves"),
    ("status files", "bise_cli.records", "RunDir.set_status"),
    ("status files", "bise_cli.records", "RunDir.finish"),
]

CHILD = """
import importlib, json, sys, time, tempfile
started = time.perf_counter()
try:
    import bise_cli.run.pipeline
except ImportError:  # a tree from before the subpackages
    import bise_cli.pipeline
imported = time.perf_counter() - started
sys.path.insert(0, sys.argv[1] + "/tests")
from conftest import compose_config
try:
    from bise_cli.run import pipeline
except ImportError:
    from bise_cli import pipeline
parts, cpu = {}, {}

def wrap(label, module, attribute):
    try:
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
    except (ImportError, AttributeError):
        return
    def timed(*args, **kwargs):
        begun, begun_cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            parts[label] = parts.get(label, 0.0) + time.perf_counter() - begun
            cpu[label] = cpu.get(label, 0.0) + time.process_time() - begun_cpu
    parts.setdefault(label, 0.0)
    cpu.setdefault(label, 0.0)
    setattr(owner, name, timed)

for label, module, attribute in json.loads(sys.argv[3]):
    wrap(label, module, attribute)
started = time.perf_counter()
cfg = compose_config(json.loads(sys.argv[2]))
composed = time.perf_counter() - started
with tempfile.TemporaryDirectory() as tmp:
    cfg["output_root"] = tmp
    started, started_cpu = time.perf_counter(), time.process_time()
    records = pipeline.run(cfg, tmp + "/run")
    wall, wall_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    status = json.loads(open(tmp + "/run/status.json").read())
print(json.dumps({"wall": wall, "train": records[0]["train_seconds"], "estimate": status.get("estimated_seconds"),
                  "import": imported, "compose": composed, "parts": parts, "cpu": cpu, "wall_cpu": wall_cpu,
                  "metrics": {k: records[0].get(k) for k in ("acc_unbiased", "leakage", "val_acc_unbiased")}}))
"""


def overrides(args, epochs: int) -> list[str]:
    return ["dataset=biased_mnist", f"dataset.source={args.source}", f"dataset.root={args.mnist}",
            f"dataset.max_samples={args.max_samples}", f"backbone.width={args.width}", f"train.epochs={epochs}",
            "train.milestones=[1000]", "stages=[vanilla]", "cache=false", f"threads={args.threads}"]


def bare_loop(args) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of the bare PyTorch loop (the same model, data, optimiser and epochs, nothing else), and
    of bare forward passes over the splits a run evaluates (test, val, and search for the leakage probe's
    features; batch 500, no_grad): the least an evaluation can cost."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "tests"))
    from bise_cli.models import build_backbone
    from bise_cli.run import pipeline

    from conftest import compose_config

    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides(args, args.epochs))
    split = pipeline.load_data(cfg)["train"]
    t = cfg["train"]
    model = build_backbone("simple_convnet", 10, width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    x_all, y_all = split.x, split.y
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        order = torch.randperm(len(y_all))
        for i in range(0, len(order), t["batch_size"]):
            idx = order[i:i + t["batch_size"]]
            loss = F.cross_entropy(model(split.encode(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    train = (time.perf_counter() - started, time.process_time() - started_cpu)
    bundle = pipeline.load_data(cfg)
    model.eval()
    started, started_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for name in ("test", "val", "search"):
            split = bundle[name]
            for i in range(0, len(split), 500):
                model(split.encode(split.x[i:i + 500])).argmax(1)
    return train, (time.perf_counter() - started, time.process_time() - started_cpu)


def whole_run(tree: Path, args, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), json.dumps(overrides(args, epochs)),
                          json.dumps(PARTS)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - started
    return result


def median(results: list[dict], key: str = "wall") -> dict:
    return sorted(results, key=lambda r: r[key])[len(results) // 2]


def breakdown_table(runs: dict[Path, list[dict]], epochs: int) -> list[str]:
    """Fixed costs part by part (seconds), one column per tree (the run with the median wall time)."""
    chosen = {tree: median(results) for tree, results in runs.items()}
    lines = [f"Fixed costs of a {epochs}-epoch vanilla run (wall / CPU seconds inside each function; indented "
             "parts are also counted in the part above)", "",
             "| part | " + " | ".join(str(tree) for tree in chosen) + " |", "|---|" + "---|" * len(chosen)]
    labels = list(dict.fromkeys(label for label, _, _ in PARTS))
    for label in labels:
        cells = [f"{r['parts'][label]:.2f} / {r['cpu'][label]:.2f}" if label in r["parts"] else "-"
                 for r in chosen.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| run CPU time (pipeline.run) | " + " | ".join(f"{r['wall_cpu']:.2f}" for r in chosen.values())
                 + " |")
    for label, value in (("import bise_cli.pipeline", lambda r: r["import"]),
                         ("config composition", lambda r: r["compose"]),
                         ("run wall time (pipeline.run)", lambda r: r["wall"]),
                         ("fixed = run wall - training", lambda r: r["wall"] - r["train"]),
                         ("process wall time (imports included)", lambda r: r["process"])):
        lines.append(f"| {label} | " + " | ".join(f"{value(r):.2f}" for r in chosen.values()) + " |")
    lines.append("| metrics (acc_unbiased, leakage, val_acc_unbiased) | "
                 + " | ".join(", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r["metrics"].values())
                              for r in chosen.values()) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=".", help="comma-separated source trees to time (default: this one)")
    parser.add_argument("--mnist", default=str(REPO / "datasets" / "mnist"))
    parser.add_argument("--source", choices=("files", "embedded"), default="files",
                        help="files: the MNIST files in --mnist (test 10k images); embedded: the package's 5k "
                        "digits (4,000 training, test 1,000, search 3,333, val 667), a run whose evaluation "
                        "is small")
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--breakdown-epochs", type=int, default=2, help="epochs of the run broken down part by "
                        "part (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    bare, bare_eval, runs = [], [], {tree: [] for tree in trees}
    parts = {tree: [] for tree in trees}
    for _ in range(args.reps):  # alternated, so a change in the machine's load hits every variant alike
        for tree in trees:
            if args.breakdown_epochs:
                parts[tree].append(whole_run(tree, args, args.breakdown_epochs))
        train, evaluation = bare_loop(args)
        bare.append(train)
        bare_eval.append(evaluation)
        print(f"rep {len(bare)}: bare loop {train[0]:.1f} s wall / {train[1]:.1f} s CPU, bare eval "
              f"{evaluation[0]:.1f} / {evaluation[1]:.1f}", flush=True)
        for tree in trees:
            runs[tree].append(whole_run(tree, args, args.epochs))
    if args.breakdown_epochs:
        print("\n".join(breakdown_table(parts, args.breakdown_epochs)) + "\n")
    (b, b_cpu), (e, e_cpu) = sorted(bare)[len(bare) // 2], sorted(bare_eval)[len(bare_eval) // 2]
    print(f"{args.epochs}-epoch vanilla run, BiasedMNIST ({args.source}) {args.max_samples} training images, "
          f"width {args.width}, "
          f"{args.threads} thread(s), median of {args.reps}. bare loop: training only; bare eval: forward passes "
          "over test, val and search (the evaluation's own work, which the bare loop does not do)")
    print("| tree | whole run (s) | training (s) | fixed cost (s) | estimate (s) | bare loop (s) | ratio bare/run "
          "| process (s) | ratio bare/process | bare eval (s) | ratio (bare + bare eval)/run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tree, results in runs.items():
        r = median(results)
        print(f"| {tree} | {r['wall']:.1f} | {r['train']:.1f} | {r['wall'] - r['train']:.1f} | "
              f"{r['estimate'] if r['estimate'] is not None else '-'} | {b:.1f} | {b / r['wall']:.2f} | "
              f"{r['process']:.1f} | {b / r['process']:.2f} | {e:.1f} | {(b + e) / r['wall']:.2f} |")
    print("\nThe same in CPU seconds (one thread: the work done, whatever the other processes on the machine do)")
    print("| tree | run CPU (s) | training CPU (s) | bare loop CPU (s) | ratio bare/run | bare eval CPU (s) "
          "| ratio (bare + bare eval)/run |")
    print("|---|---|---|---|---|---|---|")
    for tree, results in runs.items():
        r = median(results, "wall_cpu")
        print(f"| {tree} | {r['wall_cpu']:.1f} | {r['cpu']['training']:.1f} | {b_cpu:.1f} | "
              f"{b_cpu / r['wall_cpu']:.2f} | {e_cpu:.1f} | {(b_cpu + e_cpu) / r['wall_cpu']:.2f} |")
    for tree, results in runs.items():
        print(f"each run of {tree}: " + "; ".join(f"{r['wall']:.1f} s wall / {r['wall_cpu']:.1f} s CPU"
                                                  for r in results))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
