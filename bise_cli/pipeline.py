"""The experiment recipe, top to bottom: data -> vanilla -> BISE search -> prune -> baselines -> records.

`run(cfg, out_dir)` takes the resolved config as a plain dict (only this module, stages.py and cli.py know the
config layout); the stages themselves live in stages.py. Every stage's result is cached under
`outputs/cache/<stage>/` by the hash of the settings it depends on, so a repeated or resumed run recomputes
nothing that is already known, and a stage's record (metrics, latency included) is cached with it: resumed runs
write the same records.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bise_cli.data import build_dataset, summarize_bundle
from bise_cli.data.base import DatasetBundle
from bise_cli.errors import BiseError, check_choice
from bise_cli.records import RunDir, StageCache, config_hash, read_jsonl, write_json, write_text
from bise_cli.report import write_report
from bise_cli.stages import Stages, pruning_settings

log = logging.getLogger(__name__)

STAGES = ("vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "ffw")
MASK_STAGES = ("bise", "bise_ft", "random", "magnitude")  # need BISE's structured masks


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU."""
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BiseError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device(device)


def run(cfg: dict, out_dir: str | Path) -> list[dict]:
    """Run every stage in `cfg["stages"]` into `out_dir`; skip the run when it is already done."""
    run_dir = RunDir(out_dir)
    fingerprint = config_hash({k: v for k, v in cfg.items() if k not in ("device", "hydra")})
    status = run_dir.status()
    if status.get("state") == "done" and status.get("config_hash") == fingerprint:
        log.info("already done, skipping: %s", run_dir.path)
        return read_jsonl(run_dir.file("metrics.jsonl"))
    write_text(run_dir.file("config.yaml"), OmegaConf.to_yaml(OmegaConf.create(cfg)))
    run_dir.set_status("running", config_hash=fingerprint)
    started = time.perf_counter()
    try:
        _run_stages(cfg, run_dir)
    except BaseException as error:
        run_dir.fail(error)
        raise
    write_report(run_dir.path, cfg, run_dir.records, cfg.get("note", ""))
    run_dir.set_status("done", config_hash=fingerprint, seconds=round(time.perf_counter() - started, 1))
    return run_dir.records


def _run_stages(cfg: dict, run_dir: RunDir) -> None:
    stages = list(cfg["stages"])
    for stage in stages:
        check_choice("stage", stage, STAGES)
    method = cfg["pruning"]["name"]
    if method == "ffw" and set(MASK_STAGES) & set(stages):
        raise BiseError(f"pruning=ffw runs the ffw stage; stages {sorted(set(MASK_STAGES) & set(stages))} need "
                        "pruning=bise (e.g. bise run pruning=ffw stages=[vanilla,ffw])")
    if "ffw" in stages and method != "ffw":
        raise BiseError("the ffw stage needs pruning=ffw (e.g. bise run pruning=ffw stages=[vanilla,ffw])")
    pruning_settings(cfg["pruning"])  # bad search settings fail before anything is trained
    device = resolve_device(cfg["device"])
    torch.use_deterministic_algorithms(bool(cfg["deterministic"]), warn_only=True)
    bundle = _load_data(cfg)
    write_json(run_dir.file("data_summary.json"), {"info": bundle.info, "splits": summarize_bundle(bundle)})
    ctx = Stages(cfg, bundle, device, run_dir, StageCache(Path(cfg["output_root"]) / "cache", cfg["cache"]))

    model, metrics = ctx.vanilla()
    ctx.record("vanilla", metrics)
    if not set(stages) - {"vanilla"}:
        return
    needs_masks = set(MASK_STAGES) & set(stages)
    search = ctx.bise_search(model) if needs_masks else None
    for stage in [s for s in stages if s != "vanilla"]:  # vanilla always runs first: it is what BISE prunes
        if stage == "bise":
            selection = {"selection": ctx.cfg["pruning"]["selection_metric"]}
            ctx.record("bise", search["metrics"], selection if search["alternatives"] else None)
            for metric, metrics in search["alternatives"].items():
                ctx.record("bise", metrics, {"selection": metric})
        elif stage == "bise_ft":
            ctx.record("bise_ft", ctx.finetune(model, search["masks"], "bise_ft", search["key"]))
        elif stage == "reweighted_ft":
            ctx.record("reweighted_ft", ctx.finetune(model, None, "reweighted_ft", ctx.vanilla_key))
        elif stage in ("random", "magnitude"):
            ctx.record(stage, ctx.matched_baseline(model, search, stage))
        elif stage == "ffw":
            ctx.record("ffw", ctx.ffw(model))


def _load_data(cfg: dict) -> DatasetBundle:
    d = cfg["dataset"]
    options = {k: v for k, v in d.items() if k not in ("name", "source", "root", "max_samples", "protocol")}
    return build_dataset(d["name"], rho=cfg["rho"], seed=cfg["seed"], source=d["source"], root=d["root"],
                         max_samples=d["max_samples"], **options)


