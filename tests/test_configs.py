"""Every config file composes, and what it configures can be built (optimisers, schedules, search, models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bise_cli.cli  # noqa: F401  (registers the bise.dirname resolver used by the hydra section)
from bise_cli.cli import CONF_DIR
from bise_cli.data import DATASETS
from bise_cli.method.train import make_optimizer, make_scheduler
from bise_cli.models import build_backbone
from bise_cli.run.pipeline import STAGES
from bise_cli.run.stages import pruning_settings

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
        milestones = recipe["milestones"] if isinstance(recipe["milestones"], list) else [40, 60]
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
