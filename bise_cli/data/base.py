"""Shared data containers: every dataset is a set of in-memory splits of (x, y, b) triples.

`x` is one tensor per split (uint8 images for BiasedMNIST, stacked token ids for text), `y` the target and
`b` the bias attribute(s): shape (N,) for one attribute, or (N, A) for A attributes (column k is attribute k,
e.g. the left and right background colours of Multi-Color MNIST). A split also carries an `encode` function
that turns a batch of raw `x` into model input (e.g. uint8 -> normalised float), so datasets stay compact in
memory and batching stays trivial.

Devices: a split lives where `Split.to` put it (the pipeline moves each distinct split once, or keeps it in host
memory when it does not fit the GPU: `data_on_device`). `Split.batch` gathers rows where the split lives, copies
host rows to the device through pinned memory without blocking, and augments and encodes on the device; nothing
in it makes the host wait for the device.
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
        """The same split with its bias labels replaced (used by the unsupervised variant), moved to where the
        split lives (pseudo labels come back from `predict` on the CPU)."""
        return Split(self.x, self.y, b.to(self.x.device), self.encode, self.meta, self.augment)

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu", augment: bool = False,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoded x, y, b) of the rows `idx` on `device`, augmented with `generator` when asked and the split has
        an augmentation. Rows are gathered where the split lives; host rows bound for a GPU go through pinned
        memory with non-blocking copies; augmentation and encoding run on `device`."""
        device = torch.device(device)
        # A no-op when the order already lives with the split; host -> device without blocking.
        idx = idx.to(self.x.device, non_blocking=idx.device.type == "cpu")
        x, y, b = (_gather(t, idx, device) for t in (self.x, self.y, self.b))
        if augment and self.augment is not None:
            x = self.augment(x, generator)
        return self.encode(x), y, b

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", augment: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (encoded x, y, b) batches on `device`; shuffled with `generator` when asked; augmented (with the
        same generator) when asked and the split has an augmentation. The order is drawn on the CPU (the same
        batches on every device) and copied once per epoch, without blocking, to where the split lives."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.x.device, non_blocking=True)
        for start in range(0, n, batch_size):
            yield self.batch(order[start:start + batch_size], device, augment, generator)

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size

    @property
    def bias_columns(self) -> list[torch.Tensor]:
        """The bias labels as one (N,) tensor per attribute."""
        return bias_columns(self.b)


def _gather(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of `t` on `device`. Host rows bound for a CUDA device are gathered straight into pinned memory
    and copied without blocking (the caching host allocator keeps the buffer until the copy is done); other
    host-to-device copies are non-blocking too (pageable memory is staged at once, so this is safe)."""
    if t.device.type == device.type and (t.device.index is None or device.index is None
                                         or t.device.index == device.index):
        return t[idx]
    if t.device.type != "cpu":  # device -> host: a blocking copy (a non-blocking one could be read too early)
        return t[idx].to(device)
    if device.type == "cuda":
        staged = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=staged).to(device, non_blocking=True)
    return t[idx].to(device, non_blocking=True)


def place_splits(splits: dict[str, Split], device: torch.device | str) -> dict[str, Split]:
    """`splits` moved to `device`, each distinct Split object once: names that share a split (`search` is
    `train` for most datasets) still share it on the device, so it is held there once."""
    moved: dict[int, Split] = {}
    for split in splits.values():
        if id(split) not in moved:
            moved[id(split)] = split.to(device)
    return {name: moved[id(split)] for name, split in splits.items()}


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float / 255, then (x - mean) / std with per-channel statistics (CPU tensors shaped
    (1, C, 1, 1)) that follow the batch to its device without making the host wait."""
    return (x.float().div_(255.0) - mean.to(x.device, non_blocking=True)) / std.to(x.device, non_blocking=True)


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
