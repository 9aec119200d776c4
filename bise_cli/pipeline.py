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

from bise_cli import stages
from bise_cli.cache import StageCache
from bise_cli.card import write_run_card
from bise_cli.data import build_dataset, summarize_bundle
from bise_cli.data.base import DatasetBundle, Split, place_splits
from bise_cli.data.noise import flip_labels
from bise_cli.errors import BiseError
from bise_cli.fingerprint import fingerprint_bundle
from bise_cli.precision import (
    configure_backends,
    configure_determinism,
    data_placement,
    device_memory,
    peak_memory_mb,
    reset_peak_memory,
    tensor_bytes,
    training_memory_bytes,
)
from bise_cli.records import (
    NOT_RESULT_SETTINGS,
    RunDir,
    check_record_keys,
    config_hash,
    make_record,
    write_json,
    write_text,
)
from bise_cli.report import write_report
from bise_cli.tracking import check_tracker, track_run

log = logging.getLogger(__name__)

# The stages this runner implements, in the order they print (names and titles are declared in names.py).
STAGES = ("vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "ffw", "dfr_train", "dfr_val", "lff",
          "softcon", "bcon_bbal")
MASK_STAGES = ("bise", "bise_ft", "random", "magnitude")  # need BISE's structured masks


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU (the value itself is checked by validate_config)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BiseError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(device)


def run(cfg: dict, out_dir: str | Path) -> list[dict]:
    """Run every stage in `cfg["stages"]` into `out_dir`; skip the run when it is already done."""
    from bise_cli.validate import check_writable, validate_config

    # Before the first CUDA call (validation asks whether CUDA is there): cuBLAS reads its workspace setting once.
    configure_determinism(bool(cfg.get("deterministic", True)))
    # Every setting, the device first, before anything is read, trained or marked running.
    validate_config(cfg)
    check_record_keys(cfg)  # every record field, so that no clash waits for the first record
    check_stage_combination(list(cfg["stages"]), cfg["pruning"]["name"])
    stages.pruning_settings(cfg["pruning"])
    check_tracker(cfg.get("logger"))
    device = resolve_device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    run_dir = RunDir(out_dir)
    # The run's identity: every setting that can change a result, plus the device that measures latency, and the
    # data actually loaded (fingerprinted once, before the done check: a changed image or label is a new run).
    identity = config_hash({**{k: v for k, v in cfg.items() if k not in NOT_RESULT_SETTINGS}, "device": device.type})
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
    run_dir.set_status("running", config_hash=identity, data_sha256=fingerprint["sha256"])
    started = time.perf_counter()
    try:
        recipe(cfg, device, run_dir, bundle, fingerprint)
    except BaseException as error:
        run_dir.fail(error)
        try:  # the stages that finished still reach the tracker; its own trouble never hides the run's error
            track_run(cfg.get("logger"), run_dir.path, cfg, run_dir.records, failed=True)
        except Exception as tracking_error:  # noqa: BLE001
            log.warning("tracking the failed run failed too: %s", tracking_error)
        raise
    write_report(run_dir.path, cfg, run_dir.records, cfg.get("note", ""))
    write_run_card(run_dir.path, cfg, run_dir.records)
    run_dir.finish(identity, data_sha256=fingerprint["sha256"], seconds=round(time.perf_counter() - started, 1))
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
    ctx = stages.Context(cfg, bundle, device, StageCache(stages.cache_root(cfg), cfg["cache"]), run_dir,
                         fingerprint["sha256"])
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

    # 2. The vanilla model: what BISE prunes, so it always runs first.
    model, metrics, vanilla_key = stages.vanilla(ctx)
    record("vanilla", metrics)

    # 3. The BISE search, when a stage needs its masks.
    search = stages.bise_search(ctx, model, vanilla_key) if set(MASK_STAGES) & set(chosen) else None

    # 4. Everything else, in the order asked for.
    for stage in [s for s in chosen if s != "vanilla"]:
        if stage == "bise":
            selection = cfg["pruning"]["selection_metric"] if search["alternatives"] else None
            record("bise", search["metrics"], {"selection": selection} if selection else None)
            for metric, alternative in search["alternatives"].items():
                record("bise", alternative, {"selection": metric})
        elif stage == "bise_ft":
            record(stage, stages.finetune(ctx, model, search["masks"], stage, search["key"]))
        elif stage == "reweighted_ft":
            record(stage, stages.finetune(ctx, model, None, stage, vanilla_key))
        elif stage in ("random", "magnitude"):
            record(stage, stages.matched_baseline(ctx, model, search, stage))
        elif stage == "ffw":
            record(stage, stages.ffw(ctx, model, vanilla_key))
        elif stage in ("dfr_train", "dfr_val"):
            record(stage, stages.dfr(ctx, model, vanilla_key, stage))
        elif stage == "lff":
            record(stage, stages.lff(ctx))
        elif stage == "softcon":
            record(stage, stages.contrastive(ctx, stage, model, vanilla_key))
        elif stage == "bcon_bbal":
            record(stage, stages.contrastive(ctx, stage))


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
    on_device, reason = data_placement(mode, device, data_bytes, memory, training, lff="lff" in cfg["stages"])
    log.info("data: %s", reason)
    if on_device:
        bundle.splits = place_splits(bundle.splits, device)
    return {"mode": mode, "on_device": on_device, "data_gb": round(data_bytes / 1e9, 3),
            "free_gb": round(memory[0] / 1e9, 3) if memory else None,
            "training_gb": round(training / 1e9, 3) if training else None, "reason": reason}


def check_stage_combination(chosen: list[str], method: str) -> None:
    """FFW and BISE's mask stages need different `pruning` configs."""
    if method == "ffw" and set(MASK_STAGES) & set(chosen):
        raise BiseError(f"pruning=ffw runs the ffw stage; stages {sorted(set(MASK_STAGES) & set(chosen))} need "
                        "pruning=bise (e.g. bise run pruning=ffw stages=[vanilla,ffw])")
    if "ffw" in chosen and method != "ffw":
        raise BiseError("the ffw stage needs pruning=ffw (e.g. bise run pruning=ffw stages=[vanilla,ffw])")


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

