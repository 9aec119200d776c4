"""The splits of a manifest: train and test as marked (never derived), val derived as a group-balanced sample of
train, search = train, `max_samples` capping train, and the per-group counts the bundle's `info` records.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd

from bise_cli.core.errors import BiseError
from bise_cli.data.table.manifest import SPLITS


def group_names(target: str, classes: list, attributes: list[str], tables: dict) -> dict[tuple, str]:
    """{(y, code_1, ..., code_A): "target=..,attr=.."} for every (class, bias values) combination."""
    inverse = {a: {code: value for value, code in tables[a].items()} for a in attributes}
    names = {}
    for y, cls in enumerate(classes):
        for combo in itertools.product(*[sorted(inverse[a]) for a in attributes]):
            parts = [f"{target}={cls}"] + [f"{a}={inverse[a][c]}" for a, c in zip(attributes, combo, strict=True)]
            names[(y, *combo)] = ",".join(parts)
    return names


def check_train_groups(train: pd.DataFrame, target: str, classes: list, attributes: list[str], tables: dict) -> None:
    """Every (class, value) pair of every bias attribute must occur in train: BISE's reweighting and the
    group-balanced validation split are defined per group."""
    for k, attribute in enumerate(attributes):
        present = set(zip(train["_y"], train[f"_b{k}"], strict=True))
        for y, cls in enumerate(classes):
            for value, code in tables[attribute].items():
                if (y, code) not in present:
                    raise BiseError(f"group ({target}={cls}, {attribute}={value}) has no training rows; every "
                                    "(target, bias) group must occur in train")


def balanced_sample(train: pd.DataFrame, keys: list[str], fraction: float, seed: int) -> tuple[pd.DataFrame, int]:
    """(floor(fraction x the smallest group) rows of every group present, that count): the derived val split."""
    groups = train.groupby(keys, sort=True)
    per_group = math.floor(fraction * int(groups.size().min()))
    if per_group < 1:
        raise BiseError(f"the derived val split is empty: floor({fraction} x {int(groups.size().min())} rows of the "
                        "smallest training group) = 0; add val rows to the manifest or raise dataset.val_fraction")
    return groups.sample(per_group, random_state=seed).sort_index(), per_group


def require_splits(rows: pd.DataFrame) -> None:
    """train and test must be in the manifest (test is never derived: it is what the results are about)."""
    present = [name for name in SPLITS if (rows["_split"] == name).any()]
    for needed in ("test", "train"):
        if needed not in present:
            raise BiseError(f"no {needed} rows (splits in the manifest: {', '.join(present) or 'none'}); the "
                            f"{needed} split is never derived: mark {needed} rows in the split column")


def make_splits(rows: pd.DataFrame, attributes: int, val_fraction: float, seed: int,
                max_samples: int | None) -> tuple[dict[str, pd.DataFrame], dict]:
    """({split: rows}, {derived split: how}) from the rows' `_split` column (module docstring)."""
    require_splits(rows)
    present = {name: rows[rows["_split"] == name] for name in SPLITS if (rows["_split"] == name).any()}
    derived = {}
    if "val" not in present:
        keys = ["_y", *[f"_b{k}" for k in range(attributes)]]
        present["val"], per_group = balanced_sample(present["train"], keys, val_fraction, seed)
        present["train"] = present["train"].drop(present["val"].index)
        derived["val"] = (f"group-balanced sample of train: floor({val_fraction} x smallest group) = {per_group} "
                          "rows per (target, bias) group, removed from train")
    if max_samples is not None and max_samples < len(present["train"]):
        present["train"] = present["train"].sample(max_samples, random_state=seed).sort_index()
    if "search" not in present:
        derived["search"] = "train (the same rows)"
    empty = [name for name, frame in present.items() if frame.empty]
    if empty:   # a safety net: every split above has rows by construction
        raise BiseError(f"the {empty[0]} split is empty")
    return present, derived


def group_counts(frame: pd.DataFrame, attributes: int, names: dict[tuple, str]) -> dict[str, int]:
    """{group name: rows of `frame` in it} for every (class, bias values) group of `names`, empty ones as 0."""
    keys = zip(frame["_y"], *[frame[f"_b{k}"] for k in range(attributes)], strict=True)
    counts = pd.Series([tuple(map(int, key)) for key in keys], dtype=object).value_counts()
    return {name: int(counts.get(group, 0)) for group, name in names.items()}


def check_not_all_skipped(rows: pd.DataFrame, bad: list[int], files: list[Path]) -> None:
    """A split of the manifest whose every image was skipped as unreadable: say so (rather than "no test rows")."""
    dropped = rows.loc[bad, "_split"]
    for name in SPLITS:
        count = int((rows["_split"] == name).sum())
        if count and int((dropped == name).sum()) == count:
            example = files[int(dropped.index[dropped == name][0])]
            raise BiseError(f"every {name} image of the manifest ({count}) is unreadable and was skipped "
                            f"(dataset.skip_unreadable=true), e.g. {example}; fix those files")


def derive_splits(rows: pd.DataFrame, target: str, classes: list, attributes: list[str], tables: dict,
            val_fraction: float, seed: int, max_samples: int | None):
    """(split frames, derived, the rows used): train and test present, every group in train, then the splits."""
    require_splits(rows)
    check_train_groups(rows[rows["_split"] == "train"], target, classes, attributes, tables)
    frames, derived = make_splits(rows, len(attributes), val_fraction, seed, max_samples)
    return frames, derived, rows
