"""Linear bias heads and probes on a model's bottleneck: the building blocks shared by the BISE search, the FFW
baseline and the leakage metrics.

A head is an nn.Linear from the bottleneck (the input of the model's `classifier`) to the values of one bias
attribute, trained with its own SGD optimiser on cross-entropy. BISE trains one head per bias attribute
(Multi-Color MNIST has two) and penalises the mutual information between each attribute and its head's
prediction. Head-only epochs run on cached bottleneck features when the frozen model sees the same inputs every
epoch (no augmentation), which gives exactly the same updates as recomputing the features. The cached features
and labels sit on the heads' device for all epochs; an epoch never makes the host wait for the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.data.base import Split, bias_columns
from bise_cli.method.train import predict
from bise_cli.models.masking import capture_input


@dataclass
class HeadOptimiser:
    """The bias head's SGD (shared by the BISE search and FFW: lr 0.1, momentum 0.9, weight decay 1e-4)."""

    head_lr: float = 0.1
    head_momentum: float = 0.9
    head_weight_decay: float = 1e-4


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny linear-head ops on one thread: they gain nothing from more, and on a busy machine OpenMP's
    spin-waiting made a head step ~80x slower with 2 threads than with 1 (measured: 13.5 ms vs 0.17 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_head(dim: int, num_bias: int, lr: float, momentum: float, weight_decay: float, seed: int):
    """A linear bias head (initialised from `seed`, without touching the global RNG) and its own SGD."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(dim, num_bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return head, opt


def head_step(head: nn.Linear, opt: torch.optim.Optimizer, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One SGD step of the head's cross-entropy on detached features; returns the batch loss."""
    loss = F.cross_entropy(head(z.detach()), b)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`: a no-op when it is there already, a non-blocking copy from the host otherwise."""
    return t.to(device, non_blocking=t.device.type == "cpu")


def feature_epoch(heads: list[tuple[nn.Linear, torch.optim.Optimizer]], z: torch.Tensor, b: torch.Tensor,
                  batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of every head over cached features `z` (same batch order for all heads); returns the mean loss
    per head as a tensor on the heads' device (read it when needed: reading makes the host wait). Features and
    labels are copied to the device once (not at all when they live there, as the search's do), the batch order
    once per epoch; batches are then gathered on the device."""
    device = heads[0][0].weight.device
    z = _on(z, device)
    columns = [_on(column, device) for column in bias_columns(b)]
    order = _on(torch.randperm(len(z), generator=generator), device)
    totals = torch.zeros(len(heads), device=device)
    with single_thread():
        for start in range(0, len(z), batch_size):
            idx = order[start:start + batch_size]
            zb = z[idx]
            for k, (head, opt) in enumerate(heads):
                totals[k] += head_step(head, opt, zb, columns[k][idx]) * len(idx)
    return totals / max(len(z), 1)


def model_epoch(heads: list[tuple[nn.Linear, torch.optim.Optimizer]], model: nn.Module, split: Split,
                batch_size: int, generator: torch.Generator, device) -> None:
    """One epoch of every head recomputing the frozen model's features per batch (needed with augmentation)."""
    with capture_input(model.classifier) as tap:
        for x, _, b in split.batches(batch_size, shuffle=True, generator=generator, device=device, augment=True):
            with torch.no_grad():
                model(x)
            for (head, opt), column in zip(heads, bias_columns(b), strict=True):
                head_step(head, opt, tap["z"], column)


@torch.no_grad()
def head_accuracies(heads: list[nn.Linear], z: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Accuracy of each head predicting its bias attribute (column k of `b` for head k) from features `z`,
    computed on the heads' device and read in one transfer."""
    if not len(b):
        return [math.nan] * len(heads)
    device = heads[0].weight.device
    z = _on(z, device)
    hits = [(head(z).argmax(1) == _on(column, device)).float().mean()
            for head, column in zip(heads, bias_columns(b), strict=True)]
    return torch.stack(hits).tolist()


def head_accuracy(head: nn.Linear, z: torch.Tensor, b: torch.Tensor) -> float:
    """Accuracy of `head` predicting the labels `b` (one attribute) from features `z`."""
    return head_accuracies([head], z, b.reshape(-1))[0]


def head_from_state(state: dict) -> nn.Linear:
    """Rebuild a head from its state dict."""
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


def mean_over_attributes(values: list[float]) -> float:
    """The headline value of a per-attribute list (its mean)."""
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def head_loss(head: nn.Linear, z: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cross-entropy of `head` on features `z` with labels `b`."""
    device = head.weight.device
    return float(F.cross_entropy(head(_on(z, device)), _on(b, device)))


def fresh_probe_leakage(model: nn.Module, train: Split, test: Split, num_bias: int, *, feature_batch_size: int,
                        epochs: int = 20, batch_size: int = 100, lr: float = 0.1, seed: int = 0, device="cpu",
                        test_features: torch.Tensor | None = None) -> list[float]:
    """Per bias attribute: accuracy on `test` of a new linear probe trained (`epochs`, `batch_size`, `lr`) on
    `train` bottleneck features, computed in batches of `feature_batch_size` (the evaluation's batch size).

    `test_features`: the bottleneck features of `test` from the evaluation's own test pass (the same batches
    through the same kernels), used instead of a second pass over `test`. Fails (BiseError) when a probe ends
    worse on its own training set than it started (a diverged probe reads as 'no leakage', which would look like
    a removed bias)."""
    z_train = predict(model, train, feature_batch_size, device, features=True, host=False)["z"]
    z_test = test_features if test_features is not None else \
        predict(model, test, feature_batch_size, device, features=True, host=False)["z"]
    columns = bias_columns(train.b)
    heads = [make_head(z_train.shape[1], num_bias, lr, 0.9, 1e-4, seed + k) for k in range(len(columns))]
    for head, _ in heads:
        head.to(device, non_blocking=True)  # a new CPU head: copied without waiting
    with single_thread():
        before = [head_loss(head, z_train, b) for (head, _), b in zip(heads, columns, strict=True)]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        feature_epoch(heads, z_train, train.b, batch_size, generator)
    leakage = []
    for (head, _), b_train, b_test, start in zip(heads, columns, bias_columns(test.b), before, strict=True):
        with single_thread():
            end = head_loss(head, z_train, b_train)
        if not math.isfinite(end) or end > start:
            raise BiseError(f"the leakage probe diverged (training loss {start:.3g} -> {end:.3g}): lower "
                            f"leakage_probe.lr (got {lr:g})")
        leakage.append(head_accuracy(head, z_test, b_test))
    return leakage


def head_leakage(head_states: list[dict], model: nn.Module, test: Split, batch_size: int,
                 device="cpu") -> list[float]:
    """Per bias attribute: accuracy of the search's own bias head on `test` bottleneck features of `model`
    (computed in batches of `batch_size`, the evaluation's)."""
    z = predict(model, test, batch_size, device, features=True, host=False)["z"]
    return head_accuracies([head_from_state(state).to(device) for state in head_states], z, test.b)
