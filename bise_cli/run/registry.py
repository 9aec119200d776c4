"""The stage registry: one `StageSpec` per stage, the one place a stage is declared.

Everything else derives from `SPECS`: the stage names `stages=[...]` accepts (validate.py), the order and shape of
the recipe (pipeline.py), each stage's cache key and the part of the config it may read (stages.py), the
settings the model card reports as unused (card.py), and the titles, colours and order of every table, plot and
report (`spec` and `stage_rank`, read by plots.py, card.py and tables.py). This module imports nothing from
`bise_cli`, so the reporting layer can use it without importing torch or any stage's code; a stage's run function
is named as "module:function" and imported only when the stage runs.

How a stage's cache key is built: its parent's key (the vanilla model's, or the BISE search's) plus the stage's
name and version plus the value of every config section it `reads` (`effective_reads`). The stage's run function
sees only those sections and the ones its ancestors read (a restricted view, `stages.Context.for_stage`), so a
stage cannot depend on a setting its key leaves out: reading an undeclared section is an error, not a stale cache
hit. tests/test_registry.py checks that every leaf of every packaged config is read by some stage or declared
as not changing a result (`defaults.SETTING_ROLES`).

Adding a stage (e.g. a new baseline):
  1. write its module with a run function `run(ctx, up) -> dict`: `ctx` is a `stages.Context` restricted to the
     sections the spec reads, `up` a `stages.Upstream` (the frozen vanilla model, `up.result("bise")` for a
     stage whose parent is bise). Return {"metrics": {...}} (use `ctx.evaluate(model)` for the standard
     metrics), optionally "history" (a list of dicts, written to `<name>_history.json`) and anything else worth
     caching. The pipeline caches the returned dict under the stage's key and writes the record.
  2. add its `StageSpec` to `SPECS` below (name, title, colour, description, version, run="module:function",
     reads=(its config sections, e.g. "baselines.<name>"), what it needs).
  3. add its settings to conf/baselines/<name>.yaml (and to the `baselines` defaults of conf/config.yaml) with a
     comment per option.
Bump `version` whenever the stage's computation changes, so stale cache entries are not reused.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# Config sections that measure every result: part of the vanilla key, so of every stage's key.
EVALUATION_SECTIONS = ("leakage_probe", "latency", "eval_batch_size", "bootstrap")
# What the vanilla model depends on besides the training recipe (`train`, left out when a checkpoint is given).
ROOT_SECTIONS = ("dataset", "rho", "seed", "backbone", "deterministic", "precision", "vanilla_checkpoint",
                 *EVALUATION_SECTIONS)
# A stage that needs bias labels reads these (ground truth or an identification model's pseudo labels); the
# identification model is trained with the `train` recipe, so with pseudo labels the stage reads `train` too.
BIAS_LABEL_SECTIONS = ("bias_labels", "identification")


@dataclass(frozen=True)
class StageSpec:
    """One stage: how it is shown, what it needs and reads, and the function that computes it."""

    name: str                       # as in `stages=[...]` and in every record's `stage`
    title: str                      # for people: legends, report headings
    colour: str                     # matplotlib colour in every plot
    description: str
    version: int | None = None      # bump when the computation changes; None: a paper reference only (not run)
    run: str | None = None          # "module:function", called as run(ctx, up) -> {"metrics": ..., ...}
    parent: str | None = "vanilla"  # whose model and cache key it builds on ("vanilla" or "bise"); None: the root
    reads: tuple[str, ...] = ()     # dotted config sections in its key and its config view
    pruning: str | None = None      # the `pruning` config it needs ("bise" or "ffw"), if any
    needs_bias_labels: bool = False  # reads BIAS_LABEL_SECTIONS (and `train` with pseudo labels)
    needs_val: bool = False         # needs the dataset's unbiased validation split
    binary_task: bool = False       # needs a binary task
    models_trained: int = 1         # models trained at once (memory planning for data placement)
    finish: str | None = None       # "module:function" (ctx, result) -> [(metrics, extra)]: run-folder files and
    #                                 records from the (possibly cached) result; default: one record of its metrics
    history: bool = True            # write the result's "history" to <name>_history.json
    card: bool = False              # one of the model card's before/after columns

    @property
    def runnable(self) -> bool:
        return self.run is not None

    def function(self, which: str = "run"):
        """The run (or finish) function, imported on first use."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


SPECS: tuple[StageSpec, ...] = (
    StageSpec("vanilla", "Vanilla", "black", "the model trained plainly on the biased training split",
              version=2, run="bise_cli.run.stages:vanilla", parent=None, reads=ROOT_SECTIONS, card=True),
    StageSpec("bise", "BISE", "tab:blue", "BISE mask search on the frozen vanilla model, then physical pruning",
              version=4, run="bise_cli.run.stages:bise_search", reads=("pruning", "reweighting"), pruning="bise",
              needs_bias_labels=True, finish="bise_cli.run.stages:write_search", history=False, card=True),
    StageSpec("bise_ft", "BISE+FT", "tab:cyan",
              "BISE's subnetwork fine-tuned (masks frozen) with the reweighted loss",
              version=2, run="bise_cli.run.stages:finetune", parent="bise", reads=("finetune",), needs_bias_labels=True,
              card=True),
    StageSpec("reweighted_ft", "Reweighted FT", "tab:purple",
              "the unpruned vanilla model fine-tuned with the same reweighted loss (control for BISE+FT)",
              version=2, run="bise_cli.run.stages:finetune", reads=("finetune", "reweighting"),
              needs_bias_labels=True),
    StageSpec("random", "Random pruning", "tab:orange",
              "random units removed with BISE's per-layer kept-unit counts",
              version=2, run="bise_cli.run.stages:random_pruning", parent="bise", history=False),
    StageSpec("magnitude", "Magnitude pruning", "tab:green",
              "the units of largest weight L2 norm kept, with BISE's per-layer kept-unit counts",
              version=2, run="bise_cli.run.stages:magnitude_pruning", parent="bise", history=False),
    StageSpec("ffw", "FFW", "tab:red",
              "FFW baseline: unstructured soft weight gates trained on a small unbiased set",
              version=2, run="bise_cli.run.stages:ffw", reads=("pruning",), pruning="ffw", needs_val=True),
    StageSpec("dfr_train", "DFR (train)", "tab:brown",
              "deep feature reweighting: last layer retrained on group-balanced training data",
              version=3, run="bise_cli.run.stages:dfr", reads=("baselines.dfr",), needs_bias_labels=True),
    StageSpec("dfr_val", "DFR (val)", "tab:olive",
              "deep feature reweighting: last layer retrained on the unbiased validation data",
              version=3, run="bise_cli.run.stages:dfr", reads=("baselines.dfr",), needs_val=True),
    StageSpec("lff", "LfF", "tab:pink", "Learning from Failure, debiased training from scratch",
              version=1, run="bise_cli.run.stages:lff", reads=("train", "baselines.lff"), models_trained=2),
    # Hong & Yang, NeurIPS 2021 (their BiasedMNIST numbers in the BISE paper probably come from Barbano et al.'s
    # ICLR 2023 table): trained from scratch with the authors' recipe (conf: baselines.softcon / bcon_bbal).
    StageSpec("softcon", "SoftCon", "tab:gray",
              "soft bias-contrastive learning from scratch, pairs weighted by the vanilla model's features "
              "(Hong & Yang, NeurIPS 2021)",
              version=2, run="bise_cli.run.stages:contrastive", reads=("baselines.softcon",)),
    StageSpec("bcon_bbal", "BCon+BBal", "gold",
              "bias-contrastive + bias-balanced learning from scratch with bias labels (Hong & Yang, NeurIPS 2021)",
              version=2, run="bise_cli.run.stages:contrastive", reads=("baselines.bcon_bbal",), needs_bias_labels=True),
)
_SPECS = {spec.name: spec for spec in SPECS}
STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in SPECS)
# The stages `stages=[...]` accepts.
RUNNABLE: tuple[str, ...] = tuple(spec.name for spec in SPECS if spec.runnable)


def spec(name: str) -> StageSpec:
    """The declared stage, or an undeclared one shown by its name in grey (e.g. from an old record)."""
    return _SPECS.get(name) or StageSpec(name, name, "grey", "undeclared stage")


def stage_rank(name: str) -> tuple[int, str]:
    """Sort key: declared stages in declaration order, then undeclared ones alphabetically."""
    return (STAGE_NAMES.index(name), "") if name in _SPECS else (len(STAGE_NAMES), str(name))


def ancestors(name: str) -> tuple[StageSpec, ...]:
    """The stage's chain of parents, root first (vanilla, then e.g. bise for bise_ft)."""
    chain = []
    parent = _SPECS[name].parent
    while parent is not None:
        chain.insert(0, _SPECS[parent])
        parent = _SPECS[parent].parent
    return tuple(chain)


def effective_reads(stage: StageSpec, cfg: dict) -> tuple[str, ...]:
    """The config sections the stage itself reads for this config (its key holds their values): its declared
    `reads`, the bias-label sections when it needs bias labels (with `train` when they are pseudo labels from the
    identification model, which trains with it), and, for the root, `train` unless a checkpoint replaces
    training."""
    reads = list(stage.reads)
    if stage.needs_bias_labels:
        reads += BIAS_LABEL_SECTIONS
        if cfg.get("bias_labels") == "identification":
            reads.append("train")
    if stage.parent is None and not cfg.get("vanilla_checkpoint"):
        reads.append("train")
    return tuple(dict.fromkeys(reads))


def visible_sections(name: str, cfg: dict) -> tuple[str, ...]:
    """What a stage's run function may read: its own sections and every ancestor's (all are in its key)."""
    return tuple(dict.fromkeys(section for stage in (*ancestors(name), _SPECS[name])
                               for section in effective_reads(stage, cfg)))


def parents(chosen: list[str]) -> list[str]:
    """The stages the chosen ones build on, but the root, in declaration order (e.g. bise for bise_ft)."""
    names = {a.name for name in chosen for a in ancestors(name) if a.parent is not None}
    return [name for name in STAGE_NAMES if name in names]


def required_pruning(name: str) -> str | None:
    """The `pruning` config a stage needs: its own, or that of the parent whose result it builds on."""
    for stage in (_SPECS[name], *reversed(ancestors(name))):
        if stage.pruning:
            return stage.pruning
    return None
