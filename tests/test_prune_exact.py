"""Pruned model == gated model, for every backbone: BISE's physical pruning removes units whose gates are off,
and the result must give the gated model's logits (BISE, CVPR 2026; README "Loading a pruned model").

Parametrised over the backbone registry (bise_cli.models.registry), as timm's tests are over its model list: each
spec's `example` is the model tested and `example_input` its input, so a backbone added to the registry is tested
without an edit here.
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

from bise_cli.method.prune import ARCHITECTURES, load_pruned, prune_model, save_pruned
from bise_cli.method.train import freeze
from bise_cli.models import build_backbone
from bise_cli.models.registry import BACKBONES, spec

from conftest import param_count, prune_and_compare, randomise_norms


def _example(name: str) -> torch.nn.Module:
    """The registry's small random model of backbone `name` (skipped when its optional extra is missing)."""
    backbone = spec(name)
    if backbone.extra:
        pytest.importorskip(backbone.extra)
    return build_backbone(name, **backbone.example)


def _input(name: str) -> torch.Tensor:
    backbone = spec(name)
    x = backbone.example_input(3 if backbone.input_kind == "tokens" else 2)
    if backbone.input_kind == "tokens":
        x[1, 1, 5:] = 0  # padded positions
    return x


MASK_CASES = ["random", "middle_emptied", "last_emptied", "one_left", "all_kept"]


@functools.cache
def _frozen_model(name: str) -> torch.nn.Module:
    """One frozen random model per backbone, built once (ResNet-18's init dominates the runtime); tests use a
    deep copy so that a failing case cannot leave gates attached for the next one."""
    torch.manual_seed(0)
    model = freeze(_example(name))
    randomise_norms(model, torch.Generator().manual_seed(1))
    return model


def _masks(points, case: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    masks = {p.name: torch.rand(p.units, generator=generator) > 0.5 for p in points}
    if case == "middle_emptied":
        masks[points[len(points) // 2].name][:] = False
    elif case == "last_emptied":  # the consumer is the classifier
        masks[points[-1].name][:] = False
    elif case == "one_left":
        for p in points:
            masks[p.name] = torch.zeros(p.units, dtype=torch.bool)
            masks[p.name][p.units // 2] = True
    elif case == "all_kept":
        masks = {p.name: torch.ones(p.units, dtype=torch.bool) for p in points}
    return masks


# The GPU check (benchmarks/gpu_check.sh) runs these on CUDA with BISE_TEST_DEVICE=cuda; TF32 is switched off
# there because TF32 convolutions and matmuls differ between the gated and the sliced model by about 1e-3.
DEVICE = torch.device(os.environ.get("BISE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("name", BACKBONES)
def test_pruned_equals_gated(name, case, tmp_path):
    model = copy.deepcopy(_frozen_model(name)).to(DEVICE)
    torch.manual_seed(3)
    x = _input(name).to(DEVICE)
    pruned, out = prune_and_compare(model, x, lambda points: _masks(points, case, torch.Generator().manual_seed(2)),
                                    case == "all_kept", DEVICE)

    save_pruned(pruned, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", map_location=str(DEVICE))
    assert type(loaded) is type(pruned) and param_count(loaded) == param_count(pruned)
    assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_pruned_architecture_is_registered(name):
    model = _frozen_model(name)
    pruned = prune_model(model, {p.name: torch.ones(p.units, dtype=torch.bool) for p in model.gate_points()})
    assert type(pruned).arch_name == spec(name).pruned_arch and type(pruned).arch_name in ARCHITECTURES
    assert spec(name).function("pruned")(**pruned.constructor_kwargs()).__class__ is type(pruned)


def test_prune_model_rejects_bad_inputs():
    with pytest.raises(TypeError, match="no pruned_copy"):
        prune_model(torch.nn.Linear(2, 2), {})
    model = build_backbone("simple_convnet", 10, width=0.25)
    masks = {p.name: torch.ones(p.units, dtype=torch.bool) for p in model.gate_points()}
    with pytest.raises(ValueError, match="expected 4"):
        prune_model(model, {**masks, "block0": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no mask"):
        prune_model(model, {k: v for k, v in masks.items() if k != "block1"})


def test_save_and_load_refuse_unknown_architectures(tmp_path):
    with pytest.raises(TypeError, match="cannot save"):
        save_pruned(_frozen_model("resnet18"), tmp_path / "dense.pt")  # a dense ResNet18: prune it first
    torch.save({"arch": "os.system", "kwargs": {}, "state_dict": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="unknown pruned architecture"):
        load_pruned(tmp_path / "evil.pt")
