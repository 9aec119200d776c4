"""Where the config lives, which settings never change a result, and the packaged defaults of a choice.

`CONF_DIR` is the config tree shipped in the package. `SETTING_ROLES` declares, once, every setting that does
not change a result, by role; every other setting is results-relevant. From it derive a run's identity (the
pipeline), the config fields of its records (`records.flatten_config`), the cache keys (`stages.section_value`)
and the run folder names (Hydra's `exclude_keys` in conf/config.yaml, checked against it by the tests).

`packaged_defaults` gives the config of a dataset x backbone x pruning choice: the YAML files are the one home of
every default (they hold the paper's values), so the per-run report finds the settings that deviate from the
paper by comparing a run's config with these, instead of keeping a second copy of the protocol in code.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # shipped in the package; the top-level conf/ links here

# Settings (dotted names) that never change a result, by role.
SETTING_ROLES = {
    # Where files are: in no identity, record, folder name or cache key.
    "paths": ("output_root", "dataset.root", "dataset.cache_dir"),
    # How a run is executed, logged or labelled: in no identity (the pipeline adds the kind of device the run
    # resolves `device` to), record, folder name or cache key.
    "execution": ("device", "data_on_device", "threads", "cache", "cache_wait_minutes", "logger", "name", "note",
                  "hydra", "gpu_work"),
    # What a run does and how its records are labelled: in its identity (another stage list is another run)
    # but not among a record's config fields (a record is one stage; record_keys are merged into the fields).
    "plan": ("stages", "record_keys"),
    # What a run reports, not what it computes: in no identity, folder name or cache key, but in the records
    # (`bise table` groups tuning trials by their objective).
    "labels": ("tune.objective",),
}
PATH_SETTINGS = SETTING_ROLES["paths"]
# Out of identities and cache keys; out of records.
NOT_RESULT_SETTINGS = (*SETTING_ROLES["paths"], *SETTING_ROLES["execution"], *SETTING_ROLES["labels"])
NOT_RECORD_SETTINGS = (*SETTING_ROLES["paths"], *SETTING_ROLES["execution"], *SETTING_ROLES["plan"])


def drop_settings(cfg: dict, names, prefix: str = "") -> dict:
    """`cfg` without the dotted settings `names` (e.g. `dataset.root`), at any depth."""
    return {key: drop_settings(value, names, f"{prefix}{key}.") if isinstance(value, dict) else value
            for key, value in cfg.items() if f"{prefix}{key}" not in names}


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
