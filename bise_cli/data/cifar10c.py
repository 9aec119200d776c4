"""Corrupted CIFAR-10 (LfF protocol, DFA-format "cifar10c" release), BISE's ResNet-18 benchmark.

The target is the CIFAR-10 class, the bias the corruption type (10 values). Splits: `train` (align + conflict),
`search` (the same Split object: BISE searches on the training set) and `test` (rho 0.1: about 10% aligned).
There is no validation split (BISE keeps the last masks); the release's per-ratio `valid` folder is not used,
as in BISE. Images are uint8 (N, 3, 32, 32); `encode` normalises with mean (0.4914, 0.4822, 0.4465) and std
(0.2023, 0.1994, 0.2010); `augment` is RandomCrop(32, padding 4) + RandomHorizontalFlip.

Sources (`dataset.source`):
- `files`: the release under `dataset.root` (or `<root>/cifar10c/`): `{0.5pct,1pct,2pct,5pct}/{align,conflict}/
  <class>/*.png` and the shared `test/<class>/*.png`; label and bias are the last two underscore fields of the
  file name (`..._<label>_<bias>.png`). rho picks the folder: 0.995 -> 0.5pct, 0.99 -> 1pct, 0.98 -> 2pct,
  0.95 -> 5pct. PNGs are decoded once and cached (keyed by names, sizes and mtimes; arrays checksummed).
- `build`: a local construction from CIFAR-10's python pickles (`cifar-10-batches-py/` in root): per class, the
  LfF quota rule assigns corruption labels in dataset order (train at rho, test at `test_rho` 0.1), and image i
  gets corruption `names[b_i]` at protocol level 5 (LfF "Severity 4" + 1), from `dataset.corruptions` (type0:
  LfF's weather/digital list; type1: noise/blur). Type0 contains Frost, which needs texture images: those of the
  PyPI package imagecorruptions (`pip install --no-deps imagecorruptions`, never imported) or a folder named by
  BISE_FROST_DIR; without them type0 fails with a one-line error. The list and severity used for the released
  tarball are not documented, so a locally built set is comparable in protocol, not pixel for pixel (see
  bise_cli.data.corruptions).
- `download`: torchvision's CIFAR-10 download into root, then `build`.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.progress import progress_bar
from bise_cli.data.augment import crop_flip
from bise_cli.data.base import DatasetBundle, Split, normalize_uint8
from bise_cli.data.corruptions import PROTOCOL_SEVERITY, check_supported, corrupt, corruption_names, find_frost_dir
from bise_cli.data.image_cache import cached_arrays, digest, file_listing_key
from bise_cli.data.multicolor_mnist import check_max_samples, check_rho, subset_index
from bise_cli.data.registry import spec

log = logging.getLogger("bise")
DATASET = spec("cifar10c")
NUM_CLASSES = DATASET.num_classes
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # CIFAR-10
SOURCES = ("files", "build", "download")
RHO_FOLDERS = {0.995: "0.5pct", 0.99: "1pct", 0.98: "2pct", 0.95: "5pct"}
TEST_RHO = 0.1
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
BUILD_VERSION = 1   # bump when the local construction changes (invalidates the build cache)
STREAMS = {"train": 1, "test": 2}


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ToTensor + Normalize(CIFAR mean, std)."""
    return normalize_uint8(x, MEAN, STD)


def preprocessing() -> dict:
    """What `encode` does, for exported models: input = (uint8 RGB * scale - mean) / std, channels first."""
    return {"kind": "image", "size": [3, 32, 32], "scale": 1 / 255,
            "mean": [round(v, 6) for v in MEAN.flatten().tolist()],
            "std": [round(v, 6) for v in STD.flatten().tolist()],
            "resize": None, "class_names": list(CLASS_NAMES)}


def rho_folder(rho: float) -> str:
    """The release folder of `rho`: 100 (1 - rho) to one decimal, a trailing '.0' dropped, + 'pct'."""
    pct = round(100 * (1 - float(rho)), 1)
    name = f"{pct:g}pct"
    if name not in RHO_FOLDERS.values():
        raise BiseError(f"Corrupted CIFAR-10 has no folder for rho={rho}; allowed rho: "
                        f"{', '.join(f'{r:g} ({f})' for r, f in RHO_FOLDERS.items())}")
    return name


def assign_corruptions(labels: np.ndarray, rho: float, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """LfF's deterministic quota rule: per class y, corruption y gets the share rho, each other (1 - rho)/9; the
    k-th class-y sample in dataset order gets the first corruption whose rounded cumulative quota exceeds k."""
    labels = np.asarray(labels, dtype=np.int64)
    eye = np.eye(num_classes)
    ratios = rho * eye + (1 - rho) / (num_classes - 1) * (1 - eye)
    quotas = (np.bincount(labels, minlength=num_classes)[:, None] * np.cumsum(ratios, axis=1)).round()
    bias = np.empty(len(labels), dtype=np.int64)
    for y in range(num_classes):
        index = np.flatnonzero(labels == y)
        bias[index] = np.minimum(np.searchsorted(quotas[y], np.arange(len(index)), side="right"), num_classes - 1)
    return bias


# ------------------------------------------------------------------------------------------ released files

def _release_folder(root: Path, pct: str) -> Path:
    for base in (root, root / "cifar10c"):
        if (base / pct).is_dir():
            return base
    if not root.exists():
        raise BiseError(f"dataset.root {str(root)!r} does not exist")
    raise BiseError(f"no Corrupted CIFAR-10 release in {root}: expected {pct}/align, {pct}/conflict and test/ "
                    f"there or under {root / 'cifar10c'}")


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BiseError(f"missing folder {folder} (Corrupted CIFAR-10 release layout: <pct>/align/<class>/*.png, "
                        "<pct>/conflict/<class>/*.png, test/<class>/*.png)")
    files = sorted(folder.glob("*/*.png"))
    if not files:
        raise BiseError(f"no PNG files in {folder}/<class>/")
    return files


def parse_name(path: Path) -> tuple[int, int]:
    """(label, bias) from `..._<label>_<bias>.png`, or a one-line BiseError naming the file."""
    fields = path.stem.split("_")
    try:
        label, bias = int(fields[-2]), int(fields[-1])
    except (IndexError, ValueError):
        raise BiseError(f"cannot read label and bias from file name {path} (expected ..._<label>_<bias>.png)") from None
    if not (0 <= label < NUM_CLASSES and 0 <= bias < NUM_CLASSES):
        raise BiseError(f"label/bias out of range 0..9 in file name {path}")
    return label, bias


def _decode(files: list[Path], description: str) -> np.ndarray:
    out = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
    with progress_bar(description, 1, len(files)) as bar:
        for i, path in enumerate(files):
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"))
            except OSError as error:
                raise BiseError(f"cannot decode {path} ({error})") from None
            if array.shape != (32, 32, 3):
                raise BiseError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected a 32x32 image")
            out[i] = array.transpose(2, 0, 1)
            bar.advance_batch()
        bar.advance_epoch(f"{len(files)} images")
    return out


def _read_files(files: list[Path], base: Path, cache_dir, what: str) -> dict[str, np.ndarray]:
    parsed = np.array([parse_name(p) for p in files], dtype=np.int64).reshape(-1, 2)   # names first: cheap errors
    key = digest({"kind": "cifar10c-files", "listing": file_listing_key(files, base)})

    def build():
        started = time.perf_counter()
        x = _decode(files, f"decoding {what}")
        log.info("decoded %d %s PNGs in %.1fs", len(files), what, time.perf_counter() - started)
        return {"x": x, "y": parsed[:, 0], "b": parsed[:, 1]}

    arrays, _ = cached_arrays(cache_dir, f"cifar10c-{what.replace('/', '-')}", key, build)
    return arrays


def load_release(root: str | Path, rho: float, cache_dir=None) -> tuple[dict, dict, dict]:
    pct = rho_folder(rho)
    base = _release_folder(Path(root), pct)
    train_files = _pngs(base / pct / "align") + _pngs(base / pct / "conflict")
    test_files = _pngs(base / "test")
    train = _read_files(train_files, base, cache_dir, f"{pct}/train")
    test = _read_files(test_files, base, cache_dir, "test")
    info = {"source": "files", "location": str(base), "folder": pct,
            "align": len(_pngs(base / pct / "align")), "conflict": len(_pngs(base / pct / "conflict")),
            "valid_folder_used": False}
    return train, test, info


# ------------------------------------------------------------------------------------------ local build

def _find_batches(root: Path) -> Path:
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file():
            return folder
    raise BiseError(f"no CIFAR-10 python batches in {root}: expected cifar-10-batches-py/data_batch_1..5 and "
                    "test_batch (or dataset.source=download)")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise BiseError(f"missing {path} (CIFAR-10 python layout: data_batch_1..5, test_batch)")
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
        raise BiseError(f"cannot read CIFAR-10 batch {path} ({error})") from None
    if len(labels) != len(data):
        raise BiseError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def read_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    folder = _find_batches(Path(root))
    train = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_batch(folder / "test_batch")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, folder)


def corrupt_split(images: np.ndarray, labels: np.ndarray, rho: float, names: tuple[str, ...], seed: int,
                  stream: str, severity: int = PROTOCOL_SEVERITY) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted uint8 (N, 3, 32, 32), corruption labels) for CHW images with the quota rule at `rho`."""
    bias = assign_corruptions(labels, rho)
    out = np.empty_like(images)
    with progress_bar(f"corrupting {stream}", 1, len(names)) as bar:
        for k, name in enumerate(names):
            index = np.flatnonzero(bias == k)
            rng = np.random.default_rng([seed, STREAMS[stream], k])
            hwc = images[index].transpose(0, 2, 3, 1)
            out[index] = corrupt(hwc, name, rng, severity).transpose(0, 3, 1, 2)
            bar.advance_batch()
        bar.advance_epoch(f"{len(images)} images")
    return out, bias


def build_local(root: str | Path, rho: float, seed: int, corruptions: str = "type1", test_rho: float = TEST_RHO,
                severity: int = PROTOCOL_SEVERITY, cache_dir=None, max_samples: int | None = None,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    names = corruption_names(corruptions)
    check_supported(corruptions)
    train_x, train_y, test_x, test_y, folder = read_cifar10(root)
    keep = subset_index(len(train_y), max_samples, seed)
    if keep is not None:
        train_x, train_y = train_x[keep.numpy()], train_y[keep.numpy()]
    batch_files = sorted(folder.glob("*_batch*"))
    # Frost reads texture images: the built pixels depend on them too, so they are part of the key.
    textures = ""
    if "Frost" in names:
        frost_dir = find_frost_dir()
        textures = file_listing_key(sorted(frost_dir.glob("frost*")), frost_dir)
    key = digest({"kind": "cifar10c-build", "version": BUILD_VERSION, "listing": file_listing_key(batch_files, folder),
                  "rho": rho, "test_rho": test_rho, "names": names, "severity": severity, "seed": seed,
                  "max_samples": max_samples, "frost_textures": textures})

    def build():
        started = time.perf_counter()
        tx, tb = corrupt_split(train_x, train_y, rho, names, seed, "train", severity)
        vx, vb = corrupt_split(test_x, test_y, test_rho, names, seed, "test", severity)
        log.info("built Corrupted CIFAR-10 (%d + %d images) in %.1fs", len(tx), len(vx), time.perf_counter() - started)
        return {"train_x": tx, "train_y": train_y, "train_b": tb, "test_x": vx, "test_y": test_y, "test_b": vb}

    arrays, _ = cached_arrays(cache_dir, "cifar10c-build", key, build)
    train = {"x": arrays["train_x"], "y": arrays["train_y"], "b": arrays["train_b"]}
    test = {"x": arrays["test_x"], "y": arrays["test_y"], "b": arrays["test_b"]}
    info = {"source": "build", "location": str(folder), "corruptions": corruptions, "corruption_names": list(names),
            "protocol_severity": severity, "test_rho": test_rho, "pixel_exact": False}
    return train, test, info


# ------------------------------------------------------------------------------------------ the bundle

def _split(arrays: dict[str, np.ndarray]) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(arrays["x"])), torch.from_numpy(arrays["y"].astype(np.int64)),
                 torch.from_numpy(arrays["b"].astype(np.int64)), encode, augment=crop_flip)


def build(source: str, root: str | Path, rho: float, seed: int, max_samples: int | None = None, *,
          corruptions: str = "type1", test_rho: float = TEST_RHO, severity: int = PROTOCOL_SEVERITY,
          cache_dir: str | None = None) -> DatasetBundle:
    """Corrupted CIFAR-10 from `source` (see the module docstring); options are checked before any file is read."""
    check_choice("dataset.source", source, SOURCES)
    rho = check_rho("rho", rho)
    test_rho = check_rho("dataset.test_rho", test_rho)
    check_max_samples(max_samples)
    if source == "files":
        rho_folder(rho)
        train, test, info = load_release(root, rho, cache_dir)
        keep = subset_index(len(train["y"]), max_samples, seed)
        if keep is not None:
            train = {k: v[keep.numpy()] for k, v in train.items()}
    else:
        corruption_names(corruptions)
        check_supported(corruptions)
        if source == "download":   # never called in tests: needs internet
            from torchvision.datasets import CIFAR10
            CIFAR10(str(root), train=True, download=True)
        train, test, info = build_local(root, rho, seed, corruptions, test_rho, severity, cache_dir, max_samples)
    splits = {"train": _split(train), "test": _split(test)}
    splits["search"] = splits["train"]
    info.update(rho=rho, sizes={name: len(split) for name, split in splits.items()},
                aligned={name: int((split.y == split.b).sum()) for name, split in splits.items()},
                preprocessing=preprocessing())
    return DatasetBundle(DATASET.name, splits, NUM_CLASSES, NUM_CLASSES, info, bias_names=DATASET.bias_names,
                         nominal_rho=(rho,))
