"""The stages of a run: vanilla training, the BISE search, fine-tuning, matched baselines and FFW.

Each stage is a function of a `Context` (the run's config, data, device and cache) that returns plain metrics.
Every result goes through `StageCache.get_or_compute` under a key that holds exactly what the result depends
on, built from the vanilla key outwards: the fingerprint of the data actually loaded, the stage's settings, the
evaluation settings and the device that measured latency. A change anywhere upstream therefore changes every
key downstream, and a cached result is never reused for different inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bise_cli.baselines import matched
from bise_cli.core.defaults import PATH_SETTINGS
from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.files import save_torch, write_json
from bise_cli.core.metrics import METRICS_VERSION
from bise_cli.core.precision import FP32, Autocast, with_eval_batch
from bise_cli.data.base import DatasetBundle
from bise_cli.data.registry import resolve_milestones
from bise_cli.method.evaluate import evaluate_model, train_group_weights
from bise_cli.method.probe import head_leakage, mean_over_attributes
from bise_cli.method.prune import prune_model, save_pruned
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import resolve, sample_weights
from bise_cli.method.search import SearchSettings, run_search
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone
from bise_cli.models.checkpoints import load_into, read_state_dict
from bise_cli.models.masking import GateSet, kept_units, rounding_effect
from bise_cli.reporting.efficiency import efficiency_report
from bise_cli.run import registry
from bise_cli.run.cache import StageCache
from bise_cli.run.fingerprint import fingerprint_file
from bise_cli.run.records import RunDir, config_hash
from bise_cli.run.registry import StageSpec

log = logging.getLogger(__name__)

# Versions of the cached computations that are not stages of their own (a stage's version is in its StageSpec).
VANILLA_METRICS_VERSION = 2
IDENTIFICATION_VERSION = 2


class UndeclaredSetting(KeyError):
    """A stage read a config section its StageSpec does not declare: its cache key would not hold it."""


class StageConfig(dict):
    """A stage's view of the config: the sections it (and its ancestors) declare in `reads`, and nothing else,
    so that every setting a stage's result depends on is in its cache key. Reading another section raises
    UndeclaredSetting instead of returning a value the key leaves out."""

    def __init__(self, visible: dict, full: dict, stage: str, prefix: str = ""):
        super().__init__(visible)
        self._full, self._stage, self._prefix = full, stage, prefix

    def _check(self, key) -> None:
        if key not in self and key in self._full:
            raise UndeclaredSetting(f"stage {self._stage} reads {self._prefix}{key}, which its StageSpec does not "
                                    "declare in `reads` (bise_cli/run/registry.py): its cache key would not hold it")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)


def config_view(cfg: dict, sections, stage: str) -> StageConfig:
    """The part of `cfg` named by dotted `sections` (a section `baselines.lff` shows `baselines` with only `lff`)."""
    visible: dict = {}
    partial: dict[str, list[str]] = {}
    for section in sections:
        head, _, rest = section.partition(".")
        if head not in cfg:
            continue
        if rest:
            partial.setdefault(head, []).append(rest)
        else:
            visible[head] = cfg[head]
    for head, rests in partial.items():
        if head not in visible and isinstance(cfg[head], dict):
            visible[head] = config_view(cfg[head], rests, stage)
            visible[head]._prefix = f"{head}."
    return StageConfig(visible, cfg, stage)


def section_value(cfg: dict, section: str):
    """A config section's value as a cache key holds it: settings that only say where files are left out, and a
    checkpoint by its content (another file at the same path is another model)."""
    value = cfg
    for part in section.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if section == "vanilla_checkpoint":
        return fingerprint_file(value) if value else None
    paths = [p.removeprefix(f"{section}.") for p in PATH_SETTINGS if p.startswith(f"{section}.")]
    if paths and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in paths}
    return value


def stage_key(stage: StageSpec, cfg: dict, parent_key: dict) -> dict:
    """A stage's cache key: its parent's key, its name and version, and every section it reads."""
    return {**parent_key, "stage": stage.name, "version": stage.version,
            **{section: section_value(cfg, section) for section in registry.effective_reads(stage, cfg)}}


def pruning_settings(options: dict):
    """The validated settings of the `pruning` config: SearchSettings (bise) or FFWSettings (ffw); unknown keys
    are one clear error."""
    from bise_cli.baselines.ffw import FFWSettings

    check_choice("pruning", options.get("name"), ("bise", "ffw"))
    kind, skip = (SearchSettings, ("name",)) if options["name"] == "bise" else (FFWSettings, ("name", "train_fraction"))
    names = {f.name for f in dataclasses.fields(kind)} - {"amp"}  # the run's autocast, set by the pipeline
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


@dataclass
class Context:
    """What every stage needs: the resolved config, the data, where to run and where to cache and write, and the
    run's one autocast context `amp` (resolved from `precision` once, by the pipeline; every training loop
    enters it). A stage's run function gets `for_stage(spec)`: the same context with `cfg` restricted to what it
    reads."""

    cfg: dict
    bundle: DatasetBundle
    device: torch.device
    cache: StageCache
    run_dir: RunDir
    data_fingerprint: str
    stage: StageSpec | None = None
    amp: Autocast = FP32

    def __post_init__(self):
        # `eval_batch_size: auto` becomes the device's number here too, for callers that build a Context from a
        # composed config (the pipeline resolves it first, for its records).
        self.cfg = with_eval_batch(self.cfg, self.device)

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def for_stage(self, stage: StageSpec) -> Context:
        """This context for one stage: `cfg` shows only the sections the stage and its ancestors read."""
        view = config_view(self.cfg, registry.visible_sections(stage.name, self.cfg), stage.name)
        return dataclasses.replace(self, cfg=view, stage=stage)

    def train_key(self) -> dict:
        """What the vanilla weights depend on: the data (by content), every root section the vanilla stage reads
        but the evaluation settings, the seed and the kind of device that trained them (CPU and GPU kernels
        round differently, so a GPU run never reuses weights a CPU run trained, and the same command gives the
        same numbers whatever the cache held). With a `vanilla_checkpoint` the training recipe is left out."""
        root = registry.spec("vanilla")
        sections = [s for s in registry.effective_reads(root, self.cfg) if s not in registry.EVALUATION_SECTIONS]
        return {"stage": root.name, "version": root.version, "data": self.data_fingerprint,
                **{section: section_value(self.cfg, section) for section in sections},
                "train_device": self.device.type}

    def eval_key(self, parent: dict) -> dict:
        """`parent` plus how results are measured: cached metrics depend on it (latency on the device)."""
        evaluation = {k: self.cfg[k] for k in registry.EVALUATION_SECTIONS}
        return {**parent, "evaluation": {**evaluation, "metrics_version": METRICS_VERSION}, "device": self.device.type}

    def recipe(self, section: str) -> TrainRecipe:
        """The training recipe of config section `train` (its `milestones: auto` resolved) or `finetune`."""
        if section == "train":
            return TrainRecipe.from_section(self.cfg["train"], "train", milestones=milestones(self.cfg))
        return TrainRecipe.from_section(self.cfg[section], section)

    def reweighting(self) -> str:
        return resolve(self.cfg["reweighting"], self.bundle.name, self.cfg["bias_labels"] == "identification")

    def new_backbone(self):
        b = self.cfg["backbone"]
        return build_backbone(b["name"], self.bundle.num_classes, **{k: v for k, v in b.items() if k != "name"})

    def evaluate(self, model, dense=None, masks=None) -> dict:
        """Test/val metrics, fresh-probe leakage and the efficiency report of `model` (pruned from `dense`)."""
        probe = self.cfg["leakage_probe"] if self.cfg["leakage_probe"]["epochs"] > 0 else None
        metrics = evaluate_model(model, self.bundle, batch_size=self.cfg["eval_batch_size"], device=self.device,
                                 probe=probe, seed=self.seed, bootstrap=self.cfg["bootstrap"])
        example = self.bundle["test"].encode(self.bundle["test"].x[:1])
        metrics.update(efficiency_report(dense if dense is not None else model, model, masks, example,
                                         self.device, **self.cfg["latency"]))
        metrics["latency_device"] = self.device.type
        return metrics


@dataclass
class Upstream:
    """What the stages before a stage produced: the frozen vanilla model, and each computed stage's cache key
    and (cached) result."""

    model: torch.nn.Module
    keys: dict[str, dict]
    results: dict[str, dict] = dataclasses.field(default_factory=dict)

    def result(self, name: str) -> dict:
        return self.results[name]


# --------------------------------------------------------------------------------------------------- vanilla

def vanilla(ctx: Context):
    """The root stage: the frozen vanilla model, its metrics and its key (the parent key of every other stage),
    trained on the biased training split (weights cached by the training settings), or read from
    `vanilla_checkpoint` and only evaluated."""
    seed = seed_stage(ctx.seed, "vanilla")  # before construction: the initialisation is part of the stage
    model = ctx.new_backbone().to(ctx.device)
    key = ctx.train_key()
    trained = {}
    if ctx.cfg.get("vanilla_checkpoint"):
        load_checkpoint(model, ctx.cfg["vanilla_checkpoint"], ctx)
    else:
        def train() -> dict:
            started = time.perf_counter()
            history = fit(model, ctx.bundle["train"], ctx.recipe("train"), device=ctx.device, seed=seed,
                          description="vanilla", amp=ctx.amp)
            return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history,
                    "train_seconds": round(time.perf_counter() - started, 2)}

        trained = ctx.cache.get_or_compute("vanilla", key, train)
        model.load_state_dict(trained["state_dict"])
        write_json(ctx.run_dir.file("vanilla_history.json"), trained["history"])
    freeze(model)
    metrics = ctx.cache.get_or_compute(
        "vanilla_metrics", {**ctx.eval_key(key), "stage": "vanilla_metrics", "version": VANILLA_METRICS_VERSION},
        lambda: {**ctx.evaluate(model), **{k: v for k, v in trained.items() if k == "train_seconds"}})
    return model, metrics, ctx.eval_key(key)


def load_checkpoint(model, path: str, ctx: Context) -> None:
    """Load a state dict trained elsewhere (`.pt` read tensors-only, or `.safetensors`); a one-line error names
    the missing, unexpected and mis-shaped keys."""
    state = read_state_dict(path, "vanilla_checkpoint")
    load_into(model, state, f"vanilla_checkpoint {path!r} (backbone={ctx.cfg['backbone']['name']}, "
                            f"{ctx.bundle.num_classes} classes)")
    model.to(ctx.device)


def milestones(cfg: dict) -> list[int]:
    """The vanilla LR milestones; `auto` is the dataset's rule (bise_cli.data.registry)."""
    return resolve_milestones(cfg["dataset"]["name"], cfg["train"]["milestones"], cfg["rho"])


# ---------------------------------------------------------------------------------------------- bias labels

def bias_labels(ctx: Context):
    """The search split with ground-truth or pseudo bias labels, and the nominal rho per attribute."""
    search = ctx.bundle["search"]
    if ctx.cfg["bias_labels"] == "ground_truth":
        return search, ctx.bundle.nominal_rho
    if ctx.bundle.num_attributes > 1:
        raise BiseError("bias_labels=identification supports datasets with one bias attribute; "
                        f"{ctx.bundle.name} has {ctx.bundle.num_attributes}")
    ident = identification_model(ctx)
    # predict() returns the pseudo labels on the CPU; with_bias puts them where the split lives.
    split = search.with_bias(predict(ident, search, ctx.cfg["eval_batch_size"], ctx.device)["pred"])
    rho = float((split.b == split.y).float().mean())
    log.info("identification model: pseudo bias labels agree with y on %.3f of the search set", rho)
    return split, (rho,)


def identification_model(ctx: Context):
    """A briefly trained vanilla model whose predictions serve as pseudo bias labels (the unsupervised variant),
    trained with the `train` recipe for `identification.epochs` (both in its key, also with a checkpoint)."""
    key = {**ctx.train_key(), "stage": "identification", "version": IDENTIFICATION_VERSION,
           "train": ctx.cfg["train"], "epochs": ctx.cfg["identification"]["epochs"]}
    model = ctx.new_backbone().to(ctx.device)

    def train() -> dict:
        # The vanilla recipe for identification.epochs at a constant learning rate (no schedule).
        recipe = dataclasses.replace(ctx.recipe("train"), epochs=ctx.cfg["identification"]["epochs"],
                                     scheduler="none", milestones=(), gamma=0.1)
        with torch.random.fork_rng(devices=[]):  # the official code restores the RNG state around this step
            fit(model, ctx.bundle["train"], recipe, device=ctx.device, seed=seed_stage(ctx.seed, "identification"),
                description="identification", amp=ctx.amp)
        return {k: v.cpu() for k, v in model.state_dict().items()}

    model.load_state_dict(ctx.cache.get_or_compute("identification", key, train))
    return freeze(model)


# ----------------------------------------------------------------------------------------------------- BISE

def bise_search(ctx: Context, up: Upstream) -> dict:
    """The BISE search on the frozen vanilla model, physical pruning and the `bise` metrics (with those of the
    masks chosen by each alternative selection metric)."""
    model, p = up.model, ctx.cfg["pruning"]
    split, rho = bias_labels(ctx)
    settings = dataclasses.replace(pruning_settings(p), amp=ctx.amp)
    weights = sample_weights(ctx.reweighting(), split.y, split.b, ctx.bundle.num_classes, ctx.bundle.num_bias, rho)
    gates = GateSet(model.gate_points(), init=settings.gate_init).to(ctx.device).attach(model)
    try:
        result = run_search(model, gates, split, ctx.bundle.get("val"), ctx.bundle["test"],
                            num_classes=ctx.bundle.num_classes, num_bias=ctx.bundle.num_bias, weights=weights,
                            settings=settings, bias_names=ctx.bundle.bias_names, device=ctx.device,
                            seed=seed_stage(ctx.seed, "bise"), group_weights=train_group_weights(ctx.bundle))
        # The heads read the full-width bottleneck, so they are scored on the gated model (pruned units are
        # zeros there), before and after the search.
        gates.load_binary_masks(result.masks)
        with gates.mode("fixed"):
            after = head_leakage(result.head_states, model, ctx.bundle["test"], ctx.cfg["eval_batch_size"],
                                 ctx.device)
        with gates.mode("vanilla"):
            before = head_leakage(result.pretrain_head_states, model, ctx.bundle["test"],
                                  ctx.cfg["eval_batch_size"], ctx.device)
    finally:
        gates.detach()
    metrics = ctx.evaluate(prune_model(model, result.masks), dense=model, masks=result.masks)
    metrics.update(leakage_head=mean_over_attributes(after), leakage_head_vanilla=mean_over_attributes(before),
                   best_epoch=result.best_epoch, search_epochs=len(result.history),
                   masks_frozen_epoch=result.frozen_epoch, cached_features=result.cached_features,
                   approximate_cache=result.approximate_cache,
                   rho_reweighting=list(rho) if rho else None, reweighting_used=ctx.reweighting())
    alternatives = {metric: {**ctx.evaluate(prune_model(model, alt["masks"]), dense=model, masks=alt["masks"]),
                             "best_epoch": alt["epoch"]} for metric, alt in result.alternatives.items()}
    return {"masks": result.masks, "last_masks": result.last_masks, "history": result.history,
            "head_states": result.head_states, "metrics": metrics, "alternatives": alternatives,
            "unrounded_masks": result.unrounded_masks}


def write_search(ctx: Context, up: Upstream, result: dict) -> list[tuple[dict, dict | None]]:
    """The search's files in the run folder (masks, the pruned model, the curves, the kept units) and the `bise`
    records: the masks of `pruning.selection_metric`, then those of each alternative selection metric."""
    p = ctx.cfg["pruning"]
    # Units off before and after pruning.round_to, in the record (and a warning when rounding undoes most of the
    # search), also for a cached search; an entry from before this was kept knows them only without rounding.
    unrounded = result.get("unrounded_masks") or (result["masks"] if p.get("round_to", 1) == 1 else None)
    if unrounded is not None:
        effect = rounding_effect(unrounded, result["masks"], int(p.get("round_to", 1)))
        result["metrics"] = {**result["metrics"], "sparsity_units_unrounded": effect["sparsity_units_unrounded"]}
    save_torch(ctx.run_dir.file("masks.pt"), {"masks": result["masks"], "last_masks": result["last_masks"]})
    save_pruned(prune_model(up.model, result["masks"]), ctx.run_dir.file("pruned_bise.pt"))
    write_json(ctx.run_dir.file("search_history.json"), result["history"])
    write_json(ctx.run_dir.file("kept_units.json"), kept_units(result["masks"]))
    selection = p["selection_metric"] if result["alternatives"] else None
    return [(result["metrics"], {"selection": selection} if selection else None),
            *[(alternative, {"selection": metric}) for metric, alternative in result["alternatives"].items()]]


# ------------------------------------------------------------------------------------------------ fine-tuning

def trainable_copy(model: torch.nn.Module, masks: dict | None, device) -> tuple[torch.nn.Module, GateSet | None]:
    """A trainable copy of the frozen `model` and, when `masks` are given, its fixed (detached) binary gates:
    pruned units stay exactly zero while the surviving weights train. Detach the gates after training."""
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.requires_grad_(True)
    if masks is None:
        return model, None
    gates = GateSet(model.gate_points()).to(device).attach(model)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    return model, gates


def finetune(ctx: Context, up: Upstream) -> dict:
    """Fine-tune the surviving weights (masks frozen) with the reweighted loss: BISE's subnetwork when the
    stage's parent is bise, else every unit (the reweighted-FT control)."""
    f, stage = ctx.cfg["finetune"], ctx.stage.name
    vanilla_model = up.model
    masks = up.result("bise")["masks"] if ctx.stage.parent == "bise" else None
    model, gates = trainable_copy(vanilla_model, masks, ctx.device)
    split, rho = bias_labels(ctx)
    weights = sample_weights(ctx.reweighting(), split.y, split.b, ctx.bundle.num_classes, ctx.bundle.num_bias,
                             rho).to(ctx.device)
    best = matched.BestState(model, ctx.bundle.get("val"), ctx.bundle.num_classes, ctx.bundle.num_bias,
                               batch_size=ctx.cfg["eval_batch_size"], device=ctx.device,
                               metric=f["selection_metric"], group_weights=train_group_weights(ctx.bundle))
    history = fit(model, split, ctx.recipe("finetune"), sample_weights=weights, device=ctx.device,
                  seed=seed_stage(ctx.seed, stage), description=stage,
                  after_epoch=best.update if f["select_best"] else None, amp=ctx.amp)
    best.restore()
    freeze(model)
    if gates is None:
        return {"metrics": {**ctx.evaluate(model), "best_epoch": best.epoch}, "history": history}
    gates.detach()
    return {"metrics": {**ctx.evaluate(prune_model(model, masks), dense=vanilla_model, masks=masks),
                        "best_epoch": best.epoch}, "history": history}


# ----------------------------------------------------------------------------------------------- baselines

def random_pruning(ctx: Context, up: Upstream) -> dict:
    """Random structured pruning with BISE's per-layer kept-unit counts."""
    masks = matched.random_masks(up.result("bise")["masks"], seed_stage(ctx.seed, ctx.stage.name))
    return {"metrics": ctx.evaluate(prune_model(up.model, masks), dense=up.model, masks=masks), "masks": masks}


def magnitude_pruning(ctx: Context, up: Upstream) -> dict:
    """L2-magnitude structured pruning (the units of largest weight norm kept) with BISE's per-layer counts."""
    masks = matched.magnitude_masks(up.model, up.result("bise")["masks"])
    return {"metrics": ctx.evaluate(prune_model(up.model, masks), dense=up.model, masks=masks), "masks": masks}


def ffw(ctx: Context, up: Upstream) -> dict:
    """The FFW baseline (Debiasing Surgeon, ECCV 2024): unstructured gates trained on part of the unbiased val
    split."""
    from bise_cli.baselines.ffw import apply_weight_masks, run_ffw, weight_sparsity

    p = ctx.cfg["pruning"]
    val = ctx.bundle.get("val")
    if val is None:
        raise BiseError(f"FFW trains on an unbiased split: dataset {ctx.bundle.name} has no val split")
    if ctx.bundle.num_attributes > 1:
        raise BiseError(f"FFW supports one bias attribute; {ctx.bundle.name} has {ctx.bundle.num_attributes}")
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(ctx.seed))
    cut = int(len(val) * p["train_fraction"])
    result = run_ffw(up.model, val.subset(order[:cut]), val.subset(order[cut:]), num_bias=ctx.bundle.num_bias,
                     settings=pruning_settings(p), device=ctx.device, seed=seed_stage(ctx.seed, ctx.stage.name),
                     amp=ctx.amp)
    metrics = ctx.evaluate(apply_weight_masks(up.model, result.weight_masks))
    # Unstructured pruning keeps every shape: count the zeroed weights instead of the removed ones.
    metrics.update(sparsity_weights=weight_sparsity(result.weight_masks), sparsity_units=None,
                   best_epoch=result.best_epoch, search_epochs=len(result.history))
    return {"metrics": metrics, "masks": result.weight_masks, "history": result.history}


# ------------------------------------------------------------------------------------ DFR and LfF baselines

def dfr(ctx: Context, up: Upstream) -> dict:
    """DFR (Kirichenko et al., ICLR 2023), in the order of DFR's code: the frozen vanilla backbone with its last
    layer refitted as an L1 logistic regression on group-balanced bottleneck features: of the biased training
    split with its bias labels (`dfr_train`, BISE's supervision) or of the unbiased validation split (`dfr_val`,
    standardised with the training features' statistics). The record carries the chosen C (`dfr_c`) and the
    number of balanced subsamples averaged (`dfr_subsamples`)."""
    from bise_cli.baselines.dfr import apply_dfr, dfr_options, dfr_train, dfr_val

    stage, model = ctx.stage.name, up.model
    options = dfr_options(ctx.cfg["baselines"]["dfr"], stage)
    val = ctx.bundle.get("val")
    if ctx.stage.needs_val and val is None:
        raise BiseError(f"{stage} fits on the unbiased validation split: dataset {ctx.bundle.name} has none "
                        "(use dfr_train)")

    def features(split):
        return predict(model, split, ctx.cfg["eval_batch_size"], ctx.device, features=True)["z"]

    kwargs = dict(num_classes=ctx.bundle.num_classes, num_bias=ctx.bundle.num_bias,
                  seed=seed_stage(ctx.seed, stage), **options)
    if not ctx.stage.needs_val:
        # The training split's bias labels, or the identification model's pseudo labels when unsupervised.
        train = ctx.bundle["train"] if ctx.cfg["bias_labels"] == "ground_truth" else \
            ctx.bundle["train"].with_bias(predict(identification_model(ctx), ctx.bundle["train"],
                                                  ctx.cfg["eval_batch_size"], ctx.device)["pred"])
        extra = (features(val), val.y, val.b) if val is not None else ()
        result = dfr_train(features(train), train.y, train.b, *extra, **kwargs)
    else:
        result = dfr_val(features(val), val.y, val.b, features(ctx.bundle["train"]), **kwargs)
    metrics = {**ctx.evaluate(apply_dfr(model, result)), "dfr_c": result.c, "dfr_subsamples": result.n_subsamples}
    return {"metrics": metrics, "history": result.history}


def lff(ctx: Context, up: Upstream) -> dict:
    """LfF (Nam et al., NeurIPS 2020): a biased and a debiased model trained from scratch with the vanilla
    recipe's budget; no bias labels."""
    from bise_cli.baselines.lff import train_lff

    lff_cfg = ctx.cfg["baselines"]["lff"]
    model, history = train_lff(ctx.new_backbone, ctx.bundle["train"], ctx.recipe("train"), q=lff_cfg["q"],
                               ema_alpha=lff_cfg["ema_alpha"], num_classes=ctx.bundle.num_classes,
                               device=ctx.device, seed=seed_stage(ctx.seed, ctx.stage.name), amp=ctx.amp)
    return {"metrics": ctx.evaluate(freeze(model)), "history": history}


# --------------------------------------------------------------------------------------------- running them

def compute(ctx: Context, stage: StageSpec, up: Upstream) -> list[tuple[dict, dict | None]]:
    """Run one (non-root) stage through the cache under `stage_key` and return its records' (metrics, extra):
    the cached result is kept in `up` for the stages that build on it, its curves written to the run folder."""
    key = stage_key(stage, ctx.cfg, up.keys[stage.parent])
    view = ctx.for_stage(stage)
    result = ctx.cache.get_or_compute(stage.name, key, lambda: stage.function()(view, up))
    up.keys[stage.name], up.results[stage.name] = key, result
    if stage.history and "history" in result:  # entries cached before curves were kept have none
        write_json(ctx.run_dir.file(f"{stage.name}_history.json"), result["history"])
    if stage.finish:
        return stage.function("finish")(view, up, result)
    return [(result["metrics"], None)]


# ------------------------------------------------------------------------- SoftCon and BiasCon + BiasBal

def contrastive(ctx: Context, up: Upstream) -> dict:
    """SoftCon (`softcon`: no bias labels; the frozen vanilla model is the bias-capturing model) or BiasCon +
    BiasBal (`bcon_bbal`: the training split's bias labels, or the identification model's pseudo labels when
    bias_labels=identification), trained from scratch (Hong & Yang, NeurIPS 2021)."""
    from bise_cli.baselines import contrastive as con

    stage = ctx.stage.name
    options = ctx.cfg["baselines"][stage]
    bundle, train = ctx.bundle, ctx.bundle["train"]
    if stage == "bcon_bbal" and ctx.cfg["bias_labels"] == "identification" and bundle.num_attributes > 1:
        raise BiseError(f"bcon_bbal with bias_labels=identification needs one bias attribute (the pseudo labels are "
                        f"one); {bundle.name} has {bundle.num_attributes}: use bias_labels=ground_truth")
    generator = torch.Generator().manual_seed(seed_stage(ctx.seed, f"{stage}_sampler"))
    if stage == "softcon":
        bias_features = predict(up.model, train, ctx.cfg["eval_batch_size"], ctx.device, features=True)["z"]
        sampler = con.softcon_sampler_weights(bias_features, train.y, bundle.num_classes, generator)
        prior = bias = None
        bias_features = bias_features.to(ctx.device)

        def pairs(index):
            return con.softcon_pair_weights(bias_features[index.to(ctx.device)])
    else:
        b = train.b if ctx.cfg["bias_labels"] == "ground_truth" else \
            predict(identification_model(ctx), train, ctx.cfg["eval_batch_size"], ctx.device)["pred"]
        bias = con.joint_bias(b.cpu(), bundle.num_bias)
        num_joint = bundle.num_bias ** (1 if b.dim() == 1 else b.shape[1])
        sampler = con.biascon_sampler_weights(train.y, bias, bundle.num_classes, num_joint)
        prior = con.class_given_bias_prior(train.y, bias, bundle.num_classes, num_joint)

        def pairs(index):
            return con.biascon_pair_weights(bias[index])
    seed = seed_stage(ctx.seed, stage)
    net = ctx.new_backbone().to(ctx.device)  # after seeding: the initialisation is part of the stage
    best = matched.BestState(net, bundle.get("val"), bundle.num_classes, bundle.num_bias,
                               batch_size=ctx.cfg["eval_batch_size"], device=ctx.device,
                               metric=options["selection_metric"], group_weights=train_group_weights(bundle))
    history = con.train_contrastive(
        net, train, con.contrastive_recipe(options, f"baselines.{stage}"), pair_weights=pairs,
        sampler_weights=sampler, contrastive_batch_size=options["contrastive_batch_size"],
        ce_weight=options["ce_weight"], temperature=options["temperature"], ratio=options["ratio"],
        prior=prior, bias=bias, device=ctx.device, seed=seed, amp=ctx.amp,
        description=stage, after_epoch=best.update if options["select_best"] else None)
    best.restore()
    return {"metrics": {**ctx.evaluate(freeze(net)),
                        "best_epoch": best.epoch if options["select_best"] else options["epochs"]},
            "history": history}


def cache_root(cfg: dict) -> Path:
    return Path(cfg["output_root"]) / "cache"
