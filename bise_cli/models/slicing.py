"""Low-level helpers that cut units out of conv, BatchNorm and linear layers, for the backbones' `pruned_copy`.

This module imports no backbone (only torch), so every backbone can import it without import cycles.

Conventions shared by every helper:
- `out_index` keeps rows (output units), `in_index` keeps columns (input units); None keeps them all.
- A layer whose mask is all zeros still keeps one unit (`kept_indices` returns index 0, the "dummy"), so no
  tensor shape is ever empty. The dummy's output is exactly zero in the gated model, so its consumer must ignore
  it: pass `dead_input=True` to zero the consumer's weight (its bias, which does not read the input, stays).
- New layers get the dtype and device of the layer they come from.
"""

from __future__ import annotations

import torch
from torch import nn


def kept_indices(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Indices of kept units, and whether the layer was emptied (then index 0 is kept as a zero dummy)."""
    index = torch.nonzero(mask.bool().cpu()).flatten()
    if len(index) == 0:
        return torch.zeros(1, dtype=torch.long), True
    return index, False


def _select(weight: torch.Tensor, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> torch.Tensor:
    weight = weight.detach()
    if out_index is not None:
        weight = weight[out_index.to(weight.device)]
    if in_index is not None:
        weight = weight[:, in_index.to(weight.device)]
    return weight


def _bias(layer: nn.Module, out_index: torch.Tensor | None) -> torch.Tensor | None:
    if layer.bias is None:
        return None
    return layer.bias.detach() if out_index is None else layer.bias.detach()[out_index.to(layer.bias.device)]


def _fill(new: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dead_input: bool) -> nn.Module:
    """Copy the sliced parameters into the new layer; a layer whose only input is a dead dummy unit reads zeros."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if dead_input:
            new.weight.zero_()
        if bias is not None:
            new.bias.copy_(bias)
    return new


def slice_conv(conv: nn.Conv2d, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
               dead_input: bool = False) -> nn.Conv2d:
    """A copy of `conv` with only the filters `out_index` reading only the input channels `in_index`."""
    if conv.groups != 1:  # grouped convs tie input and output channels together; no backbone here uses them
        raise ValueError("slice_conv supports groups=1 only")
    weight, bias = _select(conv.weight, out_index, in_index), _bias(conv, out_index)
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=bias is not None, padding_mode=conv.padding_mode).to(conv.weight)
    return _fill(new, weight, bias, dead_input)


def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
                 dead_input: bool = False) -> nn.Linear:
    """A copy of `linear` with only the output units `out_index` reading only the inputs `in_index`."""
    weight, bias = _select(linear.weight, out_index, in_index), _bias(linear, out_index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(linear.weight)
    return _fill(new, weight, bias, dead_input)


def slice_bn(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    """A copy of `bn` (affine, with running statistics) for the channels `index` only."""
    new = nn.BatchNorm2d(len(index), eps=bn.eps, momentum=bn.momentum).to(bn.weight)
    index = index.to(bn.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name)[index])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new
