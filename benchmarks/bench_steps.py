"""Per-step costs of bise against a bare PyTorch loop, in one process and one table, plus a run's fixed costs.

For SimpleConvNet at each width (batch 100, 28x28x3 inputs), images/s and the ratio to the bare fp32 step of:
- `bare step`: a plain PyTorch training step (same model, SGD momentum 0.9, wd 1e-4) on a batch already
  encoded as a float tensor;
- `fit step`: bise_cli.method.train.fit over a small uint8 Split (its encode, shuffling, loss sum included), per step;
- `mask step`: the BISE mask step (frozen model, GateSet in masked mode, one linear bias head,
  bise_cli.method.search._mask_epoch), per step;
- `head epoch`: bias-head SGD on cached features (bise_cli.method.probe.feature_epoch), per image;
- `eval`: bise_cli.method.train.predict, per image;
in the variants fp32, channels_last, torch.compile (compile time reported separately, timed after warm-up)
and bf16 autocast. Then the fixed costs of a 2-epoch run: `import bise_cli.run.pipeline`, reading MNIST and
building BiasedMNIST, config composition, evaluation (bise's evaluate_model + efficiency_report) and records.
Timings use torch.utils.benchmark.Timer (blocked_autorange). On a shared machine compare ratios, not absolutes.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from bise_cli.core.precision import autocast, with_eval_batch
from bise_cli.data.base import Split
from bise_cli.method.probe import feature_epoch, make_head
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import SampleWeights
from bise_cli.method.search import SearchSettings, _mask_epoch
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone
from bise_cli.models.masking import GateSet, capture_input

from common import parse_args

BATCH = 100
EVAL_IMAGES = 2000
VARIANTS = ("fp32", "channels_last", "compile", "bf16")
REPO = Path(__file__).resolve().parent.parent


def cpu_description() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = {name: name in flags for name in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"CPU {model}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in has.items())
            + (f"; load average {load[0]:.2f} (1 min)" if load[0] != "?" else ""))


def seconds_per_call(fn, min_run_time: float) -> float:
    """Median seconds per call of `fn` (the Timer's block-size estimate doubles as the warm-up)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def encode(t: torch.Tensor) -> torch.Tensor:
    return t.float().div(127.5).sub(1)


def uint8_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y, torch.randint(0, 10, (n,), generator=g), encode)


def prepare(model, variant: str):
    """The model in `variant`'s layout (compile happens lazily, on the first call) and an autocast context."""
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if variant == "compile":
        model = torch.compile(model)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()
    return model, amp


def layout(x: torch.Tensor, variant: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x


def bare_step(width: float, variant: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model, amp = prepare(build_backbone("simple_convnet", 10, width=width), variant)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = layout(x, variant)

    def step():
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def fit_step(width: float, variant: str, split: Split):
    torch.manual_seed(0)
    base = build_backbone("simple_convnet", 10, width=width)
    model, _ = prepare(base, variant)
    amp = autocast("bf16" if variant == "bf16" else "fp32", "cpu")
    # channels_last: the weights are channels_last, so each conv's output is too (the input stays NCHW).
    return lambda: fit(model, split, TrainRecipe(epochs=1, batch_size=BATCH, lr=0.01), amp=amp)


def mask_step(width: float, variant: str, split: Split):
    torch.manual_seed(0)
    base = freeze(build_backbone("simple_convnet", 10, width=width))
    gates = GateSet(base.gate_points()).attach(base)
    gates.set_mode("masked")
    model, amp = prepare(base, variant)
    settings = SearchSettings(batch_size=BATCH)
    head = make_head(base.classifier.in_features, 10, 0.1, 0.9, 1e-4, seed=0)
    heads = SimpleNamespace(pairs=[head])
    mask_opt = torch.optim.SGD(gates.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    weights = SampleWeights(torch.ones(100), 10)
    bar = SimpleNamespace(advance_batch=lambda n=1: None)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        # bf16: the whole step under autocast here (the pipeline autocasts the forward only).
        with amp, capture_input(base.classifier) as tap:
            _mask_epoch(model, gates, heads, mask_opt, split, weights, settings, 10, generator, "cpu", 1, bar, tap)
    return epoch


def head_epoch(width: float, n: int):
    dim = build_backbone("simple_convnet", 10, width=width).classifier.in_features
    z, b = torch.randn(n, dim), torch.randint(0, 10, (n,))
    pairs = [make_head(dim, 10, 0.1, 0.9, 1e-4, seed=0)]
    generator = torch.Generator().manual_seed(0)
    return lambda: feature_epoch(pairs, z, b, BATCH, generator)


def eval_pass(width: float, variant: str, split: Split):
    torch.manual_seed(0)
    model, _ = prepare(freeze(build_backbone("simple_convnet", 10, width=width)), variant)
    amp = autocast("bf16" if variant == "bf16" else "fp32", "cpu")
    return lambda: predict(model, split, 500, amp=amp)


def run_table(widths: list[float], variants: list[str], n_batches: int, min_run_time: float) -> list[str]:
    n = n_batches * BATCH
    split = uint8_split(n)
    x, y = encode(split.x[:BATCH]), split.y[:BATCH]
    rows, notes = [], []
    for width in widths:
        builders = {
            "bare step": (lambda v, w=width: bare_step(w, v, x, y), BATCH),
            "fit step": (lambda v, w=width: fit_step(w, v, split), n),
            "mask step": (lambda v, w=width: mask_step(w, v, split), n),
            "head epoch (cached z)": (lambda v, w=width: head_epoch(w, n), n),
            "eval": (lambda v, w=width: eval_pass(w, v, split), n),
        }
        base_ips = None
        for name, (build, images) in builders.items():
            cells = {}
            for variant in variants:
                if name == "head epoch (cached z)" and variant != "fp32":
                    cells[variant] = "-"
                    continue
                try:
                    fn = build(variant)
                    if variant == "compile":
                        started = time.perf_counter()
                        fn()  # compiles (and runs once)
                        notes.append(f"compile of {name} at width {width}: {time.perf_counter() - started:.1f} s "
                                     "(first call incl. one run; inductor cache "
                                     f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')})")
                    ips = images / seconds_per_call(fn, min_run_time)
                except Exception as error:  # a variant that does not work here is reported, not fatal
                    cells[variant] = "error"
                    notes.append(f"{name} {variant} width {width}: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:120]}")
                    continue
                if name == "bare step" and variant == "fp32":
                    base_ips = ips
                cells[variant] = f"{ips:7.0f} ({ips / base_ips:4.2f}x)" if base_ips else f"{ips:7.0f}"
            rows.append(f"| {width:<5} | {name:<21} | " + " | ".join(f"{cells[v]:>17}" for v in variants) + " |")
            print(rows[-1], flush=True)
    return rows + [""] + [f"- {note}" for note in notes]


def fixed_costs(mnist: str, reps: int) -> list[str]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bise_cli.cli import CONF_DIR
    from bise_cli.data.biased_mnist import build_biased_mnist
    from bise_cli.data.mnist_source import load_digits
    from bise_cli.method.evaluate import evaluate_model
    from bise_cli.reporting.card import write_run_card
    from bise_cli.reporting.efficiency import efficiency_report
    from bise_cli.run.records import RunDir, make_record

    lines = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for label, code in (("python -c pass", "pass"), ("import bise_cli.run.pipeline", "import bise_cli.run.pipeline")):
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
            times.append(time.perf_counter() - started)
        lines.append(f"| `{label}` (fresh interpreter) | {sorted(times)[len(times) // 2]:.2f} s |")
    started = time.perf_counter()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["dataset=biased_mnist", f"dataset.root={mnist}",
                                                                  "train.epochs=2", "backbone.width=0.25"]),
                                     resolve=True)
    lines.append(f"| config composition (hydra compose) | {time.perf_counter() - started:.2f} s |")
    try:
        started = time.perf_counter()
        digits = load_digits("files", mnist)
        read = time.perf_counter() - started
        started = time.perf_counter()
        bundle = build_biased_mnist(digits, rho=0.99, seed=0)
        build = time.perf_counter() - started
        lines.append(f"| reading the MNIST IDX files ({mnist}) | {read:.2f} s |")
        lines.append("| building BiasedMNIST (rho 0.99, all 4 splits: "
                     + ", ".join(f"{k} {len(v)}" for k, v in bundle.splits.items()) + f") | {build:.2f} s |")
    except Exception as error:
        lines.append(f"| MNIST files not readable at {mnist}: {type(error).__name__} | n/a |")
        return lines
    # Evaluation on the first EVAL_IMAGES of every split (a loaded 2-core CPU would take minutes on 50k + 20k).
    bundle = replace(bundle, splits={k: v.subset(torch.arange(min(len(v), EVAL_IMAGES)))
                                     for k, v in bundle.splits.items()})
    model = freeze(build_backbone("simple_convnet", 10, width=0.25))
    started = time.perf_counter()
    metrics = evaluate_model(model, bundle, batch_size=with_eval_batch(cfg, "cpu")["eval_batch_size"], device="cpu",
                             probe=cfg["leakage_probe"], seed=0)
    evaluation = time.perf_counter() - started
    example = bundle["test"].encode(bundle["test"].x[:1])
    started = time.perf_counter()
    metrics.update(efficiency_report(model, model, None, example, "cpu", **cfg["latency"]))
    latency = time.perf_counter() - started
    lines.append(f"| evaluation per stage, width 0.25, {EVAL_IMAGES} images per split (test + val + "
                 f"{cfg['leakage_probe']['epochs']}-epoch leakage probe on search) | {evaluation:.2f} s |")
    lines.append(f"| efficiency_report (MACs + latency b1/b100, dense = pruned) | {latency:.2f} s |")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run_dir = RunDir(Path(tmp) / "run")
        for stage in ("vanilla", "bise", "bise_ft"):
            run_dir.add_record(make_record(stage, metrics, cfg))
        write_run_card(run_dir.path, cfg, run_dir.records)
        lines.append(f"| records: 3 stage records + model card and report.md | {time.perf_counter() - started:.2f} s |")
    return lines


def _bare_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """Let `--quick` stand alone (common.parse_args only takes options with values): `--quick` -> `--quick=1`."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        out.append(f"{arg}=1" if arg in flags and following.startswith("--") else arg)
    return out


def main() -> None:
    sys.argv = _bare_flags(sys.argv, ("--quick", "--skip-fixed"))
    args = parse_args(__doc__, widths=(str, "0.25,1.0", "SimpleConvNet widths"),
                      variants=(str, ",".join(VARIANTS), "variants: " + ", ".join(VARIANTS)),
                      batches=(int, 8, "batches per timed epoch (fit, mask, eval)"),
                      min_run_time=(float, 1.0, "seconds the Timer spends per cell (after its warm-up)"),
                      quick=(lambda s: s.lower() in ("1", "true", "yes"), False, "fewer repeats (--quick)"),
                      skip_fixed=(lambda s: s.lower() in ("1", "true", "yes"), False, "skip the fixed costs"))
    if args.quick:
        args.batches, args.min_run_time = min(args.batches, 4), min(args.min_run_time, 0.2)
    # A fresh inductor cache, so that the compile times printed are cold ones (a warm on-disk cache from an
    # earlier run cut them from ~30 s to ~1 s here). Set TORCHINDUCTOR_CACHE_DIR yourself to measure warm ones.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="bench_steps_inductor_")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; allowed: {', '.join(VARIANTS)}")
    print(cpu_description())
    print(f"batch {BATCH}; fit/mask/eval over {args.batches * BATCH} images; images/s (ratio to the bare fp32 step "
          "of the same width)\n")
    print("| width | step                  | " + " | ".join(f"{v:>17}" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    lines = run_table([float(w) for w in args.widths.split(",")], variants, args.batches, args.min_run_time)
    print("\n".join(lines[lines.index(""):]))
    if not args.skip_fixed:
        print("\nFixed costs of a 2-epoch run\n\n| what | time |\n|---|---|")
        for line in fixed_costs(args.mnist, 1 if args.quick else 3):
            print(line, flush=True)


if __name__ == "__main__":
    main()
