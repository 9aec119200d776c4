"""The experiment recipe, top to bottom: check -> data -> vanilla -> BISE search -> fine-tuning and baselines
-> records -> report.

`run(cfg, out_dir)` takes the resolved config as a plain dict. Every stage result is cached by
`StageCache.get_or_compute` under a key that includes a fingerprint of the data actually loaded, so a repeated
or resumed run recomputes nothing that is already known and never reuses a result computed from other inputs.
A run counts as done only when its status says so for the same settings and the same data (its fingerprint is
taken before the check) and its records are complete and intact; otherwise it is redone from the stage caches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bise_cli.core.defaults import NOT_RESULT_SETTINGS, drop_settings
from bise_cli.core.errors import BiseError
from bise_cli.core.files import write_json, write_text
from bise_cli.core.precision import (
    autocast,
    configure_backends,
    configure_determinism,
    data_placement,
    device_memory,
    peak_memory_mb,
    reset_peak_memory,
    tensor_bytes,
    training_memory_bytes,
    with_eval_batch,
)
from bise_cli.data import build_dataset, summarize_bundle
from bise_cli.data.base import DatasetBundle, Split, place_splits
from bise_cli.data.noise import flip_labels
from bise_cli.reporting.card import write_run_card
from bise_cli.reporting.tracking import check_tracker, track_run
from bise_cli.run import registry, stages
from bise_cli.run.cache import StageCache
from bise_cli.run.estimate import log_estimate
from bise_cli.run.fingerprint import fingerprint_bundle
from bise_cli.run.records import RunDir, check_record_keys, config_hash, make_record

log = logging.getLogger(__name__)

# The stages this runner implements, in the order they print (each is declared once, in registry.py).
STAGES = registry.RUNNABLE


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU (the value itself is checked by validate_config)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BiseError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(device)


def run(cfg: dict, out_dir: str | Path) -> list[dict]:
    """Run every stage in `cfg["stages"]` into `out_dir`; skip the run when it is already done."""
    from bise_cli.run.validate import check_writable, validate_config

    # Before the first CUDA call (validation asks whether CUDA is there): cuBLAS reads its workspace setting once.
    configure_determinism(bool(cfg.get("deterministic", True)))
    # Every setting, the device first, before anything is read, trained or marked running.
    validate_config(cfg)
    check_record_keys(cfg)  # every record field, so that no clash waits for the first record
    check_stage_combination(list(cfg["stages"]), cfg["pruning"]["name"])
    stages.pruning_settings(cfg["pruning"])
    check_tracker(cfg.get("logger"))
    device = resolve_device(cfg["device"])
    cfg = with_eval_batch(cfg, device)  # `auto` -> the device's number, in the run's identity and records
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    run_dir = RunDir(out_dir)
    # The run's identity: every setting that can change a result, plus the device that measures latency, and the
    # data actually loaded (fingerprinted once, before the done check: a changed image or label is a new run).
    identity = config_hash({**drop_settings(cfg, NOT_RESULT_SETTINGS), "device": device.type})
    bundle = load_data(cfg)
    fingerprint = fingerprint_bundle(bundle)
    records = run_dir.finished_records(identity, fingerprint["sha256"])
    if records is not None:
        log.info("already done, skipping: %s", run_dir.path)
        if not run_dir.file("MODEL_CARD.md").is_file():  # finished before runs had cards: derived from records
            write_run_card(run_dir.path, cfg, records)
        track_run(cfg.get("logger"), run_dir.path, cfg, records)  # e.g. logger=mlflow added to a finished run
        return records
    check_writable(run_dir.path)
    if cfg["cache"]:
        check_writable(stages.cache_root(cfg))
    write_text(run_dir.file("config.yaml"), OmegaConf.to_yaml(OmegaConf.create(cfg)))
    # What the run will cost on this device, before any long stage (the log's first lines, status.json).
    estimate = log_estimate(cfg, bundle, device)["estimated_seconds"]
    started = time.perf_counter()
    try:
        # Inside the try: a signal that arrives once the status reads "running" (even before this call returns)
        # still marks the run failed.
        run_dir.set_status("running", config_hash=identity, data_sha256=fingerprint["sha256"],
                           estimated_seconds=estimate)
        recipe(cfg, device, run_dir, bundle, fingerprint)
    except BaseException as error:
        run_dir.fail(error)
        try:  # the stages that finished still reach the tracker; its own trouble never hides the run's error
            track_run(cfg.get("logger"), run_dir.path, cfg, run_dir.records, failed=True)
        except Exception as tracking_error:  # noqa: BLE001
            log.warning("tracking the failed run failed too: %s", tracking_error)
        raise
    write_run_card(run_dir.path, cfg, run_dir.records)  # MODEL_CARD.md and report.md, one text
    run_dir.finish(identity, data_sha256=fingerprint["sha256"], seconds=round(time.perf_counter() - started, 1),
                   estimated_seconds=estimate)
    track_run(cfg.get("logger"), run_dir.path, cfg, run_dir.records)
    return run_dir.records


def recipe(cfg: dict, device: torch.device, run_dir: RunDir, bundle: DatasetBundle, fingerprint: dict) -> None:
    """The experiment on the loaded data (`bundle`, its `fingerprint_bundle`): the vanilla model, the BISE search,
    then the stages that build on them."""
    chosen = list(cfg["stages"])
    torch.use_deterministic_algorithms(bool(cfg["deterministic"]), warn_only=True)
    configure_backends(device, bool(cfg["deterministic"]))

    # 1. Data, fingerprinted once (by `run`): every cache key below includes what was actually loaded.
    summary = summarize_bundle(bundle)  # read on the host, before the data move
    cache = StageCache(stages.cache_root(cfg), cfg["cache"], cfg["cache_wait_minutes"])
    # `precision` resolved once into the run's one autocast context, which every training loop enters.
    ctx = stages.Context(cfg, bundle, device, cache, run_dir, fingerprint["sha256"],
                         amp=autocast(cfg["precision"], device))
    # The data move to the device once (each distinct split once), or stay in host memory when they would
    # crowd out training; batches are then gathered where the data live.
    placement = place_data(ctx)
    write_json(run_dir.file("data_summary.json"), {"info": bundle.info, "fingerprint": fingerprint,
                                                   "bias_names": list(bundle.bias_names),
                                                   "nominal_rho": bundle.nominal_rho,
                                                   "splits": summary, "data_on_device": placement})

    # What the data actually was (a fallback may have replaced the requested source): in every record.
    provenance = {"data_sha256": fingerprint["sha256"], "data_train_size": len(bundle["train"]),
                  "data_source": f"{bundle.info.get('source', '?')}: {bundle.info.get('location', '')}".rstrip(": ")}

    last = [time.perf_counter()]

    def record(stage: str, metrics: dict, extra: dict | None = None) -> None:
        # Peak GPU memory since the previous record (None on the CPU); cached stages report what they needed now.
        memory = {"peak_gpu_memory_mb": peak_memory_mb(device)}
        reset_peak_memory(device)
        run_dir.add_record(make_record(stage, metrics, cfg, {**(extra or {}), **provenance, **memory}))
        # The stage's wall time in run.log (benchmarks/gpu_check.sh reads it to time each stage).
        now = time.perf_counter()
        log.info("stage %s recorded: %.1f s since the previous record", stage, now - last[0])
        last[0] = now

    # 2. The root stage, the vanilla model: what every other stage builds on, so it always runs first.
    root = registry.spec("vanilla")
    model, metrics, vanilla_key = root.function()(ctx.for_stage(root))
    record(root.name, metrics)
    up = stages.Upstream(model, keys={root.name: vanilla_key})

    # 3. The stages others build on (the BISE search, when a stage needs its masks), then every chosen stage in
    # the order asked for; a stage computed as a parent is recorded where it was chosen, from the same result.
    rows = {}
    for name in registry.parents(chosen):
        rows[name] = stages.compute(ctx, registry.spec(name), up)
    for name in [c for c in chosen if c != root.name]:
        if name not in rows:
            rows[name] = stages.compute(ctx, registry.spec(name), up)
        for metrics, extra in rows[name]:
            record(name, metrics, extra)


def place_data(ctx: stages.Context) -> dict:
    """Move the bundle's splits to the device (each distinct split once) when `data_on_device` says so, and
    return the decision for data_summary.json: {mode, on_device, data_gb, free_gb, reason}."""
    cfg, bundle, device = ctx.cfg, ctx.bundle, ctx.device
    mode = cfg.get("data_on_device", "auto")
    distinct = {id(split): split for split in bundle.splits.values()}.values()
    data_bytes = tensor_bytes(*[t for split in distinct for t in (split.x, split.y, split.b, *split.meta.values())])
    memory = device_memory(device)
    training = None
    if mode == "auto" and memory is not None:
        # One training batch of the largest batch size any loop uses, shaped like the real inputs.
        batch = max(int(cfg["train"]["batch_size"]), int(cfg["finetune"]["batch_size"]),
                    int(cfg["pruning"].get("batch_size", 1)))
        example = bundle["train"].encode(bundle["train"].x[:1])
        training = training_memory_bytes(ctx.new_backbone(), example.expand(batch, *example.shape[1:]))
    two_models = any(registry.spec(name).models_trained > 1 for name in cfg["stages"])
    on_device, reason = data_placement(mode, device, data_bytes, memory, training, two_models=two_models)
    log.info("data: %s", reason)
    if on_device:
        bundle.splits = place_splits(bundle.splits, device)
    return {"mode": mode, "on_device": on_device, "data_gb": round(data_bytes / 1e9, 3),
            "free_gb": round(memory[0] / 1e9, 3) if memory else None,
            "training_gb": round(training / 1e9, 3) if training else None, "reason": reason}


def check_stage_combination(chosen: list[str], method: str) -> None:
    """Each chosen stage that needs a `pruning` config (its own or its parent's, see registry.py) needs the
    chosen one: FFW and BISE's mask stages need different ones."""
    wrong: dict[str, list[str]] = {}
    for name in chosen:
        need = registry.required_pruning(name)
        if need is not None and need != method:
            wrong.setdefault(need, []).append(name)
    for need, names in wrong.items():
        family = [name for name in registry.RUNNABLE if registry.required_pruning(name) == need]
        what = f"the {names[0]} stage needs" if len(family) == 1 else f"stages {names} need"
        raise BiseError(f"{what} pruning={need}, not pruning={method} (e.g. bise run pruning={need} "
                        f"stages=[vanilla,{names[0]}])")


def load_data(cfg: dict) -> DatasetBundle:
    """The dataset named by `cfg["dataset"]`, built with its own options, with `dataset.label_noise` applied."""
    d = cfg["dataset"]
    skip = ("name", "source", "root", "max_samples", "protocol", "label_noise")
    bundle = build_dataset(d["name"], rho=cfg["rho"], seed=cfg["seed"], source=d["source"], root=d["root"],
                           max_samples=d["max_samples"], **{k: v for k, v in d.items() if k not in skip})
    return add_label_noise(bundle, float(d.get("label_noise") or 0.0), int(cfg["seed"]))


def add_label_noise(bundle: DatasetBundle, fraction: float, seed: int) -> DatasetBundle:
    """Flip `fraction` of the training and search labels to another class (seeded; the flipped samples are
    marked in `meta["label_flipped"]`). Evaluation splits keep their true labels. A search split that is the
    training split stays the same object, with the same flips."""
    if fraction <= 0:
        return bundle
    noisy: dict[int, Split] = {}
    for offset, name in enumerate(("train", "search")):
        split = bundle.get(name)
        if split is None:
            continue
        if id(split) not in noisy:
            y, flipped = flip_labels(split.y, fraction, bundle.num_classes, seed * 2 + offset)
            noisy[id(split)] = Split(split.x, y, split.b, split.encode, {**split.meta, "label_flipped": flipped},
                                     split.augment)
        bundle.splits[name] = noisy[id(split)]
    bundle.info = {**bundle.info, "label_noise": fraction}
    return bundle

