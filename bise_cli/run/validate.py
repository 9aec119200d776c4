"""Check the whole composed config before the first stage runs, so a bad value fails in one line, not after training.

`validate_config(cfg)` checks the type and range of every setting the pipeline reads and rejects keys that no
config file declares (a `+train.epoch=3` typo), naming the closest allowed key. The allowed keys are read from
the YAML files of the config tree (conf/), so a new option documented in its YAML file is accepted without
touching this module. `check_writable(path)` proves a folder can be written before hours of training go into it.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import uuid
from pathlib import Path

import yaml

from bise_cli.core.defaults import CONF_DIR
from bise_cli.core.errors import BiseError
from bise_cli.data.registry import DATASETS, resolve_milestones
from bise_cli.run import registry

DEVICES = ("auto", "cpu", "cuda")
BIAS_LABELS = ("ground_truth", "identification")
# Top-level YAML entries that are not settings of the task config.
NOT_SETTINGS = ("defaults", "hydra")

# A key tree: {key: subtree or None}; None means "any value" (a leaf, or a free-form mapping such as
# record_keys: {}), a dict means a mapping whose keys are checked too.
KeyTree = dict


def _tree(mapping: dict) -> KeyTree:
    return {key: (_tree(value) if isinstance(value, dict) and value else None)
            for key, value in mapping.items() if key not in NOT_SETTINGS}


def _merge(a: KeyTree, b: KeyTree) -> KeyTree:
    """Union of two key trees; a free-form entry on either side stays free-form."""
    merged = dict(a)
    for key, sub in b.items():
        if key not in merged:
            merged[key] = sub
        elif merged[key] is None or sub is None:
            merged[key] = None
        else:
            merged[key] = _merge(merged[key], sub)
    return merged


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise BiseError(f"cannot read config file {path}: {error}") from None
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=8)
def declared_keys(conf_dir: str) -> tuple[KeyTree, dict[str, dict[str, KeyTree]]]:
    """(top-level key tree of config.yaml, {group: {option name: key tree}}) read once from the config tree.

    Groups are the folders whose name is also a key of the composed config (dataset, backbone, pruning, train,
    finetune, ...); global-package folders (experiment, dataset_backbone) and hydra/ are not groups of keys.
    An option is known by its `name:` value when it has one (dataset.name, pruning.name), else by its file name;
    an option file that lists sibling options in its own defaults inherits their keys."""
    root = Path(conf_dir)
    top = _tree(_load_yaml(root / "config.yaml"))
    groups: dict[str, dict[str, KeyTree]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")):
        files = {path.stem: _load_yaml(path) for path in sorted(folder.glob("*.yaml"))}
        if not files or any("@package _global_" in (folder / f"{stem}.yaml").read_text() for stem in files):
            continue
        options = {}
        for stem, data in files.items():
            tree = _tree(data)
            for parent in data.get("defaults") or []:
                if isinstance(parent, str) and parent in files:
                    tree = _merge(_tree(files[parent]), tree)
            options[str(data.get("name", stem))] = tree
        groups[folder.name] = options
        top.setdefault(folder.name, None)
    return top, groups


def _unknown(keys, allowed: KeyTree, prefix: str, where: str) -> None:
    for key in keys:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), [str(k) for k in allowed], n=1)
        if close:
            raise BiseError(f"unknown setting {prefix}{key} ({where}); did you mean {prefix}{close[0]}?")
        raise BiseError(f"unknown setting {prefix}{key} ({where}); allowed: "
                        f"{', '.join(prefix + str(k) for k in sorted(allowed, key=str))}")


def _check_tree(values: dict, allowed: KeyTree, prefix: str, where: str) -> None:
    _unknown(values, allowed, prefix, where)
    for key, value in values.items():
        sub = allowed[key]
        if sub is not None and isinstance(value, dict):
            _check_tree(value, sub, f"{prefix}{key}.", where)


def check_known_keys(cfg: dict, conf_dir: str | Path | None = None) -> None:
    """Reject any key that no YAML file of the config tree declares, naming the closest allowed one."""
    top, groups = declared_keys(str(conf_dir or CONF_DIR))
    _unknown([k for k in cfg if k not in NOT_SETTINGS], top, "", "not in config.yaml")
    for key, value in cfg.items():
        if key in NOT_SETTINGS or not isinstance(value, dict):
            continue
        if key in groups:
            options = groups[key]
            chosen = value.get("name")
            if isinstance(chosen, str) and chosen in options:
                allowed, where = options[chosen], f"not in conf/{key}/ option {chosen}"
            else:  # no name (train, finetune: one file per dataset) or an unknown one: any option's keys
                allowed = functools.reduce(_merge, options.values(), {})
                where = f"not in any conf/{key}/*.yaml"
            _check_tree(value, allowed, f"{key}.", where)
        elif top.get(key) is not None:
            _check_tree(value, top[key], f"{key}.", "not in config.yaml")


# ------------------------------------------------------------------------------------------------ value checks
def _get(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(cfg: dict, key: str, minimum: int, optional: bool = False, allowed: str | None = None) -> None:
    value = _get(cfg, key)
    if value is _MISSING or (optional and value is None):
        return
    if not _is_int(value) or value < minimum:
        allowed = allowed or f"an integer >= {minimum}" + (" or null" if optional else "")
        raise BiseError(f"{key} must be {allowed}, got {value!r}")


def _positive(cfg: dict, key: str) -> None:
    value = _get(cfg, key)
    if value is not _MISSING and (not _is_number(value) or value <= 0):
        raise BiseError(f"{key} must be a number > 0, got {value!r}")


def _choice(cfg: dict, key: str, allowed) -> None:
    value = _get(cfg, key)
    if value is not _MISSING and value not in allowed:
        raise BiseError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")


def _bool(cfg: dict, key: str) -> None:
    value = _get(cfg, key)
    if value is not _MISSING and not isinstance(value, bool):
        raise BiseError(f"{key} must be true or false, got {value!r}")


def _check_device(device) -> None:
    if device not in DEVICES:
        raise BiseError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BiseError("device=cuda but no CUDA device is available; use device=auto or device=cpu")


def _check_stages(stages, known) -> list[str]:
    if isinstance(stages, str):
        raise BiseError(f"stages must be a list, got the string {stages!r}; write stages=[{stages}] "
                        f"(allowed stages: {', '.join(known)})")
    if not isinstance(stages, (list, tuple)) or not stages:
        raise BiseError(f"stages must be a non-empty list of stage names, got {stages!r}; allowed stages: "
                        f"{', '.join(known)}")
    for stage in stages:
        if stage not in known:
            close = difflib.get_close_matches(str(stage), list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise BiseError(f"unknown stage {stage!r} in stages{hint}; allowed: {', '.join(known)}")
    return list(stages)


def _check_checkpoint(path) -> None:
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise BiseError(f"vanilla_checkpoint must be a file path or null, got {path!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise BiseError(f"vanilla_checkpoint {path!r} {what}; give a state dict file (.pt) or null")
    if not os.access(file, os.R_OK):
        raise BiseError(f"vanilla_checkpoint {path!r} is not readable (permissions)")


def validate_config(cfg: dict, stages: tuple[str, ...] | None = None, conf_dir: str | Path | None = None) -> list[str]:
    """Check every setting the pipeline reads; raise BiseError (one line: key, value, what is allowed) on the
    first bad one and return warnings (settings that are legal but probably not meant).

    `stages` are the known stage names (default: the runnable stages of bise_cli.run.registry); `conf_dir` the
    config tree whose YAML files declare the allowed keys (default: the package's)."""
    if stages is None:
        stages = registry.RUNNABLE
    warnings: list[str] = []
    _check_device(cfg.get("device", "auto"))  # first: a GPU run on a machine without one must not start at all
    check_known_keys(cfg, conf_dir)

    seed = cfg.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise BiseError(f"seed must be an integer >= 0, got {seed!r}")
    rho = cfg.get("rho", 1.0)
    if not _is_number(rho) or not 0 < rho <= 1:
        raise BiseError(f"rho must be in (0, 1], got {rho!r}")
    chosen = _check_stages(cfg.get("stages", ["vanilla"]), tuple(stages))
    _choice(cfg, "bias_labels", BIAS_LABELS)
    from bise_cli.core.precision import DATA_PLACEMENTS, check_precision  # lazy: it imports torch (`bise table` uses
    #                                                                   check_writable)

    _choice(cfg, "data_on_device", DATA_PLACEMENTS)
    _bool(cfg, "cache")
    _bool(cfg, "gpu_work")
    _positive(cfg, "cache_wait_minutes")
    _bool(cfg, "deterministic")
    for key in ("output_root", "name"):
        value = _get(cfg, key)
        if value is not _MISSING and (not isinstance(value, str) or not value):
            raise BiseError(f"{key} must be a non-empty string, got {value!r}")
    if _get(cfg, "eval_batch_size") != "auto":
        _int(cfg, "eval_batch_size", 1, allowed="auto or an integer >= 1")
    _int(cfg, "threads", 1, optional=True)
    check_precision(cfg.get("precision", "fp32"))
    _int(cfg, "identification.epochs", 0)
    _int(cfg, "leakage_probe.epochs", 0)
    _int(cfg, "leakage_probe.batch_size", 1)
    _positive(cfg, "leakage_probe.lr")
    _int(cfg, "latency.repeats", 1)
    _int(cfg, "latency.warmup", 0)
    # The training recipes, validated as the stages will build them (one line naming a bad value).
    from bise_cli.baselines.contrastive import contrastive_recipe
    from bise_cli.method.recipe import TrainRecipe

    for section in ("train", "finetune"):
        if isinstance(cfg.get(section), dict):
            options = cfg[section]
            auto = {"milestones": []} if section == "train" and options.get("milestones") == "auto" else {}
            TrainRecipe.from_section(options, section, **auto)
    milestones, dataset = _get(cfg, "train.milestones"), _get(cfg, "dataset.name")
    if milestones == "auto" and dataset in DATASETS:  # before any data is read: auto needs the dataset's rule
        resolve_milestones(dataset, milestones, cfg.get("rho", 1.0))
    # The contrastive baselines' sections (the ones with a contrastive batch size).
    for stage in [name for name, options in (cfg.get("baselines") or {}).items()
                  if isinstance(options, dict) and "contrastive_batch_size" in options]:
        contrastive_recipe(cfg["baselines"][stage], f"baselines.{stage}")
        _int(cfg, f"baselines.{stage}.contrastive_batch_size", 1)
        _positive(cfg, f"baselines.{stage}.temperature")
    _int(cfg, "dataset.max_samples", 1, optional=True)
    noise = _get(cfg, "dataset.label_noise")
    if noise is not _MISSING and noise is not None and (not _is_number(noise) or not 0 <= noise < 1):
        raise BiseError(f"dataset.label_noise must be a number in [0, 1) (the fraction of training labels flipped), "
                        f"got {noise!r}")
    record_keys = _get(cfg, "record_keys")
    if record_keys is not _MISSING and record_keys is not None and not isinstance(record_keys, dict):
        raise BiseError(f"record_keys must be a mapping, e.g. record_keys={{ablation:ce}}, got {record_keys!r}")
    _check_checkpoint(cfg.get("vanilla_checkpoint"))
    objective = _get(cfg, "tune.objective")
    if objective is not _MISSING and objective is not None:
        from bise_cli.run.tuning import parse_objective

        parse_objective(objective, chosen)
    dfr_settings = _get(cfg, "baselines.dfr")
    dfr_stages = [stage for stage in chosen if "baselines.dfr" in registry.spec(stage).reads]
    if dfr_settings is not _MISSING and dfr_stages:
        # Only when a DFR stage runs: bise_cli.baselines.dfr imports scikit-learn (about 3 s on a busy 2-core machine).
        from bise_cli.baselines.dfr import dfr_options

        for stage in dfr_stages:
            dfr_options(dfr_settings, stage)

    if _get(cfg, "train.epochs") == 0 and not cfg.get("vanilla_checkpoint"):
        warnings.append("train.epochs=0: the vanilla model keeps its random initial weights")
    finetuned = [stage for stage in chosen if "finetune" in registry.spec(stage).reads]
    if _get(cfg, "finetune.epochs") == 0 and finetuned:
        warnings.append(f"finetune.epochs=0: {' and '.join(finetuned)} evaluate their starting models unchanged")
    return warnings


def check_writable(path: str | Path) -> None:
    """Create folder `path` if needed and write and remove a probe file in it; BiseError if that fails, so a
    read-only or full disk is found before training rather than when the results are saved."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise BiseError(f"output folder {folder} is not writable: a file of that name is in the way")
    probe = folder / f".bise-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise BiseError(f"output folder {folder} is not writable: {error.strerror or error}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
