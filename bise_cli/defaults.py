"""The packaged defaults of a dataset x backbone x pruning choice: the paper's protocol, read from `conf/`.

The YAML files are the one home of every default (they hold the paper's values), so the per-run report finds
the settings that deviate from the paper by comparing a run's config with these, instead of keeping a second
copy of the protocol in code.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if k not in ("defaults", "hydra")}


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


@functools.lru_cache(maxsize=16)
def _defaults(dataset: str, backbone: str, pruning: str, conf_dir: str) -> dict:
    root = Path(conf_dir)
    cfg = _load(root / "config.yaml")
    for group, option in (("dataset", dataset), ("backbone", backbone), ("pruning", pruning), ("train", dataset),
                          ("finetune", dataset)):
        cfg[group] = _load(root / group / f"{option}.yaml")
    # A dataset x backbone file is a global package: it patches the groups above.
    return _merge(cfg, _load(root / "dataset_backbone" / f"{dataset}_{backbone}.yaml"))


def packaged_defaults(dataset: str, backbone: str, pruning: str = "bise", conf_dir: str | Path = CONF_DIR) -> dict:
    """The config `bise run dataset=D backbone=B pruning=P` composes without any preset or override."""
    return _defaults(dataset, backbone, pruning, str(conf_dir))
