"""Shared fixtures: small real data (the embedded MNIST digits) and tiny generated IDX files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bise_cli.data.mnist_source import Digits, load_embedded


@pytest.fixture(scope="session")
def embedded_digits() -> Digits:
    return load_embedded()


@pytest.fixture(autouse=True)
def _threads():
    # Two cores: keep torch from oversubscribing when pytest runs subprocesses too.
    torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write an IDX file (magic 2051 for 3-d uint8 images, 2049 for 1-d labels)."""
    header = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A folder with the four MNIST IDX files made of random digits (200 train, 50 test), gzipped."""
    rng = np.random.default_rng(0)
    for stem, n in (("train", 200), ("t10k", 50)):
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
        labels = np.arange(n) % 10
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", images, compress=True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels, compress=True)
    return tmp_path
