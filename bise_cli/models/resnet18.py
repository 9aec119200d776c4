"""torchvision ResNet-18 with the classifier sized to the dataset, BISE's gate positions and physical pruning.

Gates (BISE, CVPR 2026; as in the authors' code): in each of the 8 BasicBlocks (a) on the input of `conv2`
(the block's intermediate channels, after relu(bn1(conv1))) and (b) on the block output (after the residual add
and final ReLU). The stem and the FC are not gated: 2*(2*64 + 2*128 + 2*256 + 2*512) = 3840 gates.

Physical pruning (`ResNet18.pruned_copy`) is exact because every gate sits after a ReLU:
- intermediate channels: conv1 filters, bn1 channels and conv2 input channels are removed;
- block outputs zero channels of the residual stream. The residual add needs the full width (torch-simplify's
  `pinned_out`), so each pruned block keeps a fixed channel mask on its output, and the next block reads only the
  kept channels (index_select) in its conv1 and downsample conv; the classifier likewise reads only the channels
  kept by the last block.
"""

from __future__ import annotations

import copy
import logging
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from bise_cli.models.base import Backbone
from bise_cli.models.masking import GatePoint
from bise_cli.models.slicing import kept_indices, slice_bn, slice_conv, slice_linear

log = logging.getLogger(__name__)

BLOCK_NAMES = [f"layer{stage}.{index}" for stage in (1, 2, 3, 4) for index in (0, 1)]


class ResNet18(Backbone):
    """ResNet-18 wrapper exposing `classifier`, `features` and `gate_points` like every bise backbone."""

    def __init__(self, num_classes: int = 10, weights: str | None = None):
        super().__init__()
        if weights not in (None, "none", "imagenet"):
            raise ValueError(f"resnet18 weights {weights!r}; allowed: none, imagenet")
        # ImageNet weights come from torchvision's cache (internet the first time); offline, the network starts
        # from random weights with a warning rather than failing a run that may only need the architecture.
        self.net = resnet18(weights=None)
        if weights == "imagenet":
            try:
                self.net = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
            except (URLError, OSError, RuntimeError) as error:
                log.warning("resnet18 ImageNet weights unavailable (%s): using random weights",
                            str(error).splitlines()[0][:120])
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.net.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)


    def gate_points(self) -> list[GatePoint]:
        points = []
        for block_name in BLOCK_NAMES:
            block = self.net.get_submodule(block_name)
            points.append(GatePoint(f"{block_name}.mid", f"net.{block_name}.conv2", block.conv2.in_channels,
                                    where="input", producer=f"net.{block_name}.conv1"))
            points.append(GatePoint(f"{block_name}.out", f"net.{block_name}", block.conv2.out_channels,
                                    producer=f"net.{block_name}.conv2", removable=False))
        return points

    def pruned_copy(self, masks: dict[str, torch.Tensor]) -> PrunedResNet18:
        """A standalone PrunedResNet18 equal to this model with its gates fixed to `masks` (gate name -> bool)."""
        net = self.net
        blocks, spec = [], []
        in_index, in_emptied = None, False  # stream channels the next consumer reads (None: all of them)
        for name in BLOCK_NAMES:
            block = net.get_submodule(name)
            out_mask = masks[f"{name}.out"].bool()
            blocks.append(_prune_block(block, in_index, in_emptied, masks[f"{name}.mid"], out_mask))
            spec.append({"in_channels": block.conv1.in_channels,
                         "in_kept": None if in_index is None else len(in_index),
                         "mid": blocks[-1].conv1.out_channels, "out_channels": block.conv2.out_channels,
                         "stride": block.conv1.stride[0], "downsample": block.downsample is not None})
            in_index, in_emptied = kept_indices(out_mask)
        result = PrunedResNet18(net.fc.out_features, spec, fc_kept=len(in_index))
        result.conv1, result.bn1 = copy.deepcopy(net.conv1), copy.deepcopy(net.bn1)
        result.blocks = nn.Sequential(*blocks)
        result.fc = slice_linear(net.fc, None, in_index, dead_input=in_emptied)
        with torch.no_grad():
            result.fc_index.copy_(in_index)
        return result.to(net.fc.weight).eval()


class PrunedBasicBlock(nn.Module):
    """A ResNet BasicBlock reading only the kept input channels, with fewer intermediate channels and a fixed
    channel mask on its (full-width) output."""

    def __init__(self, in_channels: int, in_kept: int | None, mid: int, out_channels: int, stride: int,
                 downsample: bool):
        super().__init__()
        reads = in_kept if in_kept is not None else in_channels
        # Buffers are filled by ResNet18.pruned_copy() or load_state_dict(); sizes come from the arguments.
        self.register_buffer("in_index", torch.arange(in_kept if in_kept is not None else 0))
        self.reads_subset = in_kept is not None
        self.conv1 = nn.Conv2d(reads, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(nn.Conv2d(reads, out_channels, 1, stride, bias=False),
                                        nn.BatchNorm2d(out_channels)) if downsample else None
        self.register_buffer("out_mask", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reads = x.index_select(1, self.in_index) if self.reads_subset else x
        out = F.relu(self.bn1(self.conv1(reads)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(reads) if self.downsample is not None else x
        return F.relu(out + identity) * self.out_mask.view(1, -1, 1, 1)


def _prune_block(block: nn.Module, in_index: torch.Tensor | None, in_emptied: bool, mid_mask: torch.Tensor,
                 out_mask: torch.Tensor) -> PrunedBasicBlock:
    mid_index, mid_emptied = kept_indices(mid_mask)
    has_downsample = block.downsample is not None
    pruned = PrunedBasicBlock(block.conv1.in_channels, None if in_index is None else len(in_index), len(mid_index),
                              block.conv2.out_channels, block.conv1.stride[0], has_downsample)
    # An emptied stream leaves one dummy channel that is exactly zero already; zeroing its readers is for clarity.
    pruned.conv1 = slice_conv(block.conv1, mid_index, in_index, dead_input=in_emptied)
    pruned.bn1 = slice_bn(block.bn1, mid_index)
    pruned.conv2 = slice_conv(block.conv2, None, mid_index, dead_input=mid_emptied)
    pruned.bn2 = copy.deepcopy(block.bn2)
    if has_downsample:
        pruned.downsample = nn.Sequential(slice_conv(block.downsample[0], None, in_index, dead_input=in_emptied),
                                          copy.deepcopy(block.downsample[1]))
    with torch.no_grad():
        if in_index is not None:
            pruned.in_index.copy_(in_index)
        pruned.out_mask.copy_(out_mask.float())
    return pruned


class PrunedResNet18(nn.Module):
    """ResNet-18 after physical pruning: the unchanged stem, pruned blocks, pooling and a classifier that reads
    only the channels kept by the last block (`fc_kept`; None in checkpoints written before it, all 512 read)."""

    arch_name = "pruned_resnet18"  # its BackboneSpec's pruned_arch (bise_cli.models.registry)

    def __init__(self, num_classes: int, spec: list[dict], fc_kept: int | None = None):
        super().__init__()
        self.spec = spec
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.blocks = nn.Sequential(*[PrunedBasicBlock(**s) for s in spec])
        self.fc_kept = fc_kept
        if fc_kept is not None:  # registered only then, so older state dicts still load strictly
            self.register_buffer("fc_index", torch.arange(fc_kept))
        self.fc = nn.Linear(fc_kept if fc_kept is not None else spec[-1]["out_channels"], num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1)
        if self.fc_kept is not None:
            x = x.index_select(1, self.fc_index)
        return self.fc(x)

    def constructor_kwargs(self) -> dict:
        """Arguments that rebuild this architecture (saved with pruned checkpoints)."""
        return {"num_classes": self.fc.out_features, "spec": self.spec, "fc_kept": self.fc_kept}
