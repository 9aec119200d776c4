"""Backbone factory: one name -> one constructor, chosen from an explicit map (never from a config string
that could import arbitrary code).

Every backbone is an nn.Module with `classifier` (the final nn.Linear, whose input is the bottleneck),
`forward(x) -> logits` and `gate_points() -> list[GatePoint]` (where BISE's gates go). `torchvision` and `timm`
wrap any model of those libraries with automatically placed gates (bise_cli.models.auto_gates); `hf` is any
Hugging Face encoder with BERT's layer layout (bise_cli.models.bert).
"""

from __future__ import annotations

from torch import nn

from bise_cli.core.errors import check_choice

BACKBONES = ("simple_convnet", "resnet18", "bert", "mlp", "torchvision", "timm", "hf")


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
    if name in ("torchvision", "timm"):
        if name == "torchvision":
            from bise_cli.models.torchvision_net import TorchvisionNet as Net
        else:
            from bise_cli.models.timm_net import TimmNet as Net
        return Net(num_classes=num_classes, arch=kwargs.get("arch", "resnet18"), weights=kwargs.get("weights"),
                   input_size=kwargs.get("input_size", (3, 224, 224)),
                   residual_gates=kwargs.get("residual_gates", "per_block"))
    # Imported lazily: transformers is an optional extra and slow to import.
    from bise_cli.models.bert import BertClassifier
    default = "tiny" if name == "bert" else "minilm"
    return BertClassifier(num_classes=num_classes, pretrained=kwargs.get("pretrained", default),
                          config_overrides=kwargs.get("config_overrides"))


def describe_gates(model: nn.Module) -> list[dict]:
    """Every gate of `model` (any backbone) and the channel groups left ungated: see auto_gates.describe_gates."""
    from bise_cli.models.auto_gates import describe_gates as describe

    return describe(model)
