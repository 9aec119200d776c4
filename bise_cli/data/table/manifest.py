"""Reading a manifest and encoding its columns: the input column and its kind, the target's classes, the bias
codes (the alignment rules of `bise_cli.data.table`) and each row's split.

Cells are read as text and mapped exactly; only empty cells (and the `missing_values` markers) are missing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bise_cli.core.errors import BiseError

SPLITS = ("train", "search", "val", "test")
FORMATS = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}   # suffix -> CSV separator (None: Parquet)


def _order(value: str) -> tuple:
    """Sort key of a label: values that read as finite numbers first, by number (so "2" < "10"; "01" and "1" stay
    two values, "01" first), then the others as text."""
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    return (0, number, value) if math.isfinite(number) else (1, 0.0, value)


def _sorted_values(series: pd.Series) -> list[str]:
    """The distinct values of a label column (text, see `read_manifest`), sorted by `_order`."""
    return sorted((str(v) for v in pd.unique(series)), key=_order)


def _listing(values, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _as_text(column: pd.Series) -> pd.Series:
    """A Parquet column's values as text, missing cells kept missing; whole-number floats are written as integers
    (a number column with gaps is stored as floats)."""
    values = column.dropna()
    if column.dtype.kind == "f" and values.map(float.is_integer).all():
        column = column.astype("Int64")
    return column.map(lambda v: v if pd.isna(v) else str(v), na_action="ignore").astype(object)


def read_manifest(path: str | Path, text_columns=(), missing=()) -> pd.DataFrame:
    """The manifest as a DataFrame (format by suffix: .csv, .tsv, .parquet/.pq), or a one-line BiseError.

    `text_columns` (those present) are read as text, never as numbers, so "01" and "1" stay two values. Only
    empty cells are missing, plus cells equal to one of the `missing` markers; "NA" or "None" are values."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise BiseError(f"manifest {str(path)!r} {what}; set dataset.manifest=PATH to a CSV or Parquet file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BiseError(f"manifest {path.name!r} has an unknown format; allowed suffixes: {', '.join(FORMATS)}")
    markers = [str(m) for m in missing]
    try:
        if FORMATS[suffix] is None:
            frame = pd.read_parquet(path)
            for column in [c for c in text_columns if c in frame.columns]:
                frame[column] = _as_text(frame[column])
            return frame.mask(frame.isin(markers)) if markers else frame
        return pd.read_csv(path, sep=FORMATS[suffix], low_memory=False, dtype={c: str for c in text_columns},
                           keep_default_na=False, na_values=["", *markers])
    except ImportError:
        raise BiseError(f"reading the Parquet manifest {path.name} needs pyarrow (pip install pyarrow)") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BiseError(f"cannot read manifest {path}: {message}") from None


def _column(frame: pd.DataFrame, name, setting: str, path: Path) -> str:
    """`name` if the manifest has that column, else a BiseError naming it and listing the columns there are."""
    if not isinstance(name, str) or name not in frame.columns:
        raise BiseError(f"{setting}={name!r}: no such column in {path.name}; columns: {_listing(frame.columns, 30)}")
    return name


def _no_blanks(frame: pd.DataFrame, column: str) -> None:
    blank = frame[column].isna().to_numpy()
    if blank.any():
        first = int(np.flatnonzero(blank)[0]) + 1
        raise BiseError(f"column {column!r} is empty in {int(blank.sum())} row(s) (the first is data row {first}); "
                        "fill or remove those rows")


def _input_column(frame: pd.DataFrame, input_column: str, path: Path) -> tuple[str, str]:
    """(column, kind): `auto` picks `path` (images) if present, else `text`; a named column is an image column
    when it is called `path` or its values end in an image suffix, else a text column."""
    if input_column == "auto":
        for name, kind in (("path", "image"), ("text", "text")):
            if name in frame.columns:
                return name, kind
        raise BiseError(f"{path.name} has neither a 'path' nor a 'text' column; name the input with "
                        f"dataset.input_column (columns: {_listing(frame.columns, 30)})")
    column = _column(frame, input_column, "dataset.input_column", path)
    values = frame[column].dropna().astype(str).str.lower()
    looks_like_images = len(values) and values.str.endswith(tuple(Image.registered_extensions())).mean() > 0.5
    return column, "image" if column == "path" or looks_like_images else "text"


def encode_target(series: pd.Series) -> tuple[np.ndarray, list]:
    """(y as int64 indices into the sorted class values, the class values)."""
    classes = _sorted_values(series)
    if len(classes) < 2:
        raise BiseError(f"target column {series.name!r} has one class ({classes[0]!r}); a classifier needs two or more")
    index = {c: i for i, c in enumerate(classes)}
    return series.map(lambda v: index[str(v)]).to_numpy(np.int64), classes


def _alignment_for(alignment, attribute: str, attributes: list[str]) -> Mapping | None:
    """The {bias value: class value} mapping of one attribute: `bias_alignment` is either one mapping for every
    attribute or {attribute: mapping}."""
    if alignment is None:
        return None
    if not isinstance(alignment, Mapping):
        raise BiseError(f"dataset.bias_alignment must be a mapping {{bias value: class value}}, got {alignment!r}")
    if alignment and all(str(k) in attributes and isinstance(v, Mapping) for k, v in alignment.items()):
        return next((v for k, v in alignment.items() if str(k) == attribute), None)
    return alignment


def bias_codes(values: list, classes: list, alignment: Mapping | None, attribute: str) -> dict:
    """{bias value: integer code} of one attribute by the three rules of the module docstring."""
    class_index = {str(c): i for i, c in enumerate(classes)}
    by_name = {str(v): v for v in values}
    pinned = {}
    if alignment is not None:
        for value, target in alignment.items():
            if str(value) not in by_name:
                raise BiseError(f"dataset.bias_alignment: {value!r} is not a value of column {attribute!r} "
                                f"(values: {_listing(values)})")
            if str(target) not in class_index:
                raise BiseError(f"dataset.bias_alignment: {attribute}={value!r} is aligned with {target!r}, which "
                                f"is not a class (classes: {_listing(classes)})")
            pinned[by_name[str(value)]] = class_index[str(target)]
    else:
        pinned = {v: class_index[str(v)] for v in values if str(v) in class_index}
    if len(set(pinned.values())) < len(pinned):
        clash = [v for v in pinned if list(pinned.values()).count(pinned[v]) > 1]
        raise BiseError(f"dataset.bias_alignment: values {_listing(clash)} of {attribute!r} are aligned with the "
                        f"same class {classes[pinned[clash[0]]]!r}; at most one value per class")
    free = (code for code in itertools.count() if code not in set(pinned.values()))
    return {v: pinned[v] if v in pinned else next(free) for v in values}


def encode_bias(frame: pd.DataFrame, columns: list[str], classes: list, alignment) -> tuple[np.ndarray, dict]:
    """(b as (N, A) int64 codes, {attribute: {value: code}})."""
    codes, tables = [], {}
    for column in columns:
        values = _sorted_values(frame[column])
        if len(values) < 2:
            raise BiseError(f"bias column {column!r} has one value ({values[0]!r}); a bias attribute needs two or "
                            "more (drop it from dataset.bias_columns)")
        table = bias_codes(values, classes, _alignment_for(alignment, column, columns), column)
        codes.append(frame[column].map(lambda v, t=table: t[str(v)]).to_numpy(np.int64))
        tables[column] = table
    return np.stack(codes, 1), tables


def assign_splits(series: pd.Series, codes) -> np.ndarray:
    """Split names per row: the values themselves (train / search / val / test) or mapped by `codes`."""
    if series.dtype.kind == "f" and series.dropna().map(float.is_integer).all():
        series = series.astype("Int64")  # 0.0 / 1.0 (a float column) should match codes 0 / 1
    text = series.astype(str).str.strip()
    if codes is not None:
        if not isinstance(codes, Mapping) or not codes:
            raise BiseError(f"dataset.split_codes must be a mapping such as {{0: train, 1: val, 2: test}}, got "
                            f"{codes!r}")
        bad = [v for v in codes.values() if v not in SPLITS]
        if bad:
            raise BiseError(f"dataset.split_codes maps to {bad[0]!r}; allowed split names: {', '.join(SPLITS)}")
        mapping = {str(k).strip(): v for k, v in codes.items()}
        unknown = sorted(set(text) - set(mapping))
        if unknown:
            raise BiseError(f"column {series.name!r} has value(s) {_listing(unknown)} missing from "
                            f"dataset.split_codes (codes: {_listing(mapping)})")
        return text.map(mapping).to_numpy(object)
    unknown = sorted(set(text) - set(SPLITS))
    if unknown:
        raise BiseError(f"column {series.name!r} has value(s) {_listing(unknown)}; allowed: {', '.join(SPLITS)} "
                        "(or map other values with dataset.split_codes, e.g. {0: train, 1: val, 2: test})")
    return text.to_numpy(object)


def read_rows(path: Path, input_column, target_column, attributes, split_column, split_codes, bias_alignment,
               missing_values):
    """(manifest, input column, input kind, per-row codes `_split`/`_y`/`_b<k>`, class values, bias code tables)."""
    inputs = ["path", "text"] if input_column == "auto" else [input_column]
    frame = read_manifest(path, [*inputs, target_column, *attributes], missing_values)
    if frame.empty:
        raise BiseError(f"manifest {path} has no rows")
    column, kind = _input_column(frame, input_column, path)
    target = _column(frame, target_column, "dataset.target_column", path)
    if target == column:
        raise BiseError(f"dataset.target_column={target!r} is also the input column (dataset.input_column="
                        f"{input_column}); the model would be given the answer: name the column to predict")
    for attribute in attributes:
        _column(frame, attribute, "dataset.bias_columns", path)
        if attribute in (column, target):
            raise BiseError(f"dataset.bias_columns: {attribute!r} is also the input or target column")
    if split_column not in frame.columns:
        if split_column != "split":
            _column(frame, split_column, "dataset.split_column", path)
        raise BiseError(f"{path.name} has no 'split' column, so no test rows (test is never derived); add a split "
                        "column (train / val / test) or name yours with dataset.split_column")
    for needed in (column, target, *attributes, split_column):
        _no_blanks(frame, needed)
    y, classes = encode_target(frame[target])
    b, tables = encode_bias(frame, attributes, classes, bias_alignment)
    rows = pd.DataFrame({"_split": assign_splits(frame[split_column], split_codes), "_y": y,
                         **{f"_b{k}": b[:, k] for k in range(len(attributes))}})
    return frame, column, kind, rows, classes, tables
