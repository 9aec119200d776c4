"""The Python steps of benchmarks/gpu_check.sh: generated data in the real layouts, per-loop throughput with peak
memory and host synchronisations, and per-stage times of a run read from its run.log.

    python benchmarks/gpu_steps.py celeba ROOT [--images N]          CelebA torchvision layout, random JPEGs
    python benchmarks/gpu_steps.py cifar10c ROOT [--per-class N]     Corrupted CIFAR-10 (DFA release layout)
    python benchmarks/gpu_steps.py tokenizer DIR                     a WordPiece vocabulary of the synthetic text
    python benchmarks/gpu_steps.py throughput --out FILE [--device cuda] [OVERRIDES ...]
    python benchmarks/gpu_steps.py stages RUN_DIR [--out FILE]       stage times from run.log, epoch rates

`throughput` times one epoch of every training and search loop of the paper's BiasedMNIST cell (SimpleConvNet
width 1, rho 0.99, the paper's batch sizes) on the real data: images/s, peak device memory and, on CUDA, the
synchronising calls counted by torch.cuda.set_sync_debug_mode; then the full cell's time extrapolated from those
rates (the fixed costs, evaluation and DFR, come from the shortened cell's `stages` report). Generated data are
random pixels: they test the code path and its speed, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------- generated data

def write_celeba(root: Path, images: int, seed: int = 0) -> Path:
    """A CelebA folder in torchvision's layout: `images` random 178 x 218 JPEGs, 80 % in partition 0 (training),
    20 % in partition 1 (BISE's test); (Blond_Hair, Male) groups of 40/40/15/5 %, as skewed as CelebA's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    groups = rng.choice(4, size=images, p=[0.4, 0.4, 0.15, 0.05])
    partition = (rng.random(images) < 0.2).astype(int)
    names = [f"{i + 1:06d}.jpg" for i in range(images)]
    lines = [str(images), "5_o_Clock_Shadow Blond_Hair Male Young"]
    for name, group in zip(names, groups, strict=True):
        blond, male = (1 if group in (2, 3) else -1), (1 if group in (1, 3) else -1)
        lines.append(f"{name}  -1 {blond:2d} {male:2d}  1")
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition,
                                                                                        strict=True)))
    for name in names:
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, quality=90)
    return root


def write_cifar10c(root: Path, per_class: int, seed: int = 0) -> Path:
    """A Corrupted CIFAR-10 release tree (the DFA layout read by dataset.source=files) of random 32 x 32 PNGs:
    for rho 0.99 (folder 1pct) `per_class` aligned and per_class // 10 + 1 conflicting training images per class,
    per_class // 10 + 1 validation and per_class // 2 test images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    index = 0
    small = per_class // 10 + 1
    for folder, n, aligned in (("1pct/align", per_class, True), ("1pct/conflict", small, False),
                               ("1pct/valid", small, True), ("test", max(per_class // 2, 2), None)):
        for label in range(10):
            (root / folder / str(label)).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                bias = label if aligned or (aligned is None and k % 2 == 0) else (label + 1 + k) % 10
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / str(label) / f"{index}_{label}_{bias}.png")
                index += 1
    return root


def write_tokenizer(folder: Path) -> Path:
    """A BERT WordPiece tokenizer whose vocabulary is every word of the synthetic CivilComments generator (plus
    letters, digits and punctuation), so the text step needs no downloaded vocabulary (MiniLM is 83 MB)."""
    from bise_cli.data import synthetic_text as st

    words: set[str] = set()
    for group in (st.MENTIONS, st.TOPICS, st.OPENERS, st.TOXIC, st.FRIENDLY,
                  [w for _, w in st.IDENTITIES], *[v for k, v in vars(st).items() if k.isupper()
                                                   and isinstance(v, list) and v and isinstance(v[0], str)]):
        for text in group:
            words.update(re.findall(r"[a-z0-9']+", str(text).lower()))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + list(".,:;!?-'\"()/&")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars[:36]],
             *sorted(words - set(chars))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    return folder


# ---------------------------------------------------------------------------------------------- throughput

class Loop:
    """Times one loop: wall seconds (device synchronised), peak device memory, synchronising calls (CUDA)."""

    def __init__(self, device):
        import torch
        self.torch, self.device = torch, device
        self.rows: list[dict] = []

    def __call__(self, name: str, images: int, fn):
        torch, cuda = self.torch, self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
        row = {"loop": name, "images": images, "seconds": round(seconds, 3),
               "images_per_s": round(images / seconds, 1),
               "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
               "syncs": syncs}
        self.rows.append(row)
        print(f"  {name:<38} {row['images_per_s']:>10.1f} images/s  {seconds:7.2f} s  peak "
              f"{row['peak_mb']} MB  syncs {syncs}", flush=True)
        return out


def throughput(args) -> None:
    import torch

    from bise_cli.baselines.lff import train_lff
    from bise_cli.core.precision import configure_backends, configure_determinism
    from bise_cli.data.base import place_splits
    from bise_cli.method.probe import feature_epoch
    from bise_cli.method.reweighting import sample_weights
    from bise_cli.method.search import _Heads, _mask_epoch
    from bise_cli.method.train import fit, freeze, predict
    from bise_cli.models.masking import GateSet, capture_input
    from bise_cli.run import pipeline, stages

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_config

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_determinism(True)
    configure_backends(device, True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = compose_config(["experiment=paper/biased_mnist", "rho=0.99", "seed=0", *args.overrides])
    bundle = pipeline.load_data(cfg)
    bundle.splits = place_splits(bundle.splits, device)
    train, search, val, test = (bundle[s] for s in ("train", "search", "val", "test"))
    t, p = cfg["train"], stages.pruning_settings(cfg["pruning"])
    ctx = stages.Context(cfg, bundle, device, None, None, "")
    torch.manual_seed(0)
    model = ctx.new_backbone().to(device)
    loop = Loop(device)
    print(f"throughput on {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}): "
          f"train {len(train)}, search {len(search)}, val {len(val)}, test {len(test)}", flush=True)
    one_epoch = dataclasses.replace(ctx.recipe("train"), epochs=1, scheduler="none", milestones=())
    loop("warm-up (10 batches, not counted)", 10 * t["batch_size"],
         lambda: fit(model, train.subset(torch.arange(10 * t["batch_size"])), one_epoch, device=device))
    loop.rows.pop()
    loop("vanilla: fit epoch", len(train), lambda: fit(model, train, one_epoch, device=device))
    freeze(model)
    # The pass the search and fine-tuning make every epoch to select their result (on val).
    loop("evaluation: predict pass", len(val), lambda: predict(model, val, ctx.cfg["eval_batch_size"], device))
    z = loop("search: feature pass (head cache)", len(search),
             lambda: predict(model, search, p.eval_batch_size, device, features=True, host=False)["z"])
    gates = GateSet(model.gate_points(), init=p.gate_init).to(device).attach(model)
    generator = torch.Generator().manual_seed(0)
    heads = _Heads(model, search, bundle.num_bias, p, True, generator, 0, device)
    loop("search: bias-head epoch (cached)", len(search),
         lambda: feature_epoch(heads.pairs, z, search.b, p.batch_size, generator))
    weights = sample_weights(ctx.reweighting(), search.y, search.b, bundle.num_classes, bundle.num_bias,
                             bundle.nominal_rho).to(device)
    mask_opt = torch.optim.SGD(gates.parameters(), lr=p.mask_lr, momentum=p.mask_momentum)

    class Bar:
        def advance_batch(self):
            pass

    gates.set_mode("masked")
    with capture_input(model.classifier) as tap:
        loop("search: mask epoch", len(search),
             lambda: _mask_epoch(model, gates, heads, mask_opt, search, weights, p, bundle.num_bias, generator,
                                 device, 1, Bar(), tap))
    masks = gates.binary_masks()
    gates.detach()
    tuned = copy.deepcopy(model)
    for param in tuned.parameters():
        param.requires_grad_(True)
    ft_gates = GateSet(tuned.gate_points()).to(device).attach(tuned)
    ft_gates.load_binary_masks(masks)
    ft_gates.set_mode("fixed")
    loop("bise_ft: fit epoch (fixed gates)", len(search),
         lambda: fit(tuned, search, dataclasses.replace(ctx.recipe("finetune"), epochs=1, scheduler="none",
                                                 milestones=()), sample_weights=weights, device=device))
    loop("lff: epoch (two models)", len(train),
         lambda: train_lff(ctx.new_backbone, train, one_epoch, device=device))
    rates = {row["loop"]: row["images_per_s"] for row in loop.rows}
    estimate = extrapolate(cfg, p, rates, len(train), len(search), len(val))
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "torch": torch.__version__, "sizes": {"train": len(train), "search": len(search), "val": len(val),
                                                    "test": len(test)},
              "loops": loop.rows, "paper_cell_epoch_seconds": estimate}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("paper cell (BiasedMNIST rho 0.99, one seed), epoch loops extrapolated from these rates:")
    for stage, seconds in estimate.items():
        print(f"  {stage:<16} {seconds / 60:8.1f} min")


def extrapolate(cfg: dict, p, rates: dict, n_train: int, n_search: int, n_val: int) -> dict:
    """Seconds of the epoch loops of the full paper cell at the measured rates (evaluation passes included;
    the fixed costs, DFR's logistic regressions and the metrics of each stage, are not)."""
    t, f = cfg["train"], cfg["finetune"]
    drops = p.num_epochs // p.tau_period
    evaluate = rates["evaluation: predict pass"]
    out = {
        "vanilla": t["epochs"] * n_train / rates["vanilla: fit epoch"],
        "bise": (p.num_epochs * (n_search / rates["search: mask epoch"] + n_val / evaluate)
                 + (p.head_pretrain_epochs + drops * p.head_refine_epochs) * n_search
                 / rates["search: bias-head epoch (cached)"]
                 + (1 + drops) * n_search / rates["search: feature pass (head cache)"]),
        "bise_ft": f["epochs"] * (n_search / rates["bise_ft: fit epoch (fixed gates)"] + n_val / evaluate),
        "lff": t["epochs"] * n_train / rates["lff: epoch (two models)"],
    }
    out["reweighted_ft"] = out["bise_ft"]
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- stages

STAGE_LINE = re.compile(r"^\[(?P<time>[^\]]+)\].*stage (?P<stage>\w+) recorded: (?P<seconds>[\d.]+) s")
EPOCH_LINE = re.compile(r"\] - (?P<what>.+?) epoch (?P<i>\d+)/(?P<n>\d+) .*\((?P<elapsed>[\d.]+)s\)")


def stage_times(run_dir: Path) -> dict:
    """{stage: seconds} from the run's log lines `stage X recorded: S s`, and per loop the seconds per epoch
    (from the progress lines `<loop> epoch i/n ... (elapsed s)`, whose first epoch includes warm-up)."""
    stages_seen: dict[str, float] = {}
    epochs: dict[str, list[float]] = {}
    for line in (run_dir / "run.log").read_text().splitlines():
        match = STAGE_LINE.search(line)
        if match:
            stages_seen[match["stage"]] = stages_seen.get(match["stage"], 0.0) + float(match["seconds"])
        match = EPOCH_LINE.search(line)
        if match:
            epochs.setdefault(match["what"], []).append(float(match["elapsed"]))
    per_epoch = {what: round((times[-1] - times[0]) / (len(times) - 1), 3) if len(times) > 1 else times[0]
                 for what, times in epochs.items()}
    return {"stages": stages_seen, "seconds_per_epoch_after_the_first": per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("celeba")
    c.add_argument("root")
    c.add_argument("--images", type=int, default=2000)
    c = sub.add_parser("cifar10c")
    c.add_argument("root")
    c.add_argument("--per-class", type=int, default=200)
    c = sub.add_parser("tokenizer")
    c.add_argument("folder")
    c = sub.add_parser("throughput")
    c.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset.source=files dataset.root=DIR")
    c.add_argument("--out", required=True)
    c.add_argument("--device", default="cuda")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    c = sub.add_parser("stages")
    c.add_argument("run_dir")
    c.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "celeba":
        print(write_celeba(Path(args.root), args.images))
    elif args.command == "cifar10c":
        print(write_cifar10c(Path(args.root), args.per_class))
    elif args.command == "tokenizer":
        print(write_tokenizer(Path(args.folder)))
    elif args.command == "throughput":
        throughput(args)
    else:
        report = stage_times(Path(args.run_dir))
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
