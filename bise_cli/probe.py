"""Linear bias heads and probes on a model's bottleneck: the building blocks shared by the BISE search, the FFW
baseline and the leakage metrics.

A head is an nn.Linear from the bottleneck (the input of the model's `classifier`) to the values of one bias
attribute, trained with its own SGD optimiser on cross-entropy. BISE trains one head per bias attribute
(Multi-Color MNIST has two) and penalises the mutual information between each attribute and its head's
prediction. Head-only epochs run on cached bottleneck features when the frozen model sees the same inputs every
epoch (no augmentation), which gives exactly the same updates as recomputing the features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.data.base import Split, bias_columns
from bise_cli.errors import BiseError
from bise_cli.masking import capture_input
from bise_cli.train import predict


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


def feature_epoch(heads: list[tuple[nn.Linear, torch.optim.Optimizer]], z: torch.Tensor, b: torch.Tensor,
                  batch_size: int, generator: torch.Generator) -> list[float]:
    """One epoch of every head over cached features `z` (same batch order for all heads); mean loss per head."""
    device = heads[0][0].weight.device
    columns = bias_columns(b)
    order = torch.randperm(len(z), generator=generator)
    totals = [torch.zeros((), device=device) for _ in heads]
    for start in range(0, len(z), batch_size):
        idx = order[start:start + batch_size]
        zb = z[idx].to(device)
        for k, (head, opt) in enumerate(heads):
            totals[k] += head_step(head, opt, zb, columns[k][idx].to(device)) * len(idx)
    return [float(t) / max(len(z), 1) for t in totals]


def model_epoch(heads: list[tuple[nn.Linear, torch.optim.Optimizer]], model: nn.Module, split: Split,
                batch_size: int, generator: torch.Generator, device) -> None:
    """One epoch of every head recomputing the frozen model's features per batch (needed with augmentation)."""
    with capture_input(model.classifier) as tap:
        for x, _, b in split.batches(batch_size, shuffle=True, generator=generator, device=device):
            with torch.no_grad():
                model(x)
            for (head, opt), column in zip(heads, bias_columns(b), strict=True):
                head_step(head, opt, tap["z"], column)


@torch.no_grad()
def head_accuracy(head: nn.Linear, z: torch.Tensor, b: torch.Tensor) -> float:
    """Accuracy of `head` predicting the labels `b` (one attribute) from features `z`."""
    if not len(b):
        return math.nan
    return float((head(z.to(head.weight.device)).argmax(1).cpu() == b.cpu()).float().mean())


def head_from_state(state: dict) -> nn.Linear:
    """Rebuild a head from its state dict."""
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


def mean_over_attributes(values: list[float]) -> float:
    """The headline value of a per-attribute list (its mean)."""
    return sum(values) / len(values) if values else math.nan


def fresh_probe_leakage(model: nn.Module, train: Split, test: Split, num_bias: int, *, epochs: int = 20,
                        batch_size: int = 100, lr: float = 0.1, seed: int = 0, device="cpu") -> list[float]:
    """Per bias attribute: accuracy on `test` of a new linear probe trained on `train` bottleneck features.

    Fails (BiseError) when a probe does not even reach the majority-class rate on its own training set: a
    diverged probe reads as 'no leakage', which would look like a removed bias."""
    z_train = predict(model, train, 500, device, features=True)["z"]
    z_test = predict(model, test, 500, device, features=True)["z"]
    heads = [make_head(z_train.shape[1], num_bias, lr, 0.9, 1e-4, seed + k)
             for k in range(len(bias_columns(train.b)))]
    for head, _ in heads:
        head.to(device)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        feature_epoch(heads, z_train, train.b, batch_size, generator)
    leakage = []
    for (head, _), b_train, b_test in zip(heads, bias_columns(train.b), bias_columns(test.b), strict=True):
        fitted = head_accuracy(head, z_train, b_train)
        majority = float(torch.bincount(b_train).max()) / max(len(b_train), 1)
        if epochs and not (fitted >= majority - 0.01 and all(torch.isfinite(p).all() for p in head.parameters())):
            raise BiseError(f"the leakage probe did not fit its training set (accuracy {fitted:.3f}, majority "
                            f"class {majority:.3f}): lower leakage_probe.lr (got {lr})")
        leakage.append(head_accuracy(head, z_test, b_test))
    return leakage


def head_leakage(head_states: list[dict], model: nn.Module, test: Split, device="cpu") -> list[float]:
    """Per bias attribute: accuracy of the search's own bias head on `test` bottleneck features of `model`."""
    z = predict(model, test, 500, device, features=True)["z"]
    return [head_accuracy(head_from_state(state).to(device), z, b)
            for state, b in zip(head_states, bias_columns(test.b), strict=True)]
