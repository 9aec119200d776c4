"""The user's own data: a manifest table (CSV, TSV or Parquet) of images or texts with a target and bias columns.

One row per sample. Columns (names configurable): the input (`path` to an image, relative paths resolved against
the manifest's folder, or `text`), the `target`, one or more bias columns, and optionally `split` (train / search /
val / test, or numbers mapped through `split_codes`).

Splits: `test` must be in the manifest (it is never derived). Missing ones are derived and recorded in
`info["derived"]`: search = train (the same object, as BISE searches on its training data); val = a
group-balanced sample of train, floor(val_fraction x the smallest (target, bias...) group of train) rows of every
group, drawn with pandas `.sample(random_state=seed)` and removed from train (the CelebA protocol; val_fraction
0.2 by default). `max_samples` then caps train (a seeded subset, file order kept).

Values. The input, target and bias columns are read as text and mapped exactly: "01" and "1" are two classes or
bias values, and "NA" or "None" are values like any other. Only empty cells are missing (an error in these
columns), plus the cell texts listed in `missing_values`.

Codes and alignment. Classes are the target's distinct values, sorted (numbers by value, then text; y = the index
in `class_names`). Every bias value gets an integer code, and a sample is bias-aligned on attribute k when its code
equals y (the pipeline's convention), so a code says which class a bias value is aligned with:
1. `bias_alignment` {bias value: class value} pins a value to that class's index (one value per class at most);
2. without it, a bias value equal to a class value is pinned to that class (bias and target share a vocabulary);
3. the remaining values take the smallest free codes in sorted order (the i-th free value is aligned with the
   class of that index, or with none when the code is >= the number of classes).
`num_bias` = 1 + the largest code over all attributes: the number of values of the attribute with the most values,
or more when a value is pinned to a later class. Attributes may differ in how many values they take (the others
simply leave the top codes unused). `info` records `class_names`, `bias_values`, `bias_codes` and the resulting
`bias_alignment` {value: class} of every attribute.

Images are converted to RGB (16-bit grey images scaled from 0..65535 to 0..255; 32-bit and float pixels, which
have no fixed range, refused as not decoding) and decoded once into a uint8 memory-mapped cache
(`image_cache.cached_memmap`, verified by checksum on every load) keyed by the SHA-256 of every file's bytes, so a
changed file rebuilds it and a moved folder reuses it (each build reads the files once to hash them, far cheaper
than decoding); `image_size` squashes every image to a square (bilinear), otherwise all images must share one size.
Files that cannot be opened (missing, not an image, broken) stop the build, or are dropped with a warning under
`skip_unreadable` (a split all of whose images are dropped is an error saying so); files whose pixels fail to
decode are remembered by content hash (`undecodable-images.json` in the cache folder) so every later build treats
them the same. Texts are tokenised once with the token cache (`tokenize.tokenize_texts`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.files import write_text
from bise_cli.core.progress import progress_bar
from bise_cli.data.augment import crop_flip, hflip
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.image_cache import DEFAULT_CACHE_DIR, cached_memmap, digest
from bise_cli.data.tokenize import OFFLINE_MODEL, tokenize_texts

log = logging.getLogger(__name__)

SOURCES = ("files",)
SPLITS = ("train", "search", "val", "test")
FORMATS = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}   # suffix -> CSV separator (None: Parquet)
NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "none": ((0.0,) * 3, (1.0,) * 3)}
AUGMENTATIONS = {"none": None, "hflip": hflip, "crop_flip": crop_flip}
MAX_LISTED = 5          # unreadable files named in one error line
CACHE_VERSION = 2      # 2: 16-bit images scaled, not clipped
UNDECODABLE = "undecodable-images.json"
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")   # PIL's modes of 16-bit unsigned grey pixels


class Normalize:
    """uint8 (B, 3, H, W) -> float / 255, then (x - mean) / std per channel (a class, not a closure: picklable)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics follow the batch (a split moved to the GPU encodes there) without blocking the host.
        return (x.float().div_(255.0) - self.mean.to(x.device, non_blocking=True)) / self.std.to(x.device,
                                                                                                 non_blocking=True)


# ------------------------------------------------------------------------------------------- the manifest

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


# ------------------------------------------------------------------------------------------- splits

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


# ------------------------------------------------------------------------------------------- images

def _scan(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(sha256 of the bytes, (width, height), None) or (None, None, why the file cannot be opened)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, None, error.strerror or type(error).__name__
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()   # checks the structure (PNG CRCs) without decoding the pixels
    except Exception as error:  # PIL signals a bad file with OSError, SyntaxError, struct.error, ... alike
        return None, None, str(error).splitlines()[0] if str(error) else type(error).__name__
    return hashlib.sha256(data).hexdigest(), size, None


def scan_images(paths: list[Path], workers: int) -> list[tuple]:
    """`_scan` of every path, in parallel threads (reading files releases the GIL), with a progress bar."""
    chunk, results = 1024, []
    with ThreadPoolExecutor(workers) as pool, progress_bar("checking images", 1, math.ceil(len(paths) / chunk)) as bar:
        for start in range(0, len(paths), chunk):
            results += pool.map(_scan, paths[start:start + chunk])
            bar.advance_batch()
        bar.advance_epoch(f"{len(paths)} files")
    return results


def _undecodable_path(cache_dir) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / UNDECODABLE


def read_undecodable(cache_dir) -> dict[str, str]:
    """{sha256 of a file's bytes: decoder error} of files that opened but whose pixels did not decode."""
    path = _undecodable_path(cache_dir)
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_undecodable(cache_dir, found: dict[str, str]) -> None:
    """Add `found` to the memo (read again first: a parallel run may have added entries), written atomically."""
    merged = {**read_undecodable(cache_dir), **found}
    write_text(_undecodable_path(cache_dir), json.dumps(merged, indent=0, sort_keys=True))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit grey images (`I;16*`, e.g. 16-bit PNGs) are scaled from 0..65535 to 0..255
    (PIL's own conversion would clip every value above 255 to white); 32-bit integer and float pixels (`I`, `F`)
    have no fixed range and are refused (ValueError: the file is reported as not decoding)."""
    if image.mode in SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (mode "
                         f"{image.mode}) have no fixed range; convert the image to 8- or 16-bit")
    return image.convert("RGB")


def _decode(path: Path, size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        image = to_rgb(image)
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)


def image_array(paths: list[Path], shas: list[str], shape: tuple[int, int], size: int | None, cache_dir,
                workers: int) -> tuple[np.ndarray, bool, dict[str, str]]:
    """(uint8 (N, 3, H, W) memmap of `paths` in order, cache hit, {sha: error} of files that failed to decode).

    Keyed by the file contents and the output size only. A file that fails to decode becomes a zero image and is
    added to the undecodable memo before its chunk counts as done, so an interrupted fill resumes consistently."""
    key = digest({"kind": "table-images", "version": CACHE_VERSION, "shape": list(shape), "resize": size,
                  "files": hashlib.sha256("\n".join(shas).encode()).hexdigest()})
    failed: dict[str, str] = {}

    def one(index: int) -> np.ndarray:
        try:
            return _decode(paths[index], size)
        except Exception as error:  # any decoder failure (truncated data, bad marker): remembered, not fatal here
            failed[shas[index]] = str(error).splitlines()[0] if str(error) else type(error).__name__
            return np.zeros((3, *shape), np.uint8)

    def fill(start: int, stop: int) -> np.ndarray:
        before = len(failed)
        with ThreadPoolExecutor(workers) as pool:
            block = np.stack(list(pool.map(one, range(start, stop))))
        if len(failed) > before:
            _remember_undecodable(cache_dir, failed)
        return block

    kind = f"table{shape[0]}x{shape[1]}"
    array, hit = cached_memmap(cache_dir, kind, key, (len(paths), 3, *shape), fill,
                               description=f"decoding {len(paths)} images at {shape[0]}x{shape[1]}")
    return array, hit, failed


def _unreadable_error(paths: list[str], reasons: list[str]) -> BiseError:
    shown = "; ".join(f"{p} ({r})" for p, r in zip(paths[:MAX_LISTED], reasons[:MAX_LISTED], strict=False))
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return BiseError(f"{len(paths)} unreadable image(s): {shown}{more}; fix or remove them, or set "
                     "dataset.skip_unreadable=true to drop them")


def _image_shape(sizes: list[tuple[int, int]], names: list[str], image_size: int | None) -> tuple[int, int]:
    """(H, W) of the cached images: image_size squared, else the one size every image has."""
    if image_size is not None:
        return image_size, image_size
    first = sizes[0]
    other = next((i for i, s in enumerate(sizes) if s != first), None)
    if other is not None:
        raise BiseError(f"images differ in size ({first[0]}x{first[1]} in {names[0]}, {sizes[other][0]}x"
                        f"{sizes[other][1]} in {names[other]}); set dataset.image_size=N to squash all to N x N")
    return first[1], first[0]


def _gather(array: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """Rows `index` of a (memory-mapped) array, read in ascending order (sequential on disk), then reordered."""
    order = np.argsort(index, kind="stable")
    out = np.empty((len(index), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[index[order]]
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------- build

def _check_options(source, manifest, bias_columns, val_fraction, image_size, normalize, augment, max_length,
                   skip_unreadable, workers, max_samples) -> list[str]:
    check_choice("dataset.source", source, SOURCES)
    check_choice("dataset.normalize", normalize, NORMALIZATIONS)
    check_choice("dataset.augment", augment, AUGMENTATIONS)
    if not isinstance(manifest, (str, Path)) or not str(manifest):
        raise BiseError(f"dataset.manifest must be the path of a CSV or Parquet file, got {manifest!r}")
    if isinstance(bias_columns, str):
        bias_columns = [bias_columns]
    if not isinstance(bias_columns, (list, tuple)) or not bias_columns:
        raise BiseError(f"dataset.bias_columns is required: a list of one or more column names, e.g. "
                        f"dataset.bias_columns=[place] (got {bias_columns!r})")
    if len(set(bias_columns)) < len(bias_columns):
        raise BiseError(f"dataset.bias_columns lists a column twice: {list(bias_columns)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise BiseError(f"dataset.val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 8 <= image_size <= 4096):
        raise BiseError(f"dataset.image_size must be an integer in 8..4096 or null (keep the size), got {image_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise BiseError(f"dataset.max_length must be an integer >= 8 tokens, got {max_length!r}")
    if not isinstance(skip_unreadable, bool):
        raise BiseError(f"dataset.skip_unreadable must be true or false, got {skip_unreadable!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise BiseError(f"dataset.workers must be an integer >= 1 or null, got {workers!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise BiseError(f"dataset.max_samples must be an integer >= 1 or null, got {max_samples!r}")
    return [str(c) for c in bias_columns]


def _group_counts(frame: pd.DataFrame, attributes: int, names: dict[tuple, str]) -> dict[str, int]:
    keys = zip(frame["_y"], *[frame[f"_b{k}"] for k in range(attributes)], strict=True)
    counts = pd.Series([tuple(map(int, key)) for key in keys], dtype=object).value_counts()
    return {name: int(counts.get(group, 0)) for group, name in names.items()}


def _read_rows(path: Path, input_column, target_column, attributes, split_column, split_codes, bias_alignment,
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


def build(source: str, root: str | Path | None, seed: int, max_samples: int | None = None, *, manifest=None,
          input_column: str = "auto", target_column: str = "target", bias_columns=None, split_column: str = "split",
          split_codes=None, bias_alignment=None, val_fraction: float = 0.2, image_size: int | None = None,
          normalize: str = "imagenet", augment: str = "none", tokenizer: str = OFFLINE_MODEL, max_length: int = 128,
          skip_unreadable: bool = False, workers: int | None = None, cache_dir: str | None = None,
          missing_values=(), name: str = "table") -> DatasetBundle:
    """The manifest `manifest` as a DatasetBundle (module docstring); `root` is unused (it only defaults the
    manifest path in the config), `name` names the bundle (presets such as waterbirds pass their own)."""
    attributes = _check_options(source, manifest, bias_columns, val_fraction, image_size, normalize, augment,
                                max_length, skip_unreadable, workers, max_samples)
    if missing_values is None:
        missing_values = ()
    if not isinstance(missing_values, (list, tuple)) or not all(
            isinstance(m, (str, int, float)) and not isinstance(m, bool) and str(m) for m in missing_values):
        raise BiseError("dataset.missing_values must be a list of cell texts read as missing, e.g. [NA, None] "
                        f"(empty cells always are), got {missing_values!r}")
    path = Path(manifest).expanduser()
    frame, column, kind, rows, classes, tables = _read_rows(path, input_column, target_column, attributes,
                                                            split_column, split_codes, bias_alignment,
                                                            missing_values)
    if kind == "text" and augment != "none":
        raise BiseError(f"dataset.augment={augment} applies to images; column {column!r} holds texts (use none)")
    workers = workers or min(16, os.cpu_count() or 1)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    info: dict = {"source": "files", "location": str(path), "manifest": str(path),
                  "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "input_column": column,
                  "input_kind": kind, "target_column": target_column, "bias_columns": attributes,
                  "split_column": split_column, "val_fraction": val_fraction, "max_samples": max_samples}
    if kind == "image":
        files = [Path(p).expanduser() for p in frame[column].astype(str)]
        files = [f if f.is_absolute() else path.parent / f for f in files]   # relative to the manifest's folder
        images = _ImageRows(files, scan_images(files, workers), image_size, cache_dir, workers)
        # A file whose pixels fail to decode is found only while filling the cache; it is then in the memo, and
        # the second pass drops it before the splits are drawn, exactly as every later build will.
        for _ in range(2):
            bad = images.unreadable(skip_unreadable)
            _check_not_all_skipped(rows, bad, files)
            frames, derived, usable = _splits(rows.drop(index=bad), target_column, classes, attributes, tables,
                                              val_fraction, seed, max_samples)
            if images.load(frames, max_samples, skip_unreadable):
                break
        else:
            raise BiseError(f"images kept failing to decode; check that {cache_dir} is writable (the memo "
                            f"{UNDECODABLE} there records them)")
        if bad:
            log.warning("skipped %d unreadable image(s) (dataset.skip_unreadable=true), e.g. %s", len(bad),
                        files[bad[0]])
            info["skipped_unreadable"] = {"count": len(bad), "examples": [str(files[i]) for i in bad[:MAX_LISTED]]}
        mean, std = NORMALIZATIONS[normalize]
        encode, augmentation, gather = Normalize(mean, std), AUGMENTATIONS[augment], images.gather
        # The same description the built-in image datasets give (export writes it beside the model): `resize` is
        # the squashed [H, W], or None when the images keep their size.
        info["preprocessing"] = {"kind": "image", "size": [3, *images.shape], "scale": 1 / 255, "mean": list(mean),
                                 "std": list(std), "resize": list(images.shape) if image_size is not None else None,
                                 "interpolation": "bilinear", "class_names": [str(c) for c in classes]}
        info.update({"image_size": image_size, "augment": augment, "image_cache_hit": images.hit})
    else:
        frames, derived, usable = _splits(rows, target_column, classes, attributes, tables, val_fraction, seed,
                                          max_samples)
        needed = np.unique(np.concatenate([f.index.to_numpy() for f in frames.values()]))
        texts = frame[column].astype(str).iloc[needed].tolist()
        tokens, seconds = tokenize_texts(texts, tokenizer, max_length, Path(cache_dir) / "tokens", "table")
        position = pd.Series(np.arange(len(needed)), index=needed)

        def gather(rows_index: pd.Index) -> torch.Tensor:
            return tokens[torch.from_numpy(position[rows_index].to_numpy(np.int64, copy=True))]

        encode, augmentation = None, None
        info["preprocessing"] = {"kind": "text", "tokenizer": tokenizer, "max_length": max_length,
                                 "class_names": [str(c) for c in classes]}
        info["tokenize_seconds"] = round(seconds, 3)

    splits = {}
    bias_keys = [f"_b{k}" for k in range(len(attributes))]
    for split_name, part in frames.items():
        b = torch.from_numpy(part[bias_keys].to_numpy(np.int64, copy=True))
        splits[split_name] = Split(gather(part.index), torch.from_numpy(part["_y"].to_numpy(np.int64, copy=True)),
                                   b[:, 0] if len(attributes) == 1 else b, augment=augmentation,
                                   **({"encode": encode} if encode is not None else {}))
    splits.setdefault("search", splits["train"])
    num_bias = 1 + max(max(table.values()) for table in tables.values())
    names = group_names(target_column, classes, attributes, tables)
    info.update({
        "class_names": classes, "num_bias": num_bias,
        "bias_values": {a: list(tables[a]) for a in attributes},
        "bias_codes": {a: {str(v): c for v, c in tables[a].items()} for a in attributes},
        "bias_alignment": {a: {str(v): classes[c] for v, c in tables[a].items() if c < len(classes)}
                           for a in attributes},
        "splits_in_manifest": sorted(set(usable["_split"]), key=SPLITS.index), "derived": derived,
        "sizes": {n: len(s) for n, s in splits.items()},
        "groups": {n: _group_counts(f, len(attributes), names) for n, f in frames.items()},
    })
    return DatasetBundle(name, splits, num_classes=len(classes), num_bias=num_bias, info=info,
                         bias_names=tuple(attributes), nominal_rho=None)


def _check_not_all_skipped(rows: pd.DataFrame, bad: list[int], files: list[Path]) -> None:
    """A split of the manifest whose every image was skipped as unreadable: say so (rather than "no test rows")."""
    dropped = rows.loc[bad, "_split"]
    for name in SPLITS:
        count = int((rows["_split"] == name).sum())
        if count and int((dropped == name).sum()) == count:
            example = files[int(dropped.index[dropped == name][0])]
            raise BiseError(f"every {name} image of the manifest ({count}) is unreadable and was skipped "
                            f"(dataset.skip_unreadable=true), e.g. {example}; fix those files")


def _splits(rows: pd.DataFrame, target: str, classes: list, attributes: list[str], tables: dict,
            val_fraction: float, seed: int, max_samples: int | None):
    """(split frames, derived, the rows used): train and test present, every group in train, then the splits."""
    require_splits(rows)
    check_train_groups(rows[rows["_split"] == "train"], target, classes, attributes, tables)
    frames, derived = make_splits(rows, len(attributes), val_fraction, seed, max_samples)
    return frames, derived, rows


class _ImageRows:
    """The manifest's image files: their scan, which ones are unreadable, and the uint8 cache of the used ones."""

    def __init__(self, files: list[Path], scans: list[tuple], image_size: int | None, cache_dir, workers: int):
        self.files, self.scans, self.image_size = files, scans, image_size
        self.cache_dir, self.workers = cache_dir, workers
        self.array, self.position, self.shape, self.hit = None, None, None, False

    def unreadable(self, skip: bool) -> list[int]:
        """Rows whose file cannot be opened or is known not to decode; a BiseError listing them unless `skip`."""
        known = read_undecodable(self.cache_dir)
        reasons = [error or (f"does not decode: {known[sha]}" if sha in known else None)
                   for sha, _, error in self.scans]
        bad = [i for i, reason in enumerate(reasons) if reason]
        if bad and not skip:
            raise _unreadable_error([str(self.files[i]) for i in bad], [reasons[i] for i in bad])
        return bad

    def load(self, frames: dict[str, pd.DataFrame], max_samples: int | None, skip: bool) -> bool:
        """Decode (or map) the cache; False when files failed to decode just now and were skipped (draw the splits
        again), a BiseError naming them unless `skip`."""
        needed = np.unique(np.concatenate([f.index.to_numpy() for f in frames.values()]))
        # Uncapped, the cache holds every file that opens (undecodable ones as zero images), so its key does not
        # depend on which rows a build drops; a capped run caches only the rows it uses.
        if max_samples is None:
            cached = np.array([i for i, scan in enumerate(self.scans) if scan[0]], np.int64)
        else:
            cached = needed
        self.shape = _image_shape([self.scans[i][1] for i in cached], [self.files[i].name for i in cached],
                                  self.image_size)
        self.array, self.hit, failed = image_array([self.files[i] for i in cached], [self.scans[i][0] for i in cached],
                                                   self.shape, self.image_size, self.cache_dir, self.workers)
        self.position = pd.Series(np.arange(len(cached)), index=cached)
        broken = [i for i in needed if self.scans[i][0] in failed]
        if broken and not skip:
            raise _unreadable_error([str(self.files[i]) for i in broken],
                                    [f"does not decode: {failed[self.scans[i][0]]}" for i in broken])
        return not broken

    def gather(self, rows: pd.Index) -> torch.Tensor:
        """The cached images of manifest rows `rows`, in that order."""
        return _gather(self.array, self.position[rows].to_numpy(np.int64, copy=True))
