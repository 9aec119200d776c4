"""torchvision ResNet-18 with the classifier sized to the dataset, and BISE's gate positions (method.md §2.2).

In each of the 8 BasicBlocks: (a) on the input of `conv2` (the block's intermediate channels, after
relu(bn1(conv1))) and (b) on the block output (after the residual add and final ReLU). The stem and the FC are
not gated: 2*(2*64 + 2*128 + 2*256 + 2*512) = 3840 gates.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from bise_cli.masking import GatePoint

BLOCK_NAMES = [f"layer{stage}.{index}" for stage in (1, 2, 3, 4) for index in (0, 1)]


class ResNet18(nn.Module):
    """ResNet-18 wrapper exposing `classifier`, `features` and `gate_points` like every bise backbone."""

    def __init__(self, num_classes: int = 10, weights: str | None = None):
        super().__init__()
        if weights not in (None, "none", "imagenet"):
            raise ValueError(f"resnet18 weights {weights!r}; allowed: none, imagenet")
        # ImageNet weights need internet the first time; the default is random init (offline-safe).
        self.net = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1 if weights == "imagenet" else None)
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.net.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.features(x))

    def gate_points(self) -> list[GatePoint]:
        points = []
        for block_name in BLOCK_NAMES:
            block = self.net.get_submodule(block_name)
            points.append(GatePoint(f"{block_name}.mid", f"net.{block_name}.conv2", block.conv2.in_channels,
                                    where="input", producer=f"net.{block_name}.conv1"))
            points.append(GatePoint(f"{block_name}.out", f"net.{block_name}", block.conv2.out_channels,
                                    producer=f"net.{block_name}.conv2"))
        return points
