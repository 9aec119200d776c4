"""The contract every bise backbone keeps: a bottleneck, a final linear `classifier`, and where the gates go.

`features(x)` returns the bottleneck (the input of `classifier`, where the bias heads and probes read), the
forward pass is `classifier(features(x))`, `gate_points()` lists BISE's gate positions, `pruned_copy(masks)`
returns the physically smaller model and `constructor_kwargs()` rebuilds the architecture from plain data.
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """Base class of the image backbones: the forward pass is the classifier on the bottleneck."""

    arch_name = ""
    classifier: nn.Linear  # a submodule or a property of the subclass

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
