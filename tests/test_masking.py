"""Gates: exact vanilla at init, hard forward, straight-through backward, modes, attach/detach."""

from __future__ import annotations

import pytest
import torch

from bise_cli.method.train import freeze
from bise_cli.models import build_backbone
from bise_cli.models.masking import Gate, GateSet, capture_input, unit_sparsity


@pytest.mark.parametrize("name", ["simple_convnet", "resnet18"])
def test_gates_at_init_reproduce_vanilla_logits_exactly(name):
    torch.manual_seed(0)
    model = freeze(build_backbone(name, 10, width=0.5))
    x = torch.randn(3, 3, 28, 28)
    reference = model(x)
    gates = GateSet(model.gate_points(), init=0.0).attach(model)
    assert torch.equal(model(x), reference)
    gates.detach()
    assert torch.equal(model(x), reference)


def test_gate_counts_match_the_paper():
    assert sum(p.units for p in build_backbone("simple_convnet", 10).gate_points()) == 240
    assert sum(p.units for p in build_backbone("resnet18", 10).gate_points()) == 3840


def test_hard_forward_and_straight_through_gradient():
    gate = Gate(4, dim=1)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-1.0, -0.0, 0.3, 2.0]))
    gate.tau = 0.5
    h = torch.ones(2, 4)
    out = gate.apply(h)
    assert out.tolist() == [[0.0, 1.0, 1.0, 1.0]] * 2  # 1[m >= 0]; -0.0 >= 0 counts as kept
    out.sum().backward()
    s = torch.sigmoid(gate.logits.detach() / 0.5)
    expected = 2 * s * (1 - s) / 0.5  # two rows of h = 1, derivative sigmoid'(m / tau) / tau
    assert torch.allclose(gate.logits.grad, expected)


def test_pruned_units_still_get_gradient_and_fixed_mode_has_none():
    gate = Gate(2, init=-1.0)
    h = torch.tensor([[3.0, -2.0]])
    gate.apply(h).sum().backward()
    assert (gate.logits.grad != 0).all()
    gate.mode = "fixed"
    assert gate.apply(h).tolist() == [[0.0, 0.0]]
    gate.mode = "vanilla"
    assert gate.apply(h) is h


def test_masked_and_fixed_modes_agree_and_masks_round_trip():
    torch.manual_seed(1)
    model = freeze(build_backbone("simple_convnet", 10, width=0.25))
    gates = GateSet(model.gate_points()).attach(model)
    masks = {p.name: torch.rand(p.units) > 0.5 for p in gates}
    gates.load_binary_masks(masks)
    assert all(torch.equal(gates.binary_masks()[k], v) for k, v in masks.items())
    x = torch.randn(2, 3, 28, 28)
    masked = model(x)
    with gates.mode("fixed"):
        assert torch.equal(model(x), masked)
    expected = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert unit_sparsity(masks) == pytest.approx(expected)


def test_capture_input_returns_bottleneck():
    model = freeze(build_backbone("simple_convnet", 10, width=0.25))
    x = torch.randn(2, 3, 28, 28)
    with capture_input(model.classifier) as tap:
        model(x)
    assert torch.allclose(tap["z"], model.features(x))


def test_bad_mode_and_mask_size():
    gates = GateSet(build_backbone("simple_convnet", 10, width=0.25).gate_points())
    with pytest.raises(ValueError, match="gate mode"):
        gates.set_mode("soft")
    with pytest.raises(ValueError, match="expected 4"):
        gates.load_binary_masks({p.name: torch.ones(3, dtype=torch.bool) for p in gates})
