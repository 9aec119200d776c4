"""Physical pruning: binary unit masks -> a smaller standalone model with the same logits (method.md §2.9).

Gates sit after activations, so a pruned unit outputs exact zeros and removing it is exact:
- SimpleConvNet: drop conv filter i (with its bias), BN channel i and input channel i of the next conv (or
  column i of the FC). The result is a plain SimpleConvNet with fewer channels.
- ResNet-18: the intermediate channels of each block are removed (conv1 rows, bn1, conv2 columns). A block's
  output mask zeroes channels of the residual stream; the add needs full width (torch-simplify's `pinned_out`),
  so the block keeps a fixed channel-mask buffer on its output and the next block reads only the kept channels
  (index_select) in its conv1 and downsample conv.
- Other backbones (BERT) provide `pruned_copy(masks)` themselves.

A layer with every unit pruned keeps one channel whose outgoing weights are zero: exact, and it keeps every
tensor shape non-empty.

`save_pruned` / `load_pruned` store the architecture name, constructor arguments (plain ints and lists) and the
state dict, so a pruned model loads with `torch.load(..., weights_only=True)` and without the original model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.models.resnet18 import BLOCK_NAMES, ResNet18
from bise_cli.models.simple_convnet import SimpleConvNet
from bise_cli.records import save_torch


def kept_indices(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Indices of kept units, and whether the layer was emptied (then index 0 is kept as a zero dummy)."""
    index = torch.nonzero(mask.bool().cpu()).flatten()
    if len(index) == 0:
        return torch.zeros(1, dtype=torch.long), True
    return index, False


def _slice_bn(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(index), eps=bn.eps, momentum=bn.momentum).to(bn.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name)[index])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _slice_conv(conv: nn.Conv2d, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> nn.Conv2d:
    weight = conv.weight.detach()
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None).to(weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias[out_index] if out_index is not None else conv.bias)
    return new


def prune_simple_convnet(model: SimpleConvNet, masks: dict[str, torch.Tensor]) -> SimpleConvNet:
    """A SimpleConvNet with only the kept channels of every block."""
    kept = [kept_indices(masks[p.name]) for p in model.gate_points()]
    pruned = SimpleConvNet(num_classes=model.fc.out_features, in_channels=model.extracter[0].in_channels,
                           channels=[len(index) for index, _ in kept], kernel_size=model.kernel_size)
    pruned = pruned.to(model.fc.weight.device)
    previous = None
    for i, (index, _) in enumerate(kept):
        pruned.extracter[3 * i] = _slice_conv(model.extracter[3 * i], index, previous)
        pruned.extracter[3 * i + 1] = _slice_bn(model.extracter[3 * i + 1], index)
        previous = index
    with torch.no_grad():
        pruned.fc.weight.copy_(model.fc.weight[:, previous])
        pruned.fc.bias.copy_(model.fc.bias)
        for i, (_, emptied) in enumerate(kept):
            if emptied:  # the consumer's only input is the dummy channel: it must contribute nothing
                consumer = pruned.extracter[3 * (i + 1)] if i + 1 < len(kept) else pruned.fc
                consumer.weight.zero_()
    return pruned.eval()


class PrunedBasicBlock(nn.Module):
    """A ResNet BasicBlock reading only the kept input channels, with fewer intermediate channels and a fixed
    channel mask on its (full-width) output."""

    def __init__(self, in_channels: int, in_kept: int | None, mid: int, out_channels: int, stride: int,
                 downsample: bool):
        super().__init__()
        reads = in_kept if in_kept is not None else in_channels
        # Buffers are filled by from_block() or load_state_dict(); sizes come from the arguments.
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


def _prune_block(block: nn.Module, in_index: torch.Tensor | None, mid_mask: torch.Tensor,
                 out_mask: torch.Tensor) -> PrunedBasicBlock:
    mid_index, mid_emptied = kept_indices(mid_mask)
    has_downsample = block.downsample is not None
    pruned = PrunedBasicBlock(block.conv1.in_channels, None if in_index is None else len(in_index), len(mid_index),
                              block.conv2.out_channels, block.conv1.stride[0], has_downsample)
    pruned.conv1 = _slice_conv(block.conv1, mid_index, in_index)
    pruned.bn1 = _slice_bn(block.bn1, mid_index)
    pruned.conv2 = _slice_conv(block.conv2, None, mid_index)
    pruned.bn2 = copy.deepcopy(block.bn2)
    if has_downsample:
        pruned.downsample = nn.Sequential(_slice_conv(block.downsample[0], None, in_index),
                                          copy.deepcopy(block.downsample[1]))
    with torch.no_grad():
        if in_index is not None:
            pruned.in_index.copy_(in_index)
        pruned.out_mask.copy_(out_mask.float())
        if mid_emptied:
            pruned.conv2.weight.zero_()
    return pruned


class PrunedResNet18(nn.Module):
    """ResNet-18 after physical pruning: the unchanged stem, pruned blocks, pooling and classifier."""

    def __init__(self, num_classes: int, spec: list[dict]):
        super().__init__()
        self.spec = spec
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.blocks = nn.Sequential(*[PrunedBasicBlock(**s) for s in spec])
        self.fc = nn.Linear(spec[-1]["out_channels"], num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def constructor_kwargs(self) -> dict:
        return {"num_classes": self.fc.out_features, "spec": self.spec}


def prune_resnet18(model: ResNet18, masks: dict[str, torch.Tensor]) -> PrunedResNet18:
    """Remove the intermediate channels of every block and the consumers' reads of masked stream channels."""
    net = model.net
    blocks, spec, in_index = [], [], None
    for name in BLOCK_NAMES:
        block = net.get_submodule(name)
        out_mask = masks[f"{name}.out"].bool()
        pruned = _prune_block(block, in_index, masks[f"{name}.mid"], out_mask)
        blocks.append(pruned)
        spec.append({"in_channels": block.conv1.in_channels, "in_kept": None if in_index is None else len(in_index),
                     "mid": pruned.conv1.out_channels, "out_channels": block.conv2.out_channels,
                     "stride": block.conv1.stride[0], "downsample": block.downsample is not None})
        in_index, _ = kept_indices(out_mask)
    result = PrunedResNet18(net.fc.out_features, spec).to(net.fc.weight.device)
    result.conv1, result.bn1 = copy.deepcopy(net.conv1), copy.deepcopy(net.bn1)
    result.blocks = nn.Sequential(*blocks)
    result.fc = copy.deepcopy(net.fc)
    return result.eval()


def prune_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A new, smaller model equal to `model` with its gates fixed to `masks` (the original is untouched)."""
    if isinstance(model, SimpleConvNet):
        return prune_simple_convnet(model, masks)
    if isinstance(model, ResNet18):
        return prune_resnet18(model, masks)
    if hasattr(model, "pruned_copy"):
        return model.pruned_copy(masks)
    raise TypeError(f"no physical pruning for {type(model).__name__}")


# --------------------------------------------------------------------------------------------- save / load

def _architectures() -> dict[str, type]:
    archs = {"simple_convnet": SimpleConvNet, "pruned_resnet18": PrunedResNet18}
    try:  # BERT needs the optional `text` extra
        from bise_cli.models.bert import PrunedBert
        archs["pruned_bert"] = PrunedBert
    except ImportError:
        pass
    return archs


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a self-contained checkpoint: architecture name, constructor arguments, state dict."""
    names = {SimpleConvNet: "simple_convnet", PrunedResNet18: "pruned_resnet18"}
    arch = names.get(type(model), getattr(model, "arch_name", None))
    if arch is None:
        raise TypeError(f"cannot save a pruned {type(model).__name__}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(path, {"arch": arch, "kwargs": model.constructor_kwargs(), "state_dict": state})


def load_pruned(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Load a model written by `save_pruned` (safe: weights_only=True), in eval mode."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    archs = _architectures()
    if checkpoint["arch"] not in archs:
        raise ValueError(f"unknown pruned architecture {checkpoint['arch']!r} in {path}")
    model = archs[checkpoint["arch"]](**checkpoint["kwargs"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
