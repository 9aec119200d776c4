"""Baselines that reuse BISE's stages: random and L2-magnitude structured pruning at BISE's per-layer kept-unit
counts, and best-epoch selection for fine-tuning (BISE+FT and the reweighted-FT control).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from bise_cli.core.metrics import accuracy_metrics
from bise_cli.data.base import Split
from bise_cli.method.train import predict


def random_masks(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """For every layer keep as many randomly chosen units as `reference` keeps."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, ref in reference.items():
        keep = torch.randperm(ref.numel(), generator=generator)[:int(ref.sum())]
        mask = torch.zeros(ref.numel(), dtype=torch.bool)
        mask[keep] = True
        masks[name] = mask
    return masks


def unit_weight_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the weights that compute each gated unit (row i of the producing conv/linear layer)."""
    norms = {}
    for point in model.gate_points():
        producer = model.get_submodule(point.producer or point.module)
        weight = producer.weight.detach()
        if weight.shape[0] != point.units:
            raise ValueError(f"gate {point.name}: producer has {weight.shape[0]} rows, expected {point.units}")
        norms[point.name] = weight.flatten(1).norm(dim=1).cpu()
    return norms


def magnitude_masks(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For every layer keep the units with the largest weight L2 norm, as many as `reference` keeps."""
    norms = unit_weight_norms(model)
    masks = {}
    for name, ref in reference.items():
        mask = torch.zeros(ref.numel(), dtype=torch.bool)
        mask[torch.argsort(norms[name], descending=True, stable=True)[:int(ref.sum())]] = True
        masks[name] = mask
    return masks


class BestState:
    """Keep a copy of the model's weights at the epoch with the best validation metric (ties to the later)."""

    def __init__(self, model: nn.Module, val: Split | None, num_classes: int, num_bias: int, *, batch_size: int,
                 device, metric: str = "acc", group_weights: torch.Tensor | None = None):
        self.model, self.val, self.batch_size, self.device, self.metric = model, val, batch_size, device, metric
        self.group_weights = group_weights
        self.num_classes, self.num_bias = num_classes, num_bias
        self.value, self.epoch, self.state = -math.inf, 0, None

    def update(self, epoch: int) -> None:
        if self.val is None:
            self.epoch = epoch
            return
        out = predict(self.model, self.val, self.batch_size, self.device)
        value = accuracy_metrics(out["y"], out["b"], out["pred"], self.num_classes, self.num_bias,
                                 group_weights=self.group_weights)[self.metric]
        if value >= self.value:
            self.value, self.epoch = value, epoch
            self.state = copy.deepcopy(self.model.state_dict())

    def restore(self) -> None:
        """Load the best weights back (no-op without a validation split: the last epoch is kept)."""
        if self.state is not None:
            self.model.load_state_dict(self.state)
