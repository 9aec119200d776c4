"""Pruned model == gated model, for every backbone: BISE's physical pruning removes units whose gates are off,
and the result must give the gated model's logits (BISE, CVPR 2026; README "Loading a pruned model").

Parametrised over the backbone list, as timm's tests are over its model list: a backbone added to
`bise_cli.models.BACKBONES` without an entry in `CASES` fails `test_every_backbone_has_an_exactness_case`.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch

from bise_cli.method.prune import ARCHITECTURES, load_pruned, prune_model, save_pruned
from bise_cli.method.train import freeze
from bise_cli.models import BACKBONES, build_backbone

from conftest import param_count, prune_and_compare


def _tokens() -> torch.Tensor:
    from bise_cli.models.bert import example_input

    x = example_input(3, 8)
    x[1, 1, 5:] = 0  # padded positions
    return x


def _bert():
    pytest.importorskip("transformers")
    return build_backbone("bert", 2, pretrained="tiny")


def _hf():
    pytest.importorskip("transformers")
    # A tiny random RoBERTa: the hf backbone's non-BERT layout (pooler = classifier.dense, head = out_proj).
    return build_backbone("hf", 2, pretrained="tiny", config_overrides={"model_type": "roberta"})


def _timm():
    pytest.importorskip("timm")
    return build_backbone("timm", 10, arch="test_efficientnet", input_size=[3, 32, 32])


# backbone name -> (builder of a small random model, builder of an input batch)
CASES = {
    "simple_convnet": (lambda: build_backbone("simple_convnet", 10, width=0.25), lambda: torch.randn(2, 3, 28, 28)),
    "resnet18": (lambda: build_backbone("resnet18", 10, weights=None), lambda: torch.randn(2, 3, 32, 32)),
    "bert": (_bert, _tokens),
    "mlp": (lambda: build_backbone("mlp", 10), lambda: torch.rand(2, 3, 28, 28)),
    # Automatic gates; every family they support is covered in tests/test_auto_gates.py.
    "torchvision": (lambda: build_backbone("torchvision", 10, arch="mobilenet_v3_small", input_size=[3, 32, 32]),
                    lambda: torch.randn(2, 3, 32, 32)),
    "timm": (_timm, lambda: torch.randn(2, 3, 32, 32)),
    "hf": (_hf, _tokens),
}
# The MLP backbone is being added separately; it is tested as soon as its module exists.
TESTED = [name for name in CASES if name != "mlp" or importlib.util.find_spec("bise_cli.models.mlp") is not None]
MASK_CASES = ["random", "middle_emptied", "last_emptied", "one_left", "all_kept"]


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move 1-d parameters (norm scales, biases) and BN statistics away from their init values, so that a
    mis-sliced BatchNorm or LayerNorm cannot hide behind weight 1, bias 0, mean 0, variance 1."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                noise = 0.2 * torch.randn(param.shape, generator=generator)
                param.copy_(noise + (1.0 if name.endswith("weight") else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


@functools.cache
def _frozen_model(name: str) -> torch.nn.Module:
    """One frozen random model per backbone, built once (ResNet-18's init dominates the runtime); tests use a
    deep copy so that a failing case cannot leave gates attached for the next one."""
    torch.manual_seed(0)
    model = freeze(CASES[name][0]())
    _randomise_norms(model, torch.Generator().manual_seed(1))
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


def test_every_backbone_has_an_exactness_case():
    missing = set(BACKBONES) - set(CASES)
    assert not missing, f"backbones without a pruned == gated test case in tests/test_prune_exact.py: {missing}"


# The GPU check (benchmarks/gpu_check.sh) runs these on CUDA with BISE_TEST_DEVICE=cuda; TF32 is switched off
# there because TF32 convolutions and matmuls differ between the gated and the sliced model by about 1e-3.
DEVICE = torch.device(os.environ.get("BISE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("name", TESTED)
def test_pruned_equals_gated(name, case, tmp_path):
    model = copy.deepcopy(_frozen_model(name)).to(DEVICE)
    torch.manual_seed(3)
    x = CASES[name][1]().to(DEVICE)
    pruned, out = prune_and_compare(model, x, lambda points: _masks(points, case, torch.Generator().manual_seed(2)),
                                    case == "all_kept", DEVICE)

    save_pruned(pruned, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", map_location=str(DEVICE))
    assert type(loaded) is type(pruned) and param_count(loaded) == param_count(pruned)
    assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("name", TESTED)
def test_every_pruned_architecture_is_registered(name):
    model = _frozen_model(name)
    pruned = prune_model(model, {p.name: torch.ones(p.units, dtype=torch.bool) for p in model.gate_points()})
    assert type(pruned).arch_name in ARCHITECTURES


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
