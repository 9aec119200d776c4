"""What a run will cost, said before it starts: a few timed training batches, scaled to every stage of the recipe.

`estimate_run` times `TIMED_BATCHES` training steps (forward, backward, a step of the vanilla recipe's optimiser;
after one warm-up step) of a fresh backbone on real training batches, at the vanilla batch size and on the run's
device, and scales the time per sample to the samples every chosen stage processes: vanilla and LfF training, the
BISE search's mask epochs, fine-tuning, and one evaluation per stage (a forward pass, counted as a third of a
training step, plus the fresh leakage probe's epochs on cached features, timed on `PROBE_TIMED_STEPS` steps of
one head). It assumes an empty stage cache (cached stages cost nothing) and ignores the search's linear-head
epochs and each loop's own per-batch work, so a small model's run takes longer than said. The figure goes into
the first lines of the run's log and into status.json (`estimated_seconds`), so that a cluster user sees it too.
A run marked GPU work (`gpu_work: true` in a paper preset), or estimated at more than `CPU_WARNING_HOURS`, says
so in one more line when it runs on a CPU, with the alternatives.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from bise_cli.data.base import DatasetBundle
from bise_cli.method.probe import head_step, make_head, single_thread
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import model_optimizer
from bise_cli.models import build_backbone
from bise_cli.run.registry import required_pruning

log = logging.getLogger(__name__)

TIMED_BATCHES = 2        # training steps timed after one warm-up step
PROBE_TIMED_STEPS = 20   # steps of a leakage-probe head timed after one warm-up step (each takes well under 1 ms)
FORWARD_SHARE = 1 / 3    # an evaluation (forward) pass costs about a third of a training step per sample
CPU_WARNING_HOURS = 2.0  # a CPU run estimated longer than this is called GPU work even without the preset's mark


def seconds_per_sample(cfg: dict, bundle: DatasetBundle, device: torch.device) -> tuple[float, int, float]:
    """(seconds per training sample, batch size timed, seconds per leakage-probe step): the median of
    TIMED_BATCHES steps of a fresh backbone on real training batches, and `probe_step_seconds` on its bottleneck.
    The global RNG is left as it was, so the run draws the same numbers with or without this."""
    b = cfg["backbone"]
    batch_size = int(cfg["train"]["batch_size"])
    split = bundle["train"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_backbone(b["name"], bundle.num_classes, **{k: v for k, v in b.items() if k != "name"})
        model = model.to(device).train()
        # The recipe's own optimiser: Adam's step costs about a fifth more than SGD's on the quickstart's MLP.
        opt = model_optimizer(TrainRecipe.from_section(cfg["train"], "train", milestones=()), model)
        batches = split.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), device=device,
                                augment=True)
        times, warmup = [], math.nan
        for step, (x, y, _) in enumerate(batches):
            started = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:  # the first step warms up (allocations, kernel choice)
                times.append((time.perf_counter() - started) / len(y))
            else:
                warmup = (time.perf_counter() - started) / len(y)
            if step >= TIMED_BATCHES:
                break
        # Without probe epochs nothing would use the timing (the estimate multiplies it by zero steps).
        probe_step = (probe_step_seconds(cfg, bundle, model.classifier.in_features, device)
                      if int(cfg["leakage_probe"]["epochs"]) > 0 else 0.0)
    if not times:  # a training split of one batch: its warm-up step is all there is
        times = [warmup]
    return sorted(times)[len(times) // 2], batch_size, probe_step


def probe_step_seconds(cfg: dict, bundle: DatasetBundle, dim: int, device: torch.device) -> float:
    """Seconds of one step of a fresh leakage-probe head (`leakage_probe.batch_size` features of width `dim`), as
    `feature_epoch` runs it: the mean of PROBE_TIMED_STEPS steps after one warm-up step."""
    probe = cfg["leakage_probe"]
    head, opt = make_head(dim, bundle.num_bias, float(probe["lr"]), 0.9, 1e-4, 0)
    head.to(device)
    z = torch.randn(int(probe["batch_size"]), dim, device=device)
    b = torch.randint(bundle.num_bias, (len(z),), device=device)
    with single_thread():
        head_step(head, opt, z, b)
        started = time.perf_counter()
        for _ in range(PROBE_TIMED_STEPS):
            head_step(head, opt, z, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / PROBE_TIMED_STEPS


def search_epochs(pruning: dict) -> int:
    """Mask epochs of the BISE search (SearchSettings.num_epochs, computed from the config without validating it)."""
    from bise_cli.method.search import SearchSettings
    from bise_cli.run.stages import pruning_settings

    settings = pruning_settings(pruning)
    return settings.num_epochs if isinstance(settings, SearchSettings) else 0


def estimate_run(cfg: dict, bundle: DatasetBundle, device: torch.device) -> dict:
    """{estimated_seconds, per_stage: {stage: seconds}, seconds_per_sample, timed_batch_size, timing_seconds}."""
    started = time.perf_counter()
    per_sample, batch_size, probe_step = seconds_per_sample(cfg, bundle, device)
    chosen = list(cfg["stages"])
    n_train, n_search = len(bundle["train"]), len(bundle["search"])
    n_eval = sum(len(bundle[name]) for name in ("test", "val", "test_conflicting") if bundle.get(name) is not None)
    n_eval += n_search if cfg["leakage_probe"]["epochs"] > 0 else 0  # the probe's features
    vanilla_epochs = 0 if cfg.get("vanilla_checkpoint") else int(cfg["train"]["epochs"])
    samples = {"vanilla": vanilla_epochs * n_train}
    if cfg.get("bias_labels") == "identification":
        samples["vanilla"] += int(cfg["identification"]["epochs"]) * n_train
    # The search runs once for every chosen stage that builds on its masks (the registry says which).
    if any(required_pruning(stage) == "bise" for stage in chosen) and cfg["pruning"]["name"] == "bise":
        samples["bise"] = search_epochs(cfg["pruning"]) * n_search
    for stage in ("bise_ft", "reweighted_ft"):
        if stage in chosen:
            samples[stage] = int(cfg["finetune"]["epochs"]) * n_train
    if "lff" in chosen:
        samples["lff"] = 2 * int(cfg["train"]["epochs"]) * n_train  # two models trained side by side
    seconds = {stage: n * per_sample for stage, n in samples.items()}
    probe = cfg["leakage_probe"]
    probe_steps = int(probe["epochs"]) * math.ceil(n_search / int(probe["batch_size"])) * bundle.num_attributes
    # Each stage evaluated once: forward passes, then the probe's epochs (one head per bias attribute).
    seconds["evaluation"] = len(chosen) * (n_eval * per_sample * FORWARD_SHARE + probe_steps * probe_step)
    total = sum(seconds.values())
    return {"estimated_seconds": round(total, 1), "per_stage": {k: round(v, 1) for k, v in seconds.items()},
            "seconds_per_sample": per_sample, "timed_batch_size": batch_size,
            "timing_seconds": round(time.perf_counter() - started, 2)}


def duration(seconds: float) -> str:
    """`seconds` as a short human duration: 42 s, 12.5 min, 19.3 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report(estimate: dict, cfg: dict, device: torch.device) -> list[str]:
    """The log lines of `estimate`: the run-level figure, and on a CPU for GPU work one line with alternatives."""
    parts = ", ".join(f"{stage} {duration(s)}" for stage, s in estimate["per_stage"].items() if s >= 0.05)
    lines = [f"estimated wall time of this run on {device.type}: {duration(estimate['estimated_seconds'])} "
             f"({parts}; from {TIMED_BATCHES} timed training batches of {estimate['timed_batch_size']}, "
             f"{estimate['seconds_per_sample'] * 1e3:.3g} ms per sample; stages already cached cost less)"]
    hours = estimate["estimated_seconds"] / 3600
    if device.type == "cpu" and (cfg.get("gpu_work") or hours > CPU_WARNING_HOURS):
        lines.append(f"this is GPU work running on a CPU: about {duration(estimate['estimated_seconds'])}; on a "
                     "machine with a GPU use device=cuda, or try experiment=quickstart (a reduced run of about 3 "
                     "minutes)")
    return lines


def log_estimate(cfg: dict, bundle: DatasetBundle, device: torch.device) -> dict:
    """Estimate the run (`estimate_run`) and log it; returns the estimate."""
    estimate = estimate_run(cfg, bundle, device)
    for line in report(estimate, cfg, device):
        (log.warning if line.startswith("this is GPU work") else log.info)(line)
    if not math.isfinite(estimate["estimated_seconds"]):
        estimate["estimated_seconds"] = None
    return estimate
