"""The backbone registry: one `BackboneSpec` per backbone, the one place a backbone is declared.

Everything else derives from `SPECS`: the names `backbone=` accepts and the factory (`build_backbone` in
models/__init__.py), the pruned architectures a checkpoint may name (`PRUNED`, read by method/prune.py: a
checkpoint can only ever name one of these constructors, never arbitrary code), and the test matrix
(tests/test_prune_exact.py builds every spec's `example` and checks pruned == gated, as timm's registry feeds its
tests, so a new backbone is covered without touching the tests). Constructors are named as "module:name" and
imported only when used: BERT needs the optional `text` extra, timm the `timm` extra, and building a convnet
should not pay for importing transformers.

Adding a backbone:
  1. write its module: an nn.Module with `classifier` (the final nn.Linear), `forward(x) -> logits`,
     `gate_points()` and `pruned_copy(masks)`, whose pruned model has a class attribute `arch_name` and a
     `constructor_kwargs()` (models/base.py);
  2. add its `BackboneSpec` to `SPECS` below: the options its YAML may set with their defaults, its pruned
     architecture's name and constructor, and a small random example;
  3. add conf/backbone/<name>.yaml with a comment per option (tests/test_configs.py checks that every YAML has a
     spec, every spec a YAML, and that every key of the YAML is one of the spec's options).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from bise_cli.core.errors import check_choice


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it dense and pruned, and a small random example for the tests."""

    name: str                        # as in `backbone=<name>` (conf/backbone/<name>.yaml)
    build: str                       # "module:Class", called as Class(num_classes=..., **options)
    options: dict = field(default_factory=dict)  # what `backbone.<option>` may set -> its default; the config's
    #                                              other keys (`name`) are not the constructor's
    pruned_arch: str = ""            # the pruned model's `arch_name`, stored in its checkpoint
    pruned: str = ""                 # "module:name" that rebuilds the pruned model from its constructor_kwargs()
    example: dict = field(default_factory=dict)  # num_classes and options of a small random model (tests)
    input_kind: str = "image"        # "image": float (B, C, H, W); "tokens": bise's (B, 3, L) token batches
    input_size: tuple[int, ...] = ()  # the example input without the batch: (C, H, W), or (L,) for tokens
    extra: str | None = None         # the optional package it needs (tests skip it when that is not installed)

    def function(self, which: str = "build"):
        """The dense (`build`) or pruned (`pruned`) constructor, imported on first use."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)

    def example_input(self, batch: int):
        """A random input batch of the example's shape (tokens with a full attention mask)."""
        import torch

        if self.input_kind == "tokens":
            from bise_cli.models.bert import example_input

            return example_input(batch, *self.input_size)
        return torch.randn(batch, *self.input_size)


# The automatic-gates wrappers share their options: any model of the library, traced at `input_size`.
_AUTO_OPTIONS = {"arch": "resnet18", "weights": None, "input_size": (3, 224, 224), "residual_gates": "per_block"}

SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec("simple_convnet", "bise_cli.models.simple_convnet:SimpleConvNet", {"width": 1.0},
                 pruned_arch="simple_convnet", pruned="bise_cli.models.simple_convnet:SimpleConvNet",
                 example={"num_classes": 10, "width": 0.25}, input_size=(3, 28, 28)),
    BackboneSpec("resnet18", "bise_cli.models.resnet18:ResNet18", {"weights": None},
                 pruned_arch="pruned_resnet18", pruned="bise_cli.models.resnet18:PrunedResNet18",
                 example={"num_classes": 10, "weights": None}, input_size=(3, 32, 32)),
    BackboneSpec("bert", "bise_cli.models.bert:BertClassifier", {"pretrained": "tiny", "config_overrides": None},
                 pruned_arch="pruned_bert", pruned="bise_cli.models.bert:PrunedBert",
                 example={"num_classes": 2, "pretrained": "tiny"}, input_kind="tokens", input_size=(8,),
                 extra="transformers"),
    BackboneSpec("mlp", "bise_cli.models.mlp:MLP", {"double_scale": True},
                 pruned_arch="mlp", pruned="bise_cli.models.mlp:MLP",
                 example={"num_classes": 10}, input_size=(3, 28, 28)),
    # Automatic gates (bise_cli.models.auto_gates); every family they support is covered in
    # tests/test_auto_gates.py, the examples here are one small model each.
    BackboneSpec("torchvision", "bise_cli.models.torchvision_net:TorchvisionNet", _AUTO_OPTIONS,
                 pruned_arch="pruned_torchvision", pruned="bise_cli.models.torchvision_net:PrunedTorchvision",
                 example={"num_classes": 10, "arch": "mobilenet_v3_small", "input_size": [3, 32, 32]},
                 input_size=(3, 32, 32)),
    BackboneSpec("timm", "bise_cli.models.timm_net:TimmNet", _AUTO_OPTIONS,
                 pruned_arch="pruned_timm", pruned="bise_cli.models.timm_net:PrunedTimm",
                 example={"num_classes": 10, "arch": "test_efficientnet", "input_size": [3, 32, 32]},
                 input_size=(3, 32, 32), extra="timm"),
    # Any Hugging Face encoder with BERT's layer layout; the example is a tiny random RoBERTa (its non-BERT
    # layout: pooler = classifier.dense, head = out_proj).
    BackboneSpec("hf", "bise_cli.models.bert:BertClassifier", {"pretrained": "minilm", "config_overrides": None},
                 pruned_arch="pruned_bert", pruned="bise_cli.models.bert:PrunedBert",
                 example={"num_classes": 2, "pretrained": "tiny", "config_overrides": {"model_type": "roberta"}},
                 input_kind="tokens", input_size=(8,), extra="transformers"),
)

BACKBONES: tuple[str, ...] = tuple(s.name for s in SPECS)
# arch_name -> "module:name" of its constructor; backbones that share a pruned architecture (bert, hf) share it.
PRUNED: dict[str, str] = {s.pruned_arch: s.pruned for s in SPECS}


def spec(name: str) -> BackboneSpec:
    """The spec of backbone `name`; a one-line BiseError naming the allowed ones for an unknown name."""
    check_choice("backbone", name, BACKBONES)
    return next(s for s in SPECS if s.name == name)
