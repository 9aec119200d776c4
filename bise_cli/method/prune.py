"""Physical pruning: binary unit masks -> a smaller standalone model with the same logits (BISE, CVPR 2026;
README "Loading a pruned model").

Every backbone prunes itself through `pruned_copy(masks)`; the layer slicing they share lives in
`bise_cli.models.slicing`. This module only dispatches to `pruned_copy` and saves and loads the result.

`save_pruned` / `load_pruned` store the architecture name (the class's `arch_name`), its constructor arguments
(plain ints, lists and dicts) and the state dict, so a pruned model loads with `torch.load(..., weights_only=True)`
and without the original model. The name is looked up in `ARCHITECTURES` (the backbone registry's pruned
architectures, bise_cli.models.registry), an explicit map: a checkpoint can only ever name one of these
constructors, never arbitrary code.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from bise_cli.core.files import save_torch
from bise_cli.models.registry import PRUNED
from bise_cli.models.slicing import kept_indices

__all__ = ["ARCHITECTURES", "kept_indices", "load_pruned", "prune_model", "save_pruned"]

# arch_name -> "module:name" of the constructor that rebuilds the architecture from `constructor_kwargs()` before
# load_state_dict: the backbone registry's pruned architectures, imported lazily (BERT needs the optional `text`
# extra, and loading a convnet should not pay for importing transformers).
ARCHITECTURES: dict[str, str] = PRUNED


def prune_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A new, smaller model equal to `model` with its gates fixed to `masks` (the original is untouched).

    `masks` maps every gate name of `model.gate_points()` to a bool tensor with one entry per unit."""
    pruned_copy = getattr(model, "pruned_copy", None)
    if pruned_copy is None:
        raise TypeError(f"{type(model).__name__} has no pruned_copy(masks), so it cannot be physically pruned")
    # A mask of the wrong length would silently keep the wrong units, so every mask is checked first.
    for point in model.gate_points():
        if point.name not in masks:
            raise ValueError(f"no mask for gate {point.name!r}")
        if masks[point.name].numel() != point.units:
            raise ValueError(f"mask {point.name} has {masks[point.name].numel()} units, expected {point.units}")
    return pruned_copy(masks)


def _constructor(arch: str):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown pruned architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    module, _, name = ARCHITECTURES[arch].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:  # e.g. BERT without the `text` extra
        raise ImportError(f"loading a {arch!r} model needs {module}: {error}") from error


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a self-contained checkpoint: {"arch", "kwargs", "state_dict"} (tensors moved to the CPU)."""
    arch = getattr(type(model), "arch_name", None)
    if arch not in ARCHITECTURES:
        raise TypeError(f"cannot save a {type(model).__name__}: only {', '.join(ARCHITECTURES)} can be loaded back")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(path, {"arch": arch, "kwargs": model.constructor_kwargs(), "state_dict": state})


def load_pruned(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Load a model written by `save_pruned` (safe: weights_only=True), in eval mode."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = _constructor(checkpoint["arch"])(**checkpoint["kwargs"])
    if getattr(type(model), "arch_name", None) != checkpoint["arch"]:  # registry and classes out of step
        raise TypeError(f"{ARCHITECTURES[checkpoint['arch']]} built a {type(model).__name__}, "
                        f"not a {checkpoint['arch']!r} model")
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval()
