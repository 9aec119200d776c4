"""The dataset registry: one `DatasetSpec` per dataset, the one place a dataset's facts are declared (as DomainBed
keeps them on the dataset class).

Everything else derives from `SPECS`: the names `dataset=` accepts and the builder (`build_dataset` in
data/__init__.py), the class count and bias attribute names the builders put on their bundles (and `bise gates`
reads without building data), the paper's reweighting for `reweighting: auto` (method/reweighting.py), the model
input of run folders written before the builders stored it (reporting/export.py) and the vanilla learning-rate
milestones for `train.milestones: auto` (run/stages.py). Functions are named as "module:function" and imported
only when used (CivilComments' module needs pandas and the tokenizer; the reporting layer should not import them).

Adding a dataset:
  1. write its module with a builder `build(source, root, seed, max_samples=None, **options) -> DatasetBundle`
     (called with keywords; it takes `rho` too when the top-level `rho` sets its bias correlation), and
     optionally a `preprocessing(...) -> dict` describing the model input;
  2. add its `DatasetSpec` to `SPECS` below;
  3. add conf/dataset/<name>.yaml (its options, a comment each) and its train/ and finetune/ recipes
     (tests/test_configs.py checks that every dataset YAML has a spec and every spec a YAML).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from bise_cli.core.errors import BiseError, check_choice


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its builder and the facts the rest of bise needs about it."""

    name: str                       # as in `dataset=<name>` and the bundle's `name`
    build: str                      # "module:function": build(source=, root=, seed=, max_samples=, **options)
    uses_rho: bool = False          # the builder takes the top-level `rho` (its training bias correlation)
    num_classes: int | None = None  # None: known only from the data (a user's table)
    bias_names: tuple[str, ...] | None = ("bias",)  # one per bias attribute; None: the config's bias_columns
    reweighting: str = "group_balanced"  # `reweighting: auto`: the official code's default (its options 1, 3, 8)
    preprocessing: str | None = None  # "module:function" (options as info records them) -> the model input
    milestones: str | None = None   # "module:function" (rho) -> `train.milestones: auto`; None: auto is refused

    def function(self, which: str = "build"):
        """The builder (or `preprocessing`, `milestones` function), imported on first use."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec("biased_mnist", "bise_cli.data.biased_mnist:build", uses_rho=True, num_classes=10,
                bias_names=("colour",), reweighting="nominal_rho",
                preprocessing="bise_cli.data.biased_mnist:preprocessing",
                milestones="bise_cli.data.biased_mnist:paper_milestones"),
    DatasetSpec("multicolor_mnist", "bise_cli.data.multicolor_mnist:build", num_classes=10,
                bias_names=("left", "right"), reweighting="inverse_rho",
                preprocessing="bise_cli.data.multicolor_mnist:preprocessing"),
    # rho sets the synthetic stand-in's correlation only (the real release has its own).
    DatasetSpec("civilcomments", "bise_cli.data.civilcomments:build", uses_rho=True, num_classes=2,
                preprocessing="bise_cli.data.civilcomments:preprocessing"),
    DatasetSpec("cifar10c", "bise_cli.data.cifar10c:build", uses_rho=True, num_classes=10,
                bias_names=("corruption",), reweighting="nominal_rho",
                preprocessing="bise_cli.data.cifar10c:preprocessing"),
    DatasetSpec("celeba", "bise_cli.data.celeba:build", num_classes=2, bias_names=("gender",),
                preprocessing="bise_cli.data.celeba:preprocessing"),
    # A user's manifest: classes, attributes and preprocessing come from the data (its info), not from here.
    DatasetSpec("table", "bise_cli.data.table:build", bias_names=None),
    DatasetSpec("waterbirds", "bise_cli.data.waterbirds:build", num_classes=2, bias_names=None),
)

DATASETS: tuple[str, ...] = tuple(s.name for s in SPECS)


def spec(name: str) -> DatasetSpec:
    """The spec of dataset `name`; a one-line BiseError naming the allowed ones for an unknown name."""
    check_choice("dataset", name, DATASETS)
    return next(s for s in SPECS if s.name == name)


def resolve_milestones(dataset: str, milestones, rho: float) -> list[int]:
    """The vanilla LR milestones: a list as given, `auto` the dataset's rule (BiasedMNIST's paper schedule); a
    one-line BiseError for `auto` on a dataset without one."""
    if milestones != "auto":
        return list(milestones)
    rule = spec(dataset).milestones
    if rule is None:
        having = ", ".join(s.name for s in SPECS if s.milestones)
        raise BiseError(f"train.milestones=auto has no rule for dataset {dataset} (only for {having}); "
                        f"give a list of epochs, e.g. train.milestones=[40,60]")
    return spec(dataset).function("milestones")(rho)
