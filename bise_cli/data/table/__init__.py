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

The jobs live in the modules of this package: `manifest` (reading and encoding), `splits` (deriving the missing
splits), `images` (scan, decode, cache) and `texts` (tokenising); this module checks the options and assembles the
DatasetBundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.names import attribute_clash, per_attribute
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.image_cache import DEFAULT_CACHE_DIR
from bise_cli.data.table.images import (
    AUGMENTATIONS,
    CACHE_VERSION,
    MAX_LISTED,
    NORMALIZATIONS,
    SIXTEEN_BIT,
    UNDECODABLE,
    ImageRows,
    Normalize,
    image_array,
    read_undecodable,
    scan_images,
    to_rgb,
)
from bise_cli.data.table.manifest import (
    FORMATS,
    SPLITS,
    assign_splits,
    bias_codes,
    encode_bias,
    encode_target,
    read_manifest,
    read_rows,
)
from bise_cli.data.table.splits import (
    balanced_sample,
    check_not_all_skipped,
    check_train_groups,
    derive_splits,
    group_counts,
    group_names,
    make_splits,
    require_splits,
)
from bise_cli.data.table.texts import TextRows
from bise_cli.data.tokenize import OFFLINE_MODEL

log = logging.getLogger(__name__)
SOURCES = ("files",)


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
    for column in bias_columns:
        clash = attribute_clash(str(column))
        if clash is not None:
            raise BiseError(f"dataset.bias_columns: a bias column named {column!r} would record its leakage as "
                            f"{per_attribute('leakage', str(column))}, which reads as the metric {clash}; rename "
                            "that column in the manifest")
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
    frame, column, kind, rows, classes, tables = read_rows(path, input_column, target_column, attributes,
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
        images = ImageRows(files, scan_images(files, workers), image_size, cache_dir, workers)
        # A file whose pixels fail to decode is found only while filling the cache; it is then in the memo, and
        # the second pass drops it before the splits are drawn, exactly as every later build will.
        for _ in range(2):
            bad = images.unreadable(skip_unreadable)
            check_not_all_skipped(rows, bad, files)
            frames, derived, usable = derive_splits(rows.drop(index=bad), target_column, classes, attributes, tables,
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
        frames, derived, usable = derive_splits(rows, target_column, classes, attributes, tables, val_fraction, seed,
                                          max_samples)
        text_rows = TextRows(frame[column], frames, tokenizer, max_length, cache_dir)
        gather, seconds = text_rows.gather, text_rows.seconds
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
        "groups": {n: group_counts(f, len(attributes), names) for n, f in frames.items()},
    })
    return DatasetBundle(name, splits, num_classes=len(classes), num_bias=num_bias, info=info,
                         bias_names=tuple(attributes), nominal_rho=None)


# The dataset module's public names (what it offered as one file), each defined once in the module of its job.
__all__ = ["AUGMENTATIONS", "CACHE_VERSION", "FORMATS", "MAX_LISTED", "NORMALIZATIONS", "SIXTEEN_BIT", "SOURCES",
           "SPLITS", "UNDECODABLE", "Normalize", "assign_splits", "balanced_sample", "bias_codes", "build",
           "check_train_groups", "encode_bias", "encode_target", "group_names", "image_array", "make_splits",
           "read_manifest", "read_undecodable", "require_splits", "scan_images", "to_rgb"]
