"""Backbone factory: one name -> one constructor, chosen from the backbone registry (bise_cli.models.registry, an
explicit map: never from a config string that could import arbitrary code).

Every backbone is an nn.Module with `classifier` (the final nn.Linear, whose input is the bottleneck),
`forward(x) -> logits` and `gate_points() -> list[GatePoint]` (where BISE's gates go). `torchvision` and `timm`
wrap any model of those libraries with automatically placed gates (bise_cli.models.auto_gates); `hf` is any
Hugging Face encoder with BERT's layer layout (bise_cli.models.bert).
"""

from __future__ import annotations

from torch import nn

from bise_cli.models.registry import BACKBONES, spec


def build_backbone(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Construct backbone `name` with `num_classes` outputs; kwargs are the backbone's own options (those its
    `BackboneSpec` declares, the rest ignored); a one-line BiseError for an unknown name."""
    backbone = spec(name)
    options = {option: kwargs.get(option, default) for option, default in backbone.options.items()}
    return backbone.function("build")(num_classes=num_classes, **options)


def describe_gates(model: nn.Module) -> list[dict]:
    """Every gate of `model` (any backbone) and the channel groups left ungated: see auto_gates.describe_gates."""
    from bise_cli.models.auto_gates import describe_gates as describe

    return describe(model)


__all__ = ["BACKBONES", "build_backbone", "describe_gates"]
