"""Every config file composes, and what it configures can be built (optimisers, schedules, search, models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bise_cli.cli  # noqa: F401  (registers the bise.dirname resolver used by the hydra section)
from bise_cli.cli import CONF_DIR
from bise_cli.core.errors import BiseError
from bise_cli.data import DATASETS
from bise_cli.data import registry as datasets
from bise_cli.method.train import make_optimizer, make_scheduler
from bise_cli.models import build_backbone
from bise_cli.models import registry as backbones
from bise_cli.run.pipeline import STAGES
from bise_cli.run.stages import pruning_settings
from bise_cli.run.validate import validate_config

GROUP_FILES = sorted(p.relative_to(CONF_DIR) for p in CONF_DIR.glob("*/**/*.yaml") if p.parts[-2] != "launcher"
                     and "hydra" not in p.relative_to(CONF_DIR).parts)


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _overrides_for(path: Path) -> list[str]:
    group, option = path.parts[0], str(path.with_suffix("")).split("/", 1)[1]
    if group == "dataset_backbone":  # file name is <dataset>_<backbone>
        dataset = next(d for d in DATASETS if option.startswith(d + "_"))
        return [f"dataset={dataset}", f"backbone={option[len(dataset) + 1:]}"]
    return [f"{group}={option}"]


def test_every_group_file_is_covered():
    groups = {p.parts[0] for p in GROUP_FILES}
    assert {"dataset", "backbone", "pruning", "train", "finetune", "experiment", "dataset_backbone"} <= groups


@pytest.mark.parametrize("path", GROUP_FILES, ids=str)
def test_config_composes_and_builds(path):
    cfg = _compose(_overrides_for(path))
    assert all(stage in STAGES for stage in cfg["stages"])
    settings = pruning_settings(cfg["pruning"])
    assert getattr(settings, "num_epochs", getattr(settings, "max_epochs", 0)) >= 1
    for recipe in (cfg["train"], cfg["finetune"]):
        params = [torch.nn.Parameter(torch.zeros(2))]
        opt = make_optimizer(recipe["optimizer"], params, recipe["lr"], recipe["momentum"], recipe["weight_decay"])
        milestones = datasets.resolve_milestones(cfg["dataset"]["name"], recipe["milestones"], cfg["rho"])
        make_scheduler(recipe["scheduler"], opt, recipe["epochs"], 10, milestones)
    backbone = dict(cfg["backbone"])
    name = backbone.pop("name")
    if name == "bert":
        pytest.importorskip("transformers")
        backbone["pretrained"] = "tiny"  # the real weights are exercised in test_bert.py
    model = build_backbone(name, 2 if cfg["dataset"]["name"] == "civilcomments" else 10, **backbone)
    assert model.gate_points()
    assert 0 < float(cfg["rho"]) <= 1


def test_command_line_example_composes_exactly_as_written():
    cfg = _compose(["dataset=biased_mnist", "rho=0.99"])
    assert cfg["rho"] == 0.99 and cfg["dataset"]["name"] == "biased_mnist"
    assert cfg["train"]["epochs"] == 80 and cfg["pruning"]["tau_min"] == 0.001


@pytest.mark.parametrize("launcher, target", [("local_parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_presets_compose(launcher, target):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


# ------------------------------------------------------------------ the registries and the config files agree
def _stems(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


def test_every_backbone_yaml_has_a_registry_spec_and_every_spec_a_yaml():
    assert _stems("backbone") == set(backbones.BACKBONES)
    for name in backbones.BACKBONES:
        keys = set(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml"))) - {"name"}
        # A key the spec does not declare would never reach the constructor.
        assert keys <= set(backbones.spec(name).options), (name, keys - set(backbones.spec(name).options))


def test_backbones_sharing_a_pruned_architecture_share_its_constructor():
    for arch, constructor in backbones.PRUNED.items():
        assert {s.pruned for s in backbones.SPECS if s.pruned_arch == arch} == {constructor}, arch


def test_an_unknown_backbone_is_one_line_naming_the_allowed_ones():
    with pytest.raises(BiseError, match=r"^unknown backbone 'resnet19'; allowed: simple_convnet, resnet18, .*hf$"):
        build_backbone("resnet19", 10)


def test_every_dataset_yaml_has_a_registry_spec_and_every_spec_a_yaml():
    assert _stems("dataset") == set(datasets.DATASETS) == set(DATASETS)
    for name in datasets.DATASETS:
        assert {name} <= _stems("train") and {name} <= _stems("finetune"), name
        spec = datasets.spec(name)
        assert callable(spec.function("build"))
        if spec.preprocessing:
            assert spec.function("preprocessing")()["kind"] in ("image", "text")
        assert spec.reweighting in ("nominal_rho", "inverse_rho", "group_balanced")
        cfg = _compose([f"dataset={name}"])
        assert cfg["dataset"]["name"] == name
        # Bias names the config sets (a table's bias_columns) are not declared twice.
        assert (spec.bias_names is None) == ("bias_columns" in cfg["dataset"]), name


def test_milestones_auto_follows_the_dataset_rule_and_is_refused_without_one():
    assert datasets.resolve_milestones("biased_mnist", "auto", 0.995) == [40, 60]
    assert datasets.resolve_milestones("biased_mnist", "auto", 0.97) == [80, 90]
    assert datasets.resolve_milestones("celeba", [3, 5], 0.9) == [3, 5]
    with pytest.raises(BiseError, match=r"^train.milestones=auto has no rule for dataset celeba \(only for "
                                        r"biased_mnist\); give a list of epochs"):
        validate_config(_compose(["dataset=celeba", "train.milestones=auto"]))
