"""CelebA, target Blond_Hair, bias Male flipped (b = 1 female), BISE's second ResNet-18 benchmark.

Splits (BISE datasets_and_loaders, mirroring EIDOSLAB's train_celeba.py; see docs benchmarks.md §3.3):
- `val`: from the official partition 0, m = floor(0.2 x the smallest (Blond_Hair, Male) group) images per group,
  drawn with pandas `.sample(m, random_state=seed)`; group-balanced, so its accuracy is the average group accuracy;
- `train`: partition 0 minus `val` (file order kept); `search` is the same Split object;
- `test`: a balanced set from the official partition 1 (validation), m' = its smallest group, per group
  `.sample(m', random_state=seed)`; `test_conflicting`: its conflicting half (Blond_Hair != flipped Male), an
  extra split name beside the four standard ones. The official test partition 2 is never used.
Aligned = blond women and dark-haired men. Images are squashed to `image_size` x `image_size` (224 in the paper)
once into a uint8 memory-mapped cache; `encode` applies ImageNet normalisation, `augment` a horizontal flip.
BISE also flips its validation images (a transform quirk); here evaluation is never augmented.

Layouts read from `dataset.root` (or `<root>/celeba`, `<root>/CelebA`):
- torchvision: `list_attr_celeba.txt` (count line, names line, rows), `list_eval_partition.txt`, `img_align_celeba/`;
- Kaggle: `list_attr_celeba.csv` (comma, `image_id`), `list_eval_partition.csv` (`image_id`, `partition`),
  images in `img_align_celeba/img_align_celeba/`;
- EIDOSLAB: `list_attr_celeba.csv` (single spaces, `image`), `list_eval_partition.csv` (comma, `split`; matched by
  row order), `img_align_celeba/`.
`source=download` uses torchvision's CelebA download (needs internet and a Google Drive quota).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.data.augment import hflip
from bise_cli.data.base import DatasetBundle, Split, normalize_uint8
from bise_cli.data.image_cache import cached_memmap, digest
from bise_cli.data.registry import spec

DATASET = spec("celeba")
SOURCES = ("files", "download")
TARGET, BIAS = "Blond_Hair", "Male"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CACHE_VERSION = 1


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> ToTensor + Normalize(ImageNet mean, std)."""
    return normalize_uint8(x, MEAN, STD)


def preprocessing(image_size: int = 224) -> dict:
    """What the image cache and `encode` do, for exported models: a bilinear squash to image_size x image_size,
    then input = (uint8 RGB * scale - mean) / std, channels first."""
    return {"kind": "image", "size": [3, image_size, image_size], "scale": 1 / 255,
            "mean": [round(v, 6) for v in MEAN.flatten().tolist()],
            "std": [round(v, 6) for v in STD.flatten().tolist()],
            "resize": [image_size, image_size], "interpolation": "bilinear",
            "class_names": [f"not {TARGET}", TARGET]}


# ------------------------------------------------------------------------------------------- layouts

def _read_table(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise BiseError(f"cannot read {path} ({str(error).splitlines()[0] if str(error) else error})") from None


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().strip()


def find_layout(root: Path) -> tuple[str, Path]:
    """(layout name, folder holding the annotation files), or a one-line BiseError."""
    if not root.exists():
        raise BiseError(f"dataset.root {str(root)!r} does not exist")
    for base in (root, root / "celeba", root / "CelebA"):
        if (base / "list_attr_celeba.txt").is_file():
            return "torchvision", base
        if (base / "list_attr_celeba.csv").is_file():
            header = _first_line(base / "list_attr_celeba.csv")
            if header.startswith("image_id,"):
                return "kaggle", base
            if header.split(" ")[0] == "image":
                return "eidos", base
            raise BiseError(f"{base / 'list_attr_celeba.csv'}: unknown header {header[:40]!r} (expected Kaggle's "
                            "'image_id,...' or EIDOSLAB's space-separated 'image ...')")
    raise BiseError(f"no CelebA annotations in {root}: expected list_attr_celeba.txt (torchvision) or "
                    "list_attr_celeba.csv (Kaggle / EIDOSLAB) there or in celeba/")


def _need(path: Path) -> Path:
    if not path.exists():
        raise BiseError(f"missing {path} (CelebA layout)")
    return path


def read_tables(root: str | Path) -> tuple[pd.DataFrame, Path, str, Path]:
    """(table with columns image, partition, Blond_Hair, Male as 0/1; image folder; layout; annotation folder)."""
    layout, base = find_layout(Path(root))
    if layout == "torchvision":
        attr_path = base / "list_attr_celeba.txt"
        with open(attr_path, encoding="utf-8") as handle:
            handle.readline()
            names = handle.readline().split()
        attrs = _read_table(attr_path, sep=r"\s+", skiprows=2, header=None, names=["image", *names])
        parts = _read_table(_need(base / "list_eval_partition.txt"), sep=r"\s+", header=None,
                            names=["image", "partition"])
        images = base / "img_align_celeba"
    elif layout == "kaggle":
        attrs = _read_table(base / "list_attr_celeba.csv").rename(columns={"image_id": "image"})
        parts = _read_table(_need(base / "list_eval_partition.csv")).rename(columns={"image_id": "image"})
        images = base / "img_align_celeba" / "img_align_celeba"
    else:
        attrs = _read_table(base / "list_attr_celeba.csv", sep=" ")
        parts = _read_table(_need(base / "list_eval_partition.csv"))
        if "split" not in parts.columns:
            raise BiseError(f"{base / 'list_eval_partition.csv'} has no 'split' column (EIDOSLAB layout)")
        if len(parts) != len(attrs):
            raise BiseError(f"{base}: list_eval_partition.csv has {len(parts)} rows, list_attr_celeba.csv "
                            f"{len(attrs)} (EIDOSLAB matches them by row order)")
        parts = pd.DataFrame({"image": attrs["image"].to_numpy(), "partition": parts["split"].to_numpy()})
        images = base / "img_align_celeba"
    for column in ("image", TARGET, BIAS):
        if column not in attrs.columns:
            raise BiseError(f"CelebA attribute table in {base} has no {column!r} column ({layout} layout)")
    if "partition" not in parts.columns or "image" not in parts.columns:
        raise BiseError(f"CelebA partition file in {base} needs image and partition columns ({layout} layout)")
    table = attrs[["image", TARGET, BIAS]].merge(parts[["image", "partition"]], on="image", how="left")
    if table["partition"].isna().any():
        missing = table.loc[table["partition"].isna(), "image"].iloc[0]
        raise BiseError(f"image {missing} has no entry in the CelebA partition file ({layout} layout)")
    for column in (TARGET, BIAS):
        values = set(pd.unique(table[column]))
        if not values <= {-1, 1}:
            raise BiseError(f"CelebA column {column} must hold -1/1, found {sorted(map(str, values))[:5]}")
        table[column] = (table[column] == 1).astype(np.int64)
    table["partition"] = table["partition"].astype(np.int64)
    if not set(pd.unique(table["partition"])) <= {0, 1, 2}:
        raise BiseError("CelebA partition values must be 0, 1 or 2")
    return table, _need(images), layout, base


# ------------------------------------------------------------------------------------------- splits

def group_sample(frame: pd.DataFrame, per_group: int, seed: int) -> pd.DataFrame:
    """`per_group` rows of each (Blond_Hair, Male) group, pandas .sample(random_state=seed) within each group."""
    parts = [frame[(frame[TARGET] == y) & (frame[BIAS] == m)].sample(per_group, random_state=seed)
             for y in (0, 1) for m in (0, 1)]
    return pd.concat(parts)


def make_splits(table: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """BISE's val / train / test / test_conflicting tables (module docstring), b = 1 - Male."""
    train_all = table[table["partition"] == 0]
    official_val = table[table["partition"] == 1]
    counts = train_all.groupby([TARGET, BIAS]).size().reindex(pd.MultiIndex.from_product([(0, 1), (0, 1)]),
                                                                  fill_value=0)
    test_counts = official_val.groupby([TARGET, BIAS]).size().reindex(counts.index, fill_value=0)
    if counts.min() < 5 or test_counts.min() < 1:
        raise BiseError(f"CelebA needs every (Blond_Hair, Male) group in partitions 0 and 1; counts "
                        f"{counts.to_dict()} / {test_counts.to_dict()}")
    val = group_sample(train_all, int(np.floor(0.2 * counts.min())), seed)
    train = train_all[~train_all["image"].isin(set(val["image"]))]
    test = group_sample(official_val, int(test_counts.min()), seed)
    conflicting = test[test[TARGET] != 1 - test[BIAS]]
    return {"train": train, "val": val, "test": test, "test_conflicting": conflicting}


# ------------------------------------------------------------------------------------------- images

def _load_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(image).transpose(2, 0, 1)
    except OSError as error:
        raise BiseError(f"cannot decode CelebA image {path} ({error})") from None


def image_cache(names: list[str], folder: Path, size: int, layout_key: str, cache_dir,
                workers: int | None = None) -> np.ndarray:
    """uint8 (N, 3, size, size) memmap of `names` (in order), decoded and squashed once."""
    paths = [folder / name for name in names]
    listing = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise BiseError(f"missing CelebA image {path}") from None
        listing.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = digest({"kind": "celeba", "version": CACHE_VERSION, "size": size, "layout": layout_key,
                  "listing": listing.hexdigest()})
    workers = workers or min(16, os.cpu_count() or 1)

    def fill(start: int, stop: int) -> np.ndarray:
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(lambda p: _load_image(p, size), paths[start:stop])))

    array, _ = cached_memmap(cache_dir, f"celeba{size}", key, (len(paths), 3, size, size), fill,
                             description=f"decoding CelebA at {size} px")
    return array


def _split(frame: pd.DataFrame, rows: dict[str, int], images: np.ndarray) -> Split:
    index = np.array([rows[name] for name in frame["image"]], dtype=np.int64)
    order = np.argsort(index, kind="stable")        # gather in file order (sequential reads), then restore
    x = np.empty((len(index), *images.shape[1:]), dtype=np.uint8)
    x[order] = images[index[order]]
    y = torch.from_numpy(frame[TARGET].to_numpy(np.int64, copy=True))
    b = torch.from_numpy(1 - frame[BIAS].to_numpy(np.int64, copy=True))     # flipped Male: 1 = female
    return Split(torch.from_numpy(x), y, b, encode, augment=hflip)


def build(source: str, root: str | Path, seed: int, max_samples: int | None = None, *, image_size: int = 224,
          cache_dir: str | None = None, workers: int | None = None) -> DatasetBundle:
    """CelebA Blond_Hair / Male (module docstring). `max_samples` caps the training split (a seeded subset)."""
    check_choice("dataset.source", source, SOURCES)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 1024:
        raise BiseError(f"dataset.image_size must be an integer in 8..1024, got {image_size!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 20):
        raise BiseError(f"dataset.max_samples must be an integer >= 20 (or null for all), got {max_samples!r}")
    if source == "download":   # never called in tests: needs internet
        from torchvision.datasets import CelebA
        CelebA(str(root), split="all", target_type="attr", download=True)
    table, folder, layout, base = read_tables(root)
    frames = make_splits(table, seed)
    if max_samples is not None and max_samples < len(frames["train"]):
        frames["train"] = frames["train"].sample(max_samples, random_state=seed).sort_index()
    needed = pd.concat([frames["train"], frames["val"], frames["test"]])["image"]
    names = sorted(set(needed))     # a capped run caches only the images it needs
    if max_samples is None:
        names = list(table.loc[table["partition"] < 2, "image"])   # the whole cache: shared by every seed
    rows = {name: i for i, name in enumerate(names)}
    tables_sha = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()
    images = image_cache(names, folder, image_size, f"{layout}:{tables_sha}", cache_dir, workers)
    splits = {name: _split(frame, rows, images) for name, frame in frames.items()}
    splits["search"] = splits["train"]
    info = {"source": source, "layout": layout, "location": str(base), "image_size": image_size,
            "sizes": {name: len(split) for name, split in splits.items()},
            "groups": {name: {f"y{y}_b{b}": int(((s.y == y) & (s.b == b)).sum()) for y in (0, 1) for b in (0, 1)}
                       for name, s in splits.items() if name != "search"},
            "val_per_group": len(frames["val"]) // 4, "test_per_group": len(frames["test"]) // 4,
            "preprocessing": preprocessing(image_size)}
    return DatasetBundle(DATASET.name, splits, DATASET.num_classes, 2, info, bias_names=DATASET.bias_names,
                         nominal_rho=None)
