"""The stages of a run (vanilla, BISE search, fine-tuning, matched baselines, FFW) as methods of one object.

Each stage loads its result from the stage cache when the settings it depends on were seen before, otherwise
computes, evaluates and caches it. Keys are built from the vanilla key outwards, so a change to any upstream
setting invalidates everything downstream. Evaluation settings (probe, latency) are part of every key because
the cached result includes the stage's metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from bise_cli import baselines
from bise_cli.bise import SearchSettings, group_weights, head_leakage, run_search
from bise_cli.data.base import DatasetBundle
from bise_cli.efficiency import efficiency_report
from bise_cli.errors import BiseError, check_choice
from bise_cli.evaluate import evaluate_model
from bise_cli.masking import GateSet, kept_units
from bise_cli.models import build_backbone
from bise_cli.prune import prune_model, save_pruned
from bise_cli.records import RunDir, StageCache, config_hash, write_json
from bise_cli.train import fit, freeze, predict

log = logging.getLogger(__name__)

# Bump a stage's version when its computation changes, so stale cache entries are not reused.
STAGE_VERSIONS = {"vanilla": 1, "identification": 1, "bise": 1, "bise_ft": 1, "reweighted_ft": 1,
                  "random": 1, "magnitude": 1, "ffw": 1}


def pruning_settings(options: dict):
    """The validated settings of the `pruning` config: SearchSettings (bise) or FFWSettings (ffw); unknown keys
    are one clear error."""
    from bise_cli.ffw import FFWSettings

    check_choice("pruning", options.get("name"), ("bise", "ffw"))
    kind, skip = (SearchSettings, ("name",)) if options["name"] == "bise" else \
        (FFWSettings, ("name", "train_fraction", "reweighting"))
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(options) - names - set(skip))
    if unknown:
        raise BiseError(f"pruning={options.get('name')} has no option(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(names))}")
    return kind(**{k: v for k, v in options.items() if k in names}).validate()


def seed_stage(seed: int, stage: str) -> int:
    """Seed torch for one stage from (run seed, stage name), so a resumed run draws the same numbers."""
    stage_seed = int(config_hash({"seed": seed, "stage": stage}), 16) % (2**31)
    torch.manual_seed(stage_seed)
    return stage_seed


class Stages:
    """Shared state of one run and one method per stage; each returns plain metrics dicts."""

    def __init__(self, cfg: dict, bundle: DatasetBundle, device, run_dir: RunDir, cache: StageCache):
        self.cfg, self.bundle, self.device, self.run_dir, self.cache = cfg, bundle, device, run_dir, cache
        self.seed = int(cfg["seed"])
        self.protocol = cfg["dataset"].get("protocol", {})
        # Where the files live does not change the data; what they are (source) does.
        data_settings = {k: v for k, v in cfg["dataset"].items() if k not in ("root", "cache_dir")}
        self.train_key = {"stage": "vanilla", "version": STAGE_VERSIONS["vanilla"], "dataset": data_settings,
                          "data_source": bundle.info.get("source"), "rho": cfg["rho"], "seed": self.seed,
                          "backbone": cfg["backbone"], "train": cfg["train"]}
        # Cached results include metrics, so how they are measured is part of every downstream key.
        evaluation = {k: cfg[k] for k in ("leakage_probe", "latency", "eval_batch_size")}
        self.vanilla_key = {**self.train_key, "evaluation": evaluation}

    # ---------------------------------------------------------------------------------------------- helpers
    def record(self, stage: str, metrics: dict, extra_keys: dict | None = None) -> None:
        """Append one self-describing record: stage, the config keys (`keys` names them), then the metrics."""
        keys = {"dataset": self.cfg["dataset"]["name"], "backbone": self.cfg["backbone"]["name"],
                "rho": self.cfg["rho"], "seed": self.seed, **(self.cfg.get("record_keys") or {}),
                **(extra_keys or {})}
        self.run_dir.add_record({"stage": stage, "keys": list(keys), **keys, "run_dir": str(self.run_dir.path),
                                 **metrics})

    def new_backbone(self):
        b = self.cfg["backbone"]
        options = {k: v for k, v in b.items() if k != "name"}
        return build_backbone(b["name"], self.bundle.num_classes, **options)

    def evaluate(self, model, dense=None, masks=None) -> dict:
        probe = self.cfg["leakage_probe"] if self.cfg["leakage_probe"]["epochs"] > 0 else None
        metrics = evaluate_model(model, self.bundle, batch_size=self.cfg["eval_batch_size"], device=self.device,
                                 probe=probe, seed=self.seed)
        example = self.bundle["test"].encode(self.bundle["test"].x[:1])
        metrics.update(efficiency_report(dense if dense is not None else model, model, masks, example,
                                         self.device, **self.cfg["latency"]))
        return metrics

    def weights_table(self, split, rho) -> torch.Tensor:
        reweighting = self.cfg["pruning"]["reweighting"]
        return group_weights(reweighting, split.y, split.b, self.bundle.num_classes, self.bundle.num_bias, rho)

    # --------------------------------------------------------------------------------------------- stages
    def vanilla(self):
        """Train (or load) the vanilla model on the biased training split; its weights are cached by the training
        settings alone, its metrics also by the evaluation settings."""
        seed = seed_stage(self.seed, "vanilla")  # before construction: the initialisation is part of the stage
        model = self.new_backbone().to(self.device)
        if self.cfg.get("vanilla_checkpoint"):
            return self.load_vanilla_checkpoint(model, self.cfg["vanilla_checkpoint"])
        weights = self.cache.load("vanilla", self.train_key)
        if weights is None:
            t = self.cfg["train"]
            started = time.perf_counter()
            history = fit(model, self.bundle["train"], epochs=t["epochs"], batch_size=t["batch_size"],
                          optimizer=t["optimizer"], lr=t["lr"], momentum=t["momentum"],
                          weight_decay=t["weight_decay"], scheduler=t["scheduler"],
                          milestones=self.milestones(), gamma=t["gamma"], device=self.device, seed=seed,
                          description="vanilla")
            weights = {"state_dict": model.state_dict(), "history": history,
                       "train_seconds": round(time.perf_counter() - started, 2)}
            self.cache.save("vanilla", self.train_key, weights)
        else:
            log.info("vanilla model from cache (%s)", self.cache.path("vanilla", self.train_key))
            model.load_state_dict(weights["state_dict"])
        freeze(model)
        metrics = self.cache.load("vanilla_metrics", self.vanilla_key)
        if metrics is None:
            metrics = {**self.evaluate(model), "train_seconds": weights.get("train_seconds")}
            self.cache.save("vanilla_metrics", self.vanilla_key, metrics)
        return model, metrics

    def load_vanilla_checkpoint(self, model, path: str):
        """Use a vanilla model trained elsewhere: a state dict, or a dict holding one under `state_dict`."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, ValueError) as error:
            raise BiseError(f"cannot read vanilla_checkpoint {path!r}: {str(error).splitlines()[0]}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = " ".join(str(error).split())[:300]
            raise BiseError(f"vanilla_checkpoint {path!r} does not match backbone={self.cfg['backbone']['name']} "
                            f"with {self.bundle.num_classes} classes: {detail}") from None
        freeze(model)
        self.vanilla_key = {**self.vanilla_key, "vanilla_checkpoint": config_hash({"file": path,
                                                                                    "size": Path(path).stat().st_size})}
        metrics = self.cache.load("vanilla_metrics", self.vanilla_key)
        if metrics is None:
            metrics = self.evaluate(model)
            self.cache.save("vanilla_metrics", self.vanilla_key, metrics)
        return model, metrics

    def milestones(self) -> list[int]:
        t = self.cfg["train"]
        if t["milestones"] != "auto":
            return list(t["milestones"])
        # method.md §3.1: BiasedMNIST decays at 40/60 for rho in {0.99, 0.995}, otherwise at 80/90.
        return [40, 60] if round(float(self.cfg["rho"]), 6) in (0.99, 0.995) else [80, 90]

    def bias_labels(self, model):
        """The search split with ground-truth or pseudo bias labels, and the rho used for reweighting."""
        mode = self.cfg["bias_labels"]
        check_choice("bias_labels", mode, ("ground_truth", "identification"))
        search = self.bundle["search"]
        if mode == "ground_truth":
            return search, float(self.cfg["rho"])
        ident = self.identification_model()
        pseudo = predict(ident, search, self.cfg["eval_batch_size"], self.device)["pred"]
        rho = float((pseudo == search.y).float().mean())
        log.info("identification model: pseudo bias labels agree with y on %.3f of the search set", rho)
        return search.with_bias(pseudo), rho

    def identification_model(self):
        key = {**self.train_key, "stage": "identification", "epochs": self.cfg["identification"]["epochs"]}
        model = self.new_backbone().to(self.device)
        cached = self.cache.load("identification", key)
        if cached is not None:
            model.load_state_dict(cached)
            return freeze(model)
        t = self.cfg["train"]
        with torch.random.fork_rng(devices=[]):  # method.md §2.11: RNG state restored around this step
            seed = seed_stage(self.seed, "identification")
            fit(model, self.bundle["train"], epochs=self.cfg["identification"]["epochs"],
                batch_size=t["batch_size"], optimizer=t["optimizer"], lr=t["lr"], momentum=t["momentum"],
                weight_decay=t["weight_decay"], device=self.device, seed=seed, description="identification")
        self.cache.save("identification", key, model.state_dict())
        return freeze(model)

    def bise_search(self, model) -> dict:
        """Run (or load) the BISE search; returns masks, the search result and the `bise` stage metrics."""
        p = self.cfg["pruning"]
        key = {**self.vanilla_key, "stage": "bise", "version": STAGE_VERSIONS["bise"], "pruning": p,
               "bias_labels": self.cfg["bias_labels"], "identification": self.cfg["identification"]}
        cached = self.cache.load("bise", key)
        if cached is None:
            search_split, rho = self.bias_labels(model)
            settings = pruning_settings(p)
            gates = GateSet(model.gate_points(), init=settings.gate_init).to(self.device).attach(model)
            seed = seed_stage(self.seed, "bise")
            try:
                result = run_search(model, gates, search_split, self.bundle.get("val"), self.bundle["test"],
                                    num_classes=self.bundle.num_classes, num_bias=self.bundle.num_bias, rho=rho,
                                    settings=settings, device=self.device, seed=seed)
                # The head reads the full-width bottleneck, so it is scored on the gated model (pruned units
                # are zeros there), before and after the search.
                gates.load_binary_masks(result.masks)
                with gates.mode("fixed"):
                    leakage_head = head_leakage(result.head_state, model, self.bundle["test"], self.device)
                with gates.mode("vanilla"):
                    leakage_head_before = head_leakage(result.pretrain_head_state, model, self.bundle["test"],
                                                       self.device)
            finally:
                gates.detach()
            pruned = prune_model(model, result.masks)
            metrics = self.evaluate(pruned, dense=model, masks=result.masks)
            metrics.update(leakage_head=leakage_head, leakage_head_vanilla=leakage_head_before)
            metrics.update(best_epoch=result.best_epoch, search_epochs=len(result.history),
                           cached_features=result.cached_features, approximate_cache=result.approximate_cache,
                           rho_reweighting=rho)
            alternatives = {}
            for metric, alt in result.alternatives.items():
                alt_pruned = prune_model(model, alt["masks"])
                alternatives[metric] = {**self.evaluate(alt_pruned, dense=model, masks=alt["masks"]),
                                        "best_epoch": alt["epoch"]}
            cached = {"masks": result.masks, "last_masks": result.last_masks, "history": result.history,
                      "head_state": result.head_state, "metrics": metrics, "alternatives": alternatives}
            self.cache.save("bise", key, cached)
        else:
            log.info("BISE search from cache (%s)", self.cache.path("bise", key))
            pruned = prune_model(model, cached["masks"])
        torch.save({"masks": cached["masks"], "last_masks": cached["last_masks"]}, self.run_dir.file("masks.pt"))
        save_pruned(pruned, self.run_dir.file("pruned_bise.pt"))
        write_json(self.run_dir.file("search_history.json"), cached["history"])
        write_json(self.run_dir.file("kept_units.json"), kept_units(cached["masks"]))
        return {**cached, "key": key}

    def finetune(self, vanilla_model, masks, stage: str, parent_key: dict) -> dict:
        """Fine-tune the surviving weights (masks frozen) with the reweighted loss; `masks=None` = all kept."""
        f = self.cfg["finetune"]
        key = {**parent_key, "stage": stage, "version": STAGE_VERSIONS[stage], "finetune": f,
               "reweighting": self.cfg["pruning"]["reweighting"]}
        cached = self.cache.load(stage, key)
        if cached is not None:
            return cached["metrics"]
        model = copy.deepcopy(vanilla_model)
        for param in model.parameters():
            param.requires_grad_(True)
        gates = None
        if masks is not None:
            # Fixed (detached) binary gates: pruned units stay exactly zero while the surviving weights train.
            gates = GateSet(model.gate_points()).to(self.device).attach(model)
            gates.load_binary_masks(masks)
            gates.set_mode("fixed")
        search = self.bundle["search"]
        table = self.weights_table(search, float(self.cfg["rho"])).to(self.device)
        seed = seed_stage(self.seed, stage)
        best = baselines.BestState(model, self.bundle.get("val"), self.bundle.num_classes, self.bundle.num_bias,
                                   batch_size=self.cfg["eval_batch_size"], device=self.device,
                                   metric=f["selection_metric"])
        fit(model, search, epochs=f["epochs"], batch_size=f["batch_size"], optimizer=f["optimizer"], lr=f["lr"],
            momentum=f["momentum"], weight_decay=f["weight_decay"], scheduler=f["scheduler"],
            milestones=f.get("milestones"), sample_weights=lambda y, b: table[y, b], device=self.device,
            seed=seed, description=stage, after_epoch=best.update if f["select_best"] else None)
        best.restore()
        freeze(model)
        if gates is not None:
            gates.detach()
            pruned = prune_model(model, masks)
            metrics = self.evaluate(pruned, dense=vanilla_model, masks=masks)
        else:
            metrics = self.evaluate(model)
        metrics["best_epoch"] = best.epoch
        self.cache.save(stage, key, {"metrics": metrics})
        return metrics

    def matched_baseline(self, model, search: dict, stage: str) -> dict:
        """Random or L2-magnitude structured pruning with BISE's per-layer kept-unit counts."""
        key = {**search["key"], "stage": stage, "version": STAGE_VERSIONS[stage]}
        cached = self.cache.load(stage, key)
        if cached is not None:
            return cached["metrics"]
        seed = seed_stage(self.seed, stage)
        if stage == "random":
            masks = baselines.random_masks(search["masks"], seed)
        else:
            masks = baselines.magnitude_masks(model, search["masks"])
        pruned = prune_model(model, masks)
        metrics = self.evaluate(pruned, dense=model, masks=masks)
        self.cache.save(stage, key, {"metrics": metrics, "masks": masks})
        return metrics

    def ffw(self, model) -> dict:
        """The FFW baseline: unstructured gates trained on part of the unbiased val split (method.md §2.13)."""
        from bise_cli.ffw import apply_weight_masks, run_ffw, weight_sparsity

        p = self.cfg["pruning"]
        key = {**self.vanilla_key, "stage": "ffw", "version": STAGE_VERSIONS["ffw"], "pruning": p}
        cached = self.cache.load("ffw", key)
        if cached is not None:
            return cached["metrics"]
        val = self.bundle.get("val")
        if val is None:
            raise BiseError("FFW trains on an unbiased split: this dataset has no val split")
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.seed))
        cut = int(len(val) * p["train_fraction"])
        settings = pruning_settings(p)
        seed = seed_stage(self.seed, "ffw")
        result = run_ffw(model, val.subset(order[:cut]), val.subset(order[cut:]), num_bias=self.bundle.num_bias,
                         settings=settings, device=self.device, seed=seed)
        pruned = apply_weight_masks(model, result.weight_masks)
        metrics = self.evaluate(pruned)
        # Unstructured pruning keeps every shape: count the zeroed weights instead of the removed ones.
        metrics.update(sparsity_weights=weight_sparsity(result.weight_masks), sparsity_units=None,
                       best_epoch=result.best_epoch, search_epochs=len(result.history))
        write_json(self.run_dir.file("ffw_history.json"), result.history)
        self.cache.save("ffw", key, {"metrics": metrics, "masks": result.weight_masks})
        return metrics
