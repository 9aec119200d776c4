"""Symmetric label noise for robustness experiments: a fixed number of targets replaced by another class.

Exactly round(fraction * N) samples, drawn without replacement, get a label drawn uniformly from the other
C - 1 classes (never their own), so the noise rate is exact rather than only expected. A seeded numpy
generator makes the corruption reproducible and independent of every other random stream.
"""

from __future__ import annotations

import numpy as np
import torch

from bise_cli.core.errors import BiseError


def flip_labels(y: torch.Tensor, fraction: float, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_noisy, flipped_mask): a copy of `y` with round(fraction * N) labels moved to a uniformly drawn other
    class, and the boolean mask of the flipped samples."""
    if not 0 <= fraction <= 1:
        raise BiseError(f"label noise fraction must be in [0, 1] (got {fraction})")
    if num_classes < 2 and fraction > 0:
        raise BiseError(f"label noise needs at least 2 classes (got {num_classes})")
    n = len(y)
    count = int(round(fraction * n))
    rng = np.random.default_rng([seed, 0x6E6F697A])  # "noiz": a stream of its own
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=count, replace=False)] = True
    noisy = y.clone()
    if count:
        old = y[torch.from_numpy(flipped)].long().cpu().numpy()
        # An offset in 1..C-1 added modulo C is a uniform draw over the other classes.
        new = (old + rng.integers(1, num_classes, size=count)) % num_classes
        noisy[torch.from_numpy(flipped)] = torch.from_numpy(new).to(y.dtype).to(y.device)
    return noisy, torch.from_numpy(flipped).to(y.device)
