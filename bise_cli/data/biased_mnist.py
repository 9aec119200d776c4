"""BiasedMNIST: MNIST digits drawn white on a coloured background whose colour is the bias.

The construction is that of ReBias (Bahng et al., ICML 2020).

Colouring at correlation rho: per class y, shuffle its indices; the first floor(n_y * rho) get colour y, the
rest is cut into chunks of ceil(n_rest / 9) that get the other nine colours in a shuffled order. rho = 0.1 gives
an unbiased (uniform) colouring.

Splits (those of the official BISE code): `train` = all training digits at rho (vanilla training); `search` = a
second colouring at rho, its first 5/6 after a random permutation (50k of 60k); `val` = a rho = 0.1 colouring, the
last 1/6 of an independent permutation (10k of 60k; it may share digits with `search`, as in the paper); `test` =
MNIST test at rho = 0.1. `clean_split=True` takes search and val from one permutation so they are disjoint.

Images are kept as uint8 (N, 3, 28, 28) tensors; `encode` maps a batch to (x / 255 - 0.5) / 0.5 on the fly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bise_cli.core.errors import BiseError, check_fraction
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.mnist_source import Digits, load_digits
from bise_cli.data.registry import spec

COLOURS = torch.tensor([
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (225, 225, 0), (225, 0, 225),
    (0, 255, 255), (255, 128, 0), (255, 0, 128), (128, 0, 255), (128, 128, 128),
], dtype=torch.uint8)
DATASET = spec("biased_mnist")
NUM_CLASSES = DATASET.num_classes
UNBIASED_RHO = 0.1
# Separate random streams so that changing one split's size never changes another split's colours.
STREAMS = {"subset": 0, "train": 1, "search": 2, "val": 3, "test": 4, "search_perm": 5, "val_perm": 6}


def check_rho(rho: float) -> float:
    """rho must be a number in (0, 1]."""
    return check_fraction("rho", rho)


def aligned_count(n: int, rho: float) -> int:
    """floor(n * rho), robust to float error (0.29 * 100 must give 29, not 28)."""
    return int(math.floor(n * rho + 1e-9))


def assign_colours(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Bias colour index of every sample, following the ReBias construction described in the module docstring."""
    bias = np.empty(len(labels), dtype=np.int64)
    for y in range(NUM_CLASSES):
        index = np.flatnonzero(labels == y)
        rng.shuffle(index)
        n_aligned = aligned_count(len(index), rho)
        bias[index[:n_aligned]] = y
        rest = index[n_aligned:]
        others = [(y + k) % NUM_CLASSES for k in range(1, NUM_CLASSES)]
        rng.shuffle(others)
        chunk = math.ceil(len(rest) / len(others)) if len(rest) else 0
        for j, colour in enumerate(others):
            bias[rest[j * chunk:(j + 1) * chunk]] = colour
    return bias


def render(images: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) grayscale digits + colour indices -> uint8 (N, 3, 28, 28): white digit, coloured ground."""
    background = COLOURS[bias].view(-1, 3, 1, 1)
    digit = (images > 0).unsqueeze(1)
    return torch.where(digit, torch.full_like(background, 255), background).contiguous()


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1], i.e. ToTensor then Normalize(0.5, 0.5)."""
    return x.float().div_(127.5).sub_(1.0)


def preprocessing() -> dict:
    """What `encode` does, for exported models: input = (uint8 RGB * scale - mean) / std, channels first."""
    return {"kind": "image", "size": [3, 28, 28], "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3,
            "resize": None, "class_names": [str(digit) for digit in range(NUM_CLASSES)]}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream]])


def _coloured_split(images: torch.Tensor, labels: torch.Tensor, rho: float, rng: np.random.Generator) -> Split:
    bias = torch.from_numpy(assign_colours(labels.numpy(), rho, rng))
    return Split(render(images, bias), labels.clone(), bias, encode)


def build_biased_mnist(digits: Digits, rho: float, seed: int = 0, max_samples: int | None = None,
                       val_fraction: float = 1 / 6, clean_split: bool = False,
                       val_rho: float = UNBIASED_RHO) -> DatasetBundle:
    """All four BiasedMNIST splits from `digits` (see the module docstring for the protocol)."""
    rho = check_rho(rho)
    if not 0.0 < val_fraction < 1.0:
        raise BiseError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
    images, labels = digits.train_images, digits.train_labels
    if max_samples is not None:
        if int(max_samples) < 20:
            raise BiseError(f"dataset.max_samples must be at least 20 (or null for all), got {max_samples}")
        if max_samples < len(labels):
            keep = torch.from_numpy(_rng(seed, "subset").permutation(len(labels))[:int(max_samples)])
            images, labels = images[keep], labels[keep]
    n = len(labels)
    n_val = max(1, int(round(n * val_fraction)))

    train = _coloured_split(images, labels, rho, _rng(seed, "train"))
    search_full = _coloured_split(images, labels, rho, _rng(seed, "search"))
    val_full = _coloured_split(images, labels, val_rho, _rng(seed, "val"))
    search_perm = torch.from_numpy(_rng(seed, "search_perm").permutation(n))
    val_perm = search_perm if clean_split else torch.from_numpy(_rng(seed, "val_perm").permutation(n))
    splits = {
        "train": train,
        "search": search_full.subset(search_perm[:n - n_val]),
        "val": val_full.subset(val_perm[n - n_val:]),
        "test": _coloured_split(digits.test_images, digits.test_labels, val_rho, _rng(seed, "test")),
    }
    info = {"source": digits.source, "location": digits.location, "rho": rho, "val_rho": val_rho,
            "clean_split": clean_split, "train_digits": n,
            "sizes": {name: len(split) for name, split in splits.items()}, "preprocessing": preprocessing()}
    return DatasetBundle(DATASET.name, splits, NUM_CLASSES, NUM_CLASSES, info, bias_names=DATASET.bias_names,
                         nominal_rho=(rho,))


def build(source: str, root: str, seed: int, max_samples: int | None = None, *, rho: float, fallback: str = "none",
          **options) -> DatasetBundle:
    """BiasedMNIST from the configured digit source (the dataset registry's builder); `rho` is checked before
    any file is read."""
    check_rho(rho)
    digits = load_digits(source, root, fallback=fallback)
    return build_biased_mnist(digits, rho, seed=seed, max_samples=max_samples, **options)


def paper_milestones(rho: float) -> list[int]:
    """`train.milestones: auto`: the paper's vanilla schedule, 40/60 for rho 0.99 and 0.995, else 80/90."""
    return [40, 60] if round(float(rho), 6) in (0.99, 0.995) else [80, 90]
