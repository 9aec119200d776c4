"""Backbone factory: one name -> one constructor, chosen from an explicit map (never from a config string
that could import arbitrary code).

Every backbone is an nn.Module with `classifier` (the final nn.Linear, whose input is the bottleneck),
`forward(x) -> logits` and `gate_points() -> list[GatePoint]` (where BISE's gates go).
"""

from __future__ import annotations

from torch import nn

from bise_cli.errors import check_choice

BACKBONES = ("simple_convnet", "resnet18", "bert", "mlp")


def build_backbone(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Construct backbone `name` with `num_classes` outputs; kwargs are the backbone's own options."""
    check_choice("backbone", name, BACKBONES)
    if name == "simple_convnet":
        from bise_cli.models.simple_convnet import SimpleConvNet
        return SimpleConvNet(num_classes=num_classes, width=kwargs.get("width", 1.0))
    if name == "resnet18":
        from bise_cli.models.resnet18 import ResNet18
        return ResNet18(num_classes=num_classes, weights=kwargs.get("weights"))
    if name == "mlp":
        from bise_cli.models.mlp import MLP
        return MLP(num_classes=num_classes, double_scale=kwargs.get("double_scale", True))
    # Imported lazily: transformers is an optional extra and slow to import.
    from bise_cli.models.bert import BertClassifier
    return BertClassifier(num_classes=num_classes, pretrained=kwargs.get("pretrained", "tiny"),
                          config_overrides=kwargs.get("config_overrides"))
