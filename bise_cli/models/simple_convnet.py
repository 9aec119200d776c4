"""SimpleConvNet of ReBias / BISE for BiasedMNIST (BISE, CVPR 2026; README "BiasedMNIST").

4 blocks of [Conv 7x7 pad 3 -> BatchNorm -> activation] with 16/32/64/128 channels (times `width`), ReLU in
the first three blocks and Tanh in the last, global average pooling, then `fc` (128 -> classes).
Convs use Kaiming-normal (fan_out) init, BN weight 1 and bias 0. Gates sit after each activation.

Physical pruning (`pruned_copy`) is exact because a gate sits after the activation: a pruned channel outputs
exact zeros, so its conv filter, BN channel and the next layer's input channel (or FC column) can go. The
result is again a plain SimpleConvNet, with fewer channels.
"""

from __future__ import annotations

import torch
from torch import nn

from bise_cli.models.base import Backbone
from bise_cli.models.masking import GatePoint
from bise_cli.models.slicing import kept_indices, slice_bn, slice_conv, slice_linear

BASE_CHANNELS = (16, 32, 64, 128)


def scaled_channels(width: float) -> list[int]:
    """Channel counts for a width multiplier (at least one channel per block)."""
    return [max(1, int(round(c * width))) for c in BASE_CHANNELS]


class SimpleConvNet(Backbone):
    """The paper's BiasedMNIST backbone; `features(x)` returns the bottleneck (input of `fc`)."""

    arch_name = "simple_convnet"  # its BackboneSpec's pruned_arch (bise_cli.models.registry)

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 channels: list[int] | None = None, kernel_size: int = 7):
        super().__init__()
        channels = list(channels) if channels is not None else scaled_channels(width)
        layers: list[nn.Module] = []
        previous = in_channels
        for i, out in enumerate(channels):
            activation = nn.Tanh() if i == len(channels) - 1 else nn.ReLU()
            layers += [nn.Conv2d(previous, out, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(out),
                       activation]
            previous = out
        self.extracter = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        self.channels = channels
        self.kernel_size = kernel_size
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.extracter(x)), 1)


    def gate_points(self) -> list[GatePoint]:
        """One gate after each block's activation (240 gates at width 1)."""
        return [GatePoint(f"block{i}", f"extracter.{3 * i + 2}", units, producer=f"extracter.{3 * i}")
                for i, units in enumerate(self.channels)]

    def constructor_kwargs(self) -> dict:
        """Arguments that rebuild this architecture (saved with pruned checkpoints)."""
        return {"num_classes": self.fc.out_features, "in_channels": self.extracter[0].in_channels,
                "channels": list(self.channels), "kernel_size": self.kernel_size}

    def pruned_copy(self, masks: dict[str, torch.Tensor]) -> SimpleConvNet:
        """A smaller SimpleConvNet keeping only the channels where `masks` (gate name -> bool) is true."""
        kept = [kept_indices(masks[p.name]) for p in self.gate_points()]
        pruned = SimpleConvNet(num_classes=self.fc.out_features, in_channels=self.extracter[0].in_channels,
                               channels=[len(index) for index, _ in kept], kernel_size=self.kernel_size)
        previous, previous_emptied = None, False
        for i, (index, emptied) in enumerate(kept):
            pruned.extracter[3 * i] = slice_conv(self.extracter[3 * i], index, previous, dead_input=previous_emptied)
            pruned.extracter[3 * i + 1] = slice_bn(self.extracter[3 * i + 1], index)
            previous, previous_emptied = index, emptied
        pruned.fc = slice_linear(self.fc, None, previous, dead_input=previous_emptied)
        return pruned.to(self.fc.weight).eval()
