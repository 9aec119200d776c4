"""Shared data containers: every dataset is a set of in-memory splits of (x, y, b) triples.

`x` is one tensor per split (uint8 images for BiasedMNIST, stacked token ids for text), `y` the target and
`b` the bias attribute(s): shape (N,) for one attribute, or (N, A) for A attributes (column k is attribute k,
e.g. the left and right background colours of Multi-Color MNIST). A split also carries an `encode` function
that turns a batch of raw `x` into model input (e.g. uint8 -> normalised float), so datasets stay compact in
memory and batching stays trivial.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

SPLIT_NAMES = ("train", "search", "val", "test", "test_conflicting")  # the last one: CelebA only


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class Split:
    """One split: raw inputs `x`, targets `y`, bias labels `b`, optional per-sample metadata columns."""

    x: torch.Tensor
    y: torch.Tensor
    b: torch.Tensor
    encode: Callable[[torch.Tensor], torch.Tensor] = _identity
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    # Training-time augmentation of raw x batches, (x, generator) -> x (e.g. random crop + flip); applied only
    # when a training loop asks for it (`batches(..., augment=True)`), never in evaluation.
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        n = len(self.y)
        if len(self.x) != n or len(self.b) != n:
            raise ValueError(f"split sizes disagree: x {len(self.x)}, y {n}, b {len(self.b)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Split:
        """The rows `index` of this split (metadata included)."""
        return Split(self.x[index], self.y[index], self.b[index], self.encode,
                     {k: v[index] for k, v in self.meta.items()}, self.augment)

    @property
    def device(self) -> torch.device:
        """Where the split's tensors live (the CPU unless `to` moved them)."""
        return self.x.device

    def to(self, device: torch.device | str) -> Split:
        """The same split with x, y, b and the metadata moved to `device` once (itself when already there), so
        that `batches` indexes and encodes on the device and copies nothing per batch. `encode` and `augment`
        then receive device tensors (augment still gets the CPU generator that shuffles)."""
        device = torch.device(device)
        if self.x.device == device and all(t.device == device for t in (self.y, self.b, *self.meta.values())):
            return self
        return Split(self.x.to(device), self.y.to(device), self.b.to(device), self.encode,
                     {k: v.to(device) for k, v in self.meta.items()}, self.augment)

    def with_bias(self, b: torch.Tensor) -> Split:
        """The same split with its bias labels replaced (used by the unsupervised variant)."""
        return Split(self.x, self.y, b, self.encode, self.meta, self.augment)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", augment: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (encoded x, y, b) batches on `device`; shuffled with `generator` when asked; augmented (with the
        same generator) when asked and the split has an augmentation. The order is drawn on the CPU (the same
        batches on every device) and moved once to where the split lives."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.x.device)
        transform = self.augment if augment else None
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = self.x[idx] if transform is None else transform(self.x[idx], generator)
            yield (self.encode(x).to(device), self.y[idx].to(device), self.b[idx].to(device))

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size

    @property
    def bias_columns(self) -> list[torch.Tensor]:
        """The bias labels as one (N,) tensor per attribute."""
        return bias_columns(self.b)


def bias_columns(b: torch.Tensor) -> list[torch.Tensor]:
    """(N,) -> [b]; (N, A) -> [b[:, 0], ..., b[:, A-1]]."""
    return [b] if b.dim() == 1 else list(b.unbind(1))


def aligned_mask(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, A) booleans (A = 1 for a single attribute): attribute k agrees with the target (b_k == y)."""
    return torch.stack([col == y for col in bias_columns(b)], 1)


@dataclass
class DatasetBundle:
    """All splits of one dataset plus what the rest of the pipeline needs to know about it.

    `splits` holds `train` (vanilla training), `search` (BISE mask search), `val` (model selection; may be
    missing) and `test`. A sample is bias-aligned on attribute k when b_k == y (the paper's convention).
    `num_bias` is the number of values every bias attribute takes; `bias_names` names the attributes (one name
    per column of `b`); `nominal_rho` is the training correlation per attribute the dataset was built with (the
    paper's nominal-rho reweighting uses it; None when the data has no nominal value).
    `info` is free-form provenance (source, synthetic flag, counts) written into the run records.
    """

    name: str
    splits: dict[str, Split]
    num_classes: int
    num_bias: int
    info: dict = field(default_factory=dict)
    bias_names: tuple[str, ...] = ("bias",)
    nominal_rho: tuple[float, ...] | None = None

    @property
    def num_attributes(self) -> int:
        return len(self.bias_names)

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    def get(self, name: str) -> Split | None:
        return self.splits.get(name)
