"""Automatic gates (bise_cli.models.auto_gates, Torch-Pruning's DepGraph): for torchvision, timm and Hugging Face
families, pruned logits == gated logits (BISE, CVPR 2026), the removable gates really shrink the model, pruned
checkpoints load back, `describe_gates` lists every gate, residual streams are gated at each block's output as
the paper's ResNet-18 (the automatic torchvision ResNet-18 is the hand-written one, gate for gate and logit for
logit), and a switched-off stream unit is zero after every block.

Random weights only (nothing is downloaded), 32x32 inputs, BatchNorm/LayerNorm parameters and statistics moved
away from their init values so that a mis-sliced normalisation cannot hide.
"""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.method.prune import ARCHITECTURES, load_pruned, prune_model, save_pruned
from bise_cli.method.train import freeze
from bise_cli.models import build_backbone, describe_gates
from bise_cli.models.auto_gates import AutoGatedNet, KeptInput, PrunedAutoNet
from bise_cli.models.masking import GatePoint, GateSet
from bise_cli.reporting.efficiency import count_macs

from conftest import param_count, prune_and_compare, randomise_norms


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _tokens() -> torch.Tensor:
    from bise_cli.models.bert import example_input

    torch.manual_seed(3)
    x = example_input(2, 8)
    x[1, 1, 5:] = 0  # padded positions
    return x


def _vision(library: str, arch: str, **options):
    if library == "timm":
        pytest.importorskip("timm")
    return lambda: build_backbone(library, 10, arch=arch, input_size=[3, 32, 32], **options)


def _hf():
    pytest.importorskip("transformers")
    return build_backbone("hf", 2, pretrained="tiny")


# family -> (builder, input)
FAMILIES = {
    "resnet18": (_vision("torchvision", "resnet18"), _image),
    "resnet50": (_vision("torchvision", "resnet50"), _image),
    "mobilenet_v3_small": (_vision("torchvision", "mobilenet_v3_small"), _image),
    "efficientnet_b0": (_vision("torchvision", "efficientnet_b0"), _image),
    "convnext_tiny": (_vision("torchvision", "convnext_tiny"), _image),
    "resnet18_shared": (_vision("torchvision", "resnet18", residual_gates="shared"), _image),
    "timm_resnet18": (lambda: _vision("timm", "resnet18")(), _image),
    "hf_tiny_bert": (_hf, _tokens),
}
MASK_CASES = ["all_kept", "random", "one_left", "emptied", "removable_only"]


@functools.cache
def _frozen(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = freeze(FAMILIES[family][0]())
    randomise_norms(model, torch.Generator().manual_seed(1))
    return model


def _masks(points: list[GatePoint], case: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    masks = {p.name: torch.rand(p.units, generator=generator) > 0.5 for p in points}
    if case == "all_kept":
        return {p.name: torch.ones(p.units, dtype=torch.bool) for p in points}
    if case == "one_left":
        for p in points:
            masks[p.name] = torch.zeros(p.units, dtype=torch.bool)
            masks[p.name][p.units // 2] = True
    elif case == "emptied":  # a whole removable gate and a whole masked one (where the family has them)
        for removable in (True, False):
            chosen = [p for p in points if p.removable == removable]
            if chosen:
                masks[chosen[len(chosen) // 2].name][:] = False
    elif case == "removable_only":
        masks.update({p.name: torch.ones(p.units, dtype=torch.bool) for p in points if not p.removable})
    return masks


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_equals_gated(family, case, tmp_path):
    model = copy.deepcopy(_frozen(family))
    x = FAMILIES[family][1]()
    with torch.no_grad():
        pruned, out = prune_and_compare(model, x, lambda points: _masks(points, case), case == "all_kept")
    if case == "removable_only" and family != "hf_tiny_bert":
        # Removable gates alone shrink the model everywhere, without any reader reading a subset.
        assert not any(isinstance(m, KeptInput) for m in pruned.modules())
        assert count_macs(pruned, x[:1]) < count_macs(model, x[:1])
    if case == "emptied":  # dummy units, random masks elsewhere: the round trip re-applies all of it
        save_pruned(pruned, tmp_path / "pruned.pt")
        loaded = load_pruned(tmp_path / "pruned.pt")
        assert type(loaded) is type(pruned) and param_count(loaded) == param_count(pruned)
        with torch.no_grad():
            assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_describe_gates_lists_every_gate(family):
    model = _frozen(family)
    rows = describe_gates(model)
    gated = [r for r in rows if r["status"] != "ungated"]
    points = model.gate_points()
    assert [r["name"] for r in gated] == [p.name for p in points]
    for row, point in zip(gated, points, strict=True):
        assert row["units"] == point.units and row["also"] == list(point.also)
        assert row["status"] == ("removed" if point.removable else "masked-not-removed")
        assert point.removable or row["reason"]
        producer = model.get_submodule(row["producer"])  # magnitude pruning reads its weight rows
        assert producer.weight.shape[0] == point.units
    assert all(r["reason"] for r in rows if r["status"] == "ungated")
    if family != "hf_tiny_bert":  # the logits are never gated, and the ungated list says so
        assert any("logits" in r["reason"] for r in rows if r["status"] == "ungated")


def test_gate_counts_at_32x32():
    """The paper's ResNet-18 gates, found automatically: block-internal channels removable (1920 units), each
    block's output on the residual stream masked-not-removed (1920 units); the stem and the classifier are not
    gated, and the classifier reads only the channels the last block keeps."""
    model = _frozen("resnet18")
    points = model.gate_points()
    assert len(points) == 16 and sum(p.units for p in points) == 3840
    assert sum(p.units for p in points if p.removable) == 2 * (64 + 128 + 256 + 512)
    masked = [p for p in points if not p.removable]
    assert [(p.module, p.where) for p in masked] == [(f"net.layer{s}.{i}", "output") for s in (1, 2, 3, 4)
                                                      for i in (0, 1)]
    assert model.plan.covered["layer4.1.out"] == [("fc", 1)]
    assert model.plan.covered["layer2.0.out"] == [("layer2.1.conv1", 1)]
    assert model.plan.covered["layer1.1.out"] == [("layer2.0.conv1", 1), ("layer2.0.downsample.0", 1)]
    ungated = {row["module"]: row["reason"] for row in model.ungated_groups()}
    assert "before its first block output" in ungated["net.layer1.0.conv1"]  # the stem's output, as the paper
    assert all(p.removable for p in _frozen("resnet18_shared").gate_points())
    # Squeeze-excitation: one gate on the expansion, read by the SE block's first conv and the projection.
    mobile = {p.name: p for p in _frozen("mobilenet_v3_small").gate_points()}
    expansion = mobile["features.4.block.0.0.out"]
    assert expansion.removable and expansion.module.endswith("block.2.fc1") and expansion.also[0].endswith("3.0")


def _gate_masks(points: list[GatePoint], pattern: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks by position: all_on, half (every other unit), random, or `off:<gate index>` (that gate all off)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for index, p in enumerate(points):
        if pattern == "half":
            masks[p.name] = torch.arange(p.units) % 2 == 0
        elif pattern == "random":
            masks[p.name] = torch.rand(p.units, generator=generator) > 0.5
        else:
            masks[p.name] = torch.ones(p.units, dtype=torch.bool)
            if pattern == f"off:{index}":
                masks[p.name][:] = False
    return masks


def _gated(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    gates = GateSet(model.gate_points()).attach(model)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    try:
        with torch.no_grad():
            return model(x)
    finally:
        gates.detach()


def test_automatic_resnet18_is_the_papers_resnet18():
    """backbone=torchvision arch=resnet18 and the hand-written backbone=resnet18 (BISE's ResNet-18), with the same
    weights: the same 16 gates at the same places (3,840 units) and the same gated and pruned logits."""
    torch.manual_seed(0)
    hand = freeze(build_backbone("resnet18", 10, weights=None))
    randomise_norms(hand, torch.Generator().manual_seed(1))
    auto = copy.deepcopy(_frozen("resnet18"))
    auto.net.load_state_dict(hand.net.state_dict())
    hand_points, auto_points = hand.gate_points(), auto.gate_points()

    def places(points):
        return [(p.module, p.where, p.units, p.dim, p.removable, p.producer, p.also) for p in points]

    assert places(auto_points) == places(hand_points)
    assert len(auto_points) == 16 and sum(p.units for p in auto_points) == 3840
    x = _image()
    with torch.no_grad():
        assert torch.equal(auto(x), hand(x))
    block_outputs = [i for i, p in enumerate(hand_points) if p.where == "output"]
    patterns = ["all_on", "half", f"off:{block_outputs[3]}", f"off:{block_outputs[4]}", "random"]
    for pattern, seed in [(p, 0) for p in patterns] + [("random", 1)]:
        hand_masks = _gate_masks(hand_points, pattern, seed)
        auto_masks = {a.name: hand_masks[h.name] for a, h in zip(auto_points, hand_points, strict=True)}
        gated = _gated(hand, hand_masks, x)
        torch.testing.assert_close(_gated(auto, auto_masks, x), gated, rtol=0, atol=1e-6)
        if pattern in ("half", f"off:{block_outputs[4]}") or seed == 1:  # pruning traces the model: a few cases
            with torch.no_grad():
                pruned_hand, pruned_auto = hand.pruned_copy(hand_masks)(x), auto.pruned_copy(auto_masks)(x)
            torch.testing.assert_close(pruned_auto, gated, rtol=0, atol=1e-5)
            torch.testing.assert_close(pruned_hand, gated, rtol=0, atol=1e-5)
        if pattern.startswith("off"):  # a whole block output switched off changes the function
            assert (gated - hand(x)).abs().max() > 1e-3


def _residual_blocks(model: nn.Module) -> set[str]:
    """The residual blocks of a torchvision or timm model, from the libraries' own classes and flags."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    kinds = [BasicBlock, Bottleneck, CNBlock]
    if "timm" in sys.modules:
        from timm.models import resnet as timm_resnet
        kinds += [timm_resnet.BasicBlock, timm_resnet.Bottleneck]
    return {name for name, m in model.named_modules()
            if isinstance(m, tuple(kinds)) or getattr(m, "use_res_connect", False) is True}


# family -> number of residual blocks (each gets one stream gate on its output)
STREAM_FAMILIES = {"resnet18": 8, "resnet50": 16, "mobilenet_v3_small": 6, "efficientnet_b0": 9,
                   "convnext_tiny": 18, "timm_resnet18": 8}


@pytest.mark.parametrize("family", list(STREAM_FAMILIES))
def test_switched_off_stream_units_are_zero_after_every_block(family):
    """Each residual block's output is gated (after the addition and the final activation): a switched-off
    stream unit is exactly zero there, on every path (identity shortcuts included), and in every layer that reads
    the gated stream; pruned == gated with a whole block output switched off."""
    model = copy.deepcopy(_frozen(family))
    points = model.gate_points()
    streams = [p for p in points if p.where == "output"]
    assert {p.module for p in streams} == _residual_blocks(model) and len(streams) == STREAM_FAMILIES[family]
    assert not any(p.removable for p in streams)
    masks = _masks(points, "random")
    masks[streams[len(streams) // 2].name][:] = False
    gates = GateSet(points).attach(model)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p.module).register_forward_hook(  # after the gate's hook: sees the gated output
        lambda _m, _args, out, name=p.name: seen.__setitem__(name, out)) for p in streams]
    read = []
    for gate, readers in model.plan.covered.items():
        for reader, dim in readers:
            handles.append(model.net.get_submodule(reader).register_forward_pre_hook(
                lambda _m, args, gate=gate, dim=dim: read.append((gate, dim, args[0]))))
    x = _image()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    gates.detach()
    for p in streams:
        off, out = ~masks[p.name], seen[p.name]
        assert out.index_select(p.dim, off.nonzero().flatten()).abs().max() == 0
        if not off.all():
            assert out.index_select(p.dim, (~off).nonzero().flatten()).abs().max() > 0
    assert len(read) == sum(len(readers) for readers in model.plan.covered.values())
    assert all(t.index_select(dim, (~masks[gate]).nonzero().flatten()).abs().max() == 0
                        for gate, dim, t in read if not masks[gate].all())
    with torch.no_grad():
        prune_and_compare(model, x, lambda _points: masks, all_kept=False)


def test_a_checkpoint_pruned_with_other_gates_is_refused():
    from bise_cli.models.torchvision_net import PrunedTorchvision

    model = _frozen("resnet18")
    spec = prune_model(model, _masks(model.gate_points(), "random")).constructor_kwargs()
    assert type(PrunedTorchvision(**spec)).__name__ == "PrunedTorchvisionNet"
    masks = dict(spec["masks"])
    masks["layer1.0.conv1.in"] = masks.pop("layer1.0.out")  # a gate of the earlier per-reader layout
    with pytest.raises(BiseError, match="prune the dense model again"):
        PrunedTorchvision(**{**spec, "masks": masks})


def test_builtin_backbones_are_described_from_gate_points():
    model = build_backbone("simple_convnet", 10, width=0.25)
    rows = describe_gates(model)
    assert [r["name"] for r in rows] == [p.name for p in model.gate_points()]
    assert all(r["status"] == "removed" for r in rows)


def test_features_are_the_classifier_input():
    model = _frozen("mobilenet_v3_small")
    x = _image()
    with torch.no_grad():
        z = model.features(x)
        assert z.shape == (2, model.classifier.in_features)
        assert torch.allclose(model.classifier(z), model(x))


def test_fine_tuning_with_fixed_gates_keeps_pruned_units_silent():
    """Train mode (BatchNorm on batch statistics), trainable weights, fixed gates: autograd works through the
    hooks, pruned channels get no gradient, and after a step pruning is still exact."""
    model = copy.deepcopy(_frozen("mobilenet_v3_small"))
    for p in model.parameters():
        p.requires_grad_(True)
    gates = GateSet(model.gate_points()).attach(model)
    masks = _masks(gates.points, "random")
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    point = next(p for p in gates.points if p.removable and not masks[p.name].all())
    grad = model.get_submodule(point.producer).weight.grad
    assert grad[~masks[point.name]].abs().max() == 0 and grad[masks[point.name]].abs().max() > 0
    optimizer.step()
    freeze(model)
    with torch.no_grad():
        gated = model(x)
        gates.detach()
        assert (prune_model(model, masks)(x) - gated).abs().max() <= 1e-5


class ChannelSoftmax(nn.Module):
    """Mixes channels, but Torch-Pruning sees an element-wise op."""

    def forward(self, x):
        return torch.softmax(x, dim=1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
        self.mix = ChannelSoftmax()
        self.fc = nn.Linear(8, 1000)

    def forward(self, x):
        x = self.conv3(self.mix(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class TinyAuto(AutoGatedNet):
    def __init__(self, num_classes=10, arch="tiny", weights=None, input_size=(3, 16, 16),
                 residual_gates="per_block", verify=True, force_masked=()):
        super().__init__(TinyNet(), num_classes, input_size, residual_gates, spec={"arch": arch}, family="tiny",
                         verify=verify, force_masked=force_masked)


class PrunedTiny(PrunedAutoNet):
    arch_name = "pruned_tiny"


TinyAuto.pruned_class = PrunedTiny


def test_your_own_model_and_the_exactness_check(monkeypatch, caplog):
    """A plain nn.Module gets gates too; an op misjudged as per-channel (here: softmax over channels, declared
    per-channel on purpose) is caught by the construction-time check and its group demoted."""
    from bise_cli.models import gate_plan

    torch.manual_seed(0)
    honest = TinyAuto()
    assert {p.name: p.removable for p in honest.gate_points()} == {
        "conv1.out": True, "conv3.in": False, "conv3.out": True}  # after the softmax: masked, not removed
    monkeypatch.setattr(gate_plan, "PER_CHANNEL_OPS", gate_plan.PER_CHANNEL_OPS | {"softmax"})
    torch.manual_seed(0)
    model = freeze(TinyAuto())
    assert "failed the exactness check" in caplog.text
    demoted = next(p for p in model.gate_points() if p.name == "conv3.in")
    assert not demoted.removable and model.spec["force_masked"] == ["conv2"]
    masks = {p.name: torch.arange(p.units) % 2 == 0 for p in model.gate_points()}
    x = torch.randn(2, 3, 16, 16)
    gates = GateSet(model.gate_points()).attach(model)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    with torch.no_grad():
        gated = model(x)
        gates.detach()
        assert (model.pruned_copy(masks)(x) - gated).abs().max() <= 1e-5


def test_the_float64_check_used_on_cuda_returns_a_float32_model(monkeypatch):
    from bise_cli.models import auto_gates

    torch.manual_seed(0)
    model = freeze(TinyAuto())
    masks = {p.name: torch.arange(p.units) % 3 != 0 for p in model.gate_points()}
    reference = model.pruned_copy(masks)
    monkeypatch.setattr(auto_gates, "check_in_float64", lambda device: True)
    pruned = model.pruned_copy(masks)
    assert {p.dtype for p in pruned.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned(x), reference(x))


def test_gate_point_also_hooks_every_listed_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3))
    point = GatePoint("g", "1", 4, where="input", dim=-1, also=("2",))
    gates = GateSet([point]).attach(model)
    gates.load_binary_masks({"g": torch.tensor([True, False, True, False])})
    seen = []
    for name in ("1", "2"):
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    x = torch.ones(1, 4)
    model[1](x), model[2](x)
    assert [s.tolist() for s in seen] == [[[1.0, 0.0, 1.0, 0.0]]] * 2
    gates.detach()
    assert len(model[1]._forward_pre_hooks) == len(model[2]._forward_pre_hooks) == 1  # only the test's own


def test_unknown_names_and_bad_options_are_one_line_errors(monkeypatch):
    with pytest.raises(BiseError, match="close names: resnet18"):
        build_backbone("torchvision", 10, arch="resnet19")
    with pytest.raises(BiseError, match="residual_gates"):
        build_backbone("torchvision", 10, arch="resnet18", input_size=[3, 32, 32], residual_gates="nope")
    with pytest.raises(BiseError, match="no final nn.Linear"):
        build_backbone("torchvision", 10, arch="squeezenet1_0", input_size=[3, 64, 64])
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    with pytest.raises(BiseError, match=r"pip install -e '\.\[timm\]'"):
        build_backbone("timm", 10, arch="resnet18")


def test_hf_rejects_other_layouts():
    pytest.importorskip("transformers")
    with pytest.raises(BiseError, match="model type 'distilbert' is not supported"):
        build_backbone("hf", 2, pretrained="tiny", config_overrides={"model_type": "distilbert"})


def test_weights_from_a_file(tmp_path):
    import torchvision

    torch.manual_seed(5)
    source = torchvision.models.resnet18()  # ImageNet-style: a 1000-class head
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    model = build_backbone("torchvision", 10, arch="resnet18", weights=str(tmp_path / "resnet18.pt"),
                           input_size=[3, 32, 32])
    assert torch.equal(model.net.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert model.classifier.out_features == 10
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    model = build_backbone("torchvision", 10, arch="resnet18", weights=str(tmp_path / "resnet18.safetensors"),
                           input_size=[3, 32, 32])
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    broken = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.1.")}
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    # 12 keys of layer4.1 are gone; its two BatchNorm num_batches_tracked are optional (PyTorch fills them in)
    with pytest.raises(BiseError, match=r"missing keys 10 \(layer4\.1\.bn1\..*unexpected keys 1 \(extra\.weight\)"):
        build_backbone("torchvision", 10, arch="resnet18", weights=str(tmp_path / "broken.pt"),
                       input_size=[3, 32, 32])


def test_dense_models_are_not_checkpoints_and_pruned_ones_are_registered(tmp_path):
    model = _frozen("resnet18")
    with pytest.raises(TypeError, match="cannot save"):
        save_pruned(model, tmp_path / "dense.pt")
    pruned = prune_model(model, {p.name: torch.ones(p.units, dtype=torch.bool) for p in model.gate_points()})
    assert type(pruned).arch_name in ARCHITECTURES
    assert pruned.constructor_kwargs()["arch"] == "resnet18"
