"""The search variants of issue 22's study (tau floor, Gumbel-sigmoid gates, L0 penalty, restarts, stop when
frozen): construction-level claims only (what each option computes), never accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.method.frozen import masks_frozen
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import SearchSettings, make_mask_optimizer, run_search
from bise_cli.method.train import fit, freeze
from bise_cli.models import build_backbone
from bise_cli.models.masking import Gate, GatePoint, GateSet


@pytest.fixture(scope="module")
def tiny_mlp(tiny):
    """The same data with the Multi-Color MNIST MLP: a search of 7 epochs takes well under a second."""
    torch.manual_seed(0)
    model = build_backbone("mlp", 10)
    fit(model, tiny[0]["train"], TrainRecipe(epochs=1, batch_size=50, lr=0.05), seed=0)
    return tiny[0], freeze(model)


def _search(tiny, gate_init=0.5, val=True, **options):
    bundle, model = tiny
    gates = GateSet(model.gate_points(), init=gate_init).attach(model)
    settings = SearchSettings(head_pretrain_epochs=1, head_refine_epochs=1, batch_size=100, gate_init=gate_init,
                              **options)
    weights = sample_weights("nominal_rho", bundle["search"].y, bundle["search"].b, 10, 10, (0.9,))
    try:
        result = run_search(model, gates, bundle["search"], bundle["val"] if val else None, None, num_classes=10,
                            num_bias=10, weights=weights, settings=settings, seed=0)
        return result, gates
    finally:
        gates.detach()


def test_defaults_are_the_papers():
    s = SearchSettings()
    assert (s.tau_floor, s.gate_noise, s.sparsity_weight, s.restarts) == (0.0, 0.0, 0.0, 1)
    assert s.estimator == "straight_through" and s.noise_scale == 0
    # On by default: it changes no result (test_stop_when_frozen_changes_no_result); the bounded branch is opt-in.
    assert s.stop_when_frozen and s.frozen_grad_margin is None


@pytest.mark.parametrize("option, value, message", [
    ("tau_floor", 1.0, "tau_floor"), ("tau_floor", -0.1, "tau_floor"), ("gate_noise", -1.0, "gate_noise"),
    ("sparsity_weight", -1.0, "sparsity_weight"), ("restarts", 0, "restarts"), ("restarts", 1.5, "restarts"),
    ("frozen_grad_margin", 0.5, "frozen_grad_margin"), ("frozen_grad_margin", True, "frozen_grad_margin"),
])
def test_bad_values_are_one_line_errors(option, value, message):
    with pytest.raises(BiseError, match=message) as error:
        SearchSettings(**{option: value}).validate()
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------- gate noise

def test_noisy_gate_is_hard_forward_with_shifted_straight_through_gradient():
    gate = Gate(4, init=0.0)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.3, -0.3, 0.05, -0.05]))
    gate.tau = 0.5
    gate.noise = torch.tensor([-0.4, 0.4, 0.0, 0.0])
    values = gate.values()
    assert values.tolist() == [0.0, 1.0, 1.0, 0.0]  # 1[m + noise >= 0], exactly binary
    values.sum().backward()
    noisy = torch.tensor([-0.1, 0.1, 0.05, -0.05])
    soft = torch.sigmoid(noisy / 0.5)
    assert torch.allclose(gate.logits.grad, soft * (1 - soft) / 0.5)
    gate.noise = None  # deterministic again: the paper's gate
    assert gate.values().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_sample_noise_is_logistic_seeded_and_removable():
    gates = GateSet([GatePoint("a", "x", 20000)])
    gates.sample_noise(0.1, torch.Generator().manual_seed(0))
    noise = gates.gate("a").noise
    # Logistic(0, s): mean 0, standard deviation s * pi / sqrt(3).
    assert abs(float(noise.mean())) < 0.005 and float(noise.std()) == pytest.approx(0.1 * math.pi / 3 ** 0.5,
                                                                                   rel=0.03)
    gates.sample_noise(0.1, torch.Generator().manual_seed(0))
    assert torch.equal(gates.gate("a").noise, noise)
    gates.sample_noise(0.0, torch.Generator())
    assert gates.gate("a").noise is None


def test_noisy_search_leaves_deterministic_gates(tiny):
    result, gates = _search(tiny, tau_period=1, tau_min=0.5, gate_noise=0.5)
    assert len(result.history) == 1 and all(gates.gate(p.name).noise is None for p in gates.points)


# ------------------------------------------------------------------------------------------- hard concrete

def test_hard_concrete_gate_is_the_stretched_clamped_sample_with_its_own_gradient():
    """Louizos et al. (ICLR 2018): z = clamp(sigmoid((m + L)/beta)(zeta - gamma) + gamma, 0, 1), differentiated
    through z; without noise the gate is the deterministic binary 1[m >= 0]."""
    gate = Gate(4, init=0.0)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, 3.0, -3.0, 0.2]))
    gate.concrete_beta, gate.tau = 0.5, 0.001
    gate.noise = torch.tensor([0.0, 0.0, 0.0, -0.4])
    values = gate.values()
    s = torch.sigmoid(torch.tensor([0.0, 3.0, -3.0, -0.2]) / 0.5)
    assert torch.allclose(values.detach(), (s * 1.2 - 0.1).clamp(0, 1))
    assert values[1].item() == 1.0 and values[2].item() == 0.0  # clamped: exactly on and off
    assert values[0].item() == pytest.approx(0.5)  # m + L = 0: the middle of the stretch
    values.sum().backward()
    # Gradient through the sample where it is not clamped (1.2 s (1 - s) / beta), exactly 0 where it is.
    expected = 1.2 * s * (1 - s) / 0.5 * torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(gate.logits.grad, expected)
    gate.noise = None
    assert gate.values().tolist() == [1.0, 1.0, 0.0, 1.0]


def test_hard_concrete_gradient_does_not_vanish_with_the_temperature():
    """A gate at m = 2 under tau = 0.001: the straight-through slope is exactly 0 in float32, while the hard
    concrete gate, whatever tau, is moved by the draws that land it between 0 and 1 (Monte Carlo mean of
    dz/dm near its expected value (zeta - gamma) * sigmoid'(m) for small beta)."""
    gates = GateSet([GatePoint("a", "x", 1)])
    with torch.no_grad():
        gates.gate("a").logits.fill_(2.0)
    gates.set_tau(0.001)
    gates.gate("a").values().sum().backward()
    assert gates.gate("a").logits.grad.item() == 0.0  # the paper's gate is frozen
    gates.set_hard_concrete(0.05)
    generator, grads = torch.Generator().manual_seed(0), []
    for _ in range(4000):
        gates.gate("a").logits.grad = None
        gates.sample_noise(1.0, generator)
        gates.gate("a").values().sum().backward()
        grads.append(gates.gate("a").logits.grad.item())
    sig = torch.sigmoid(torch.tensor(2.0)).item()
    assert sum(grads) / len(grads) == pytest.approx(1.2 * sig * (1 - sig), rel=0.25)


def test_hard_concrete_search_draws_noise_never_freezes_and_leaves_binary_gates(tiny):
    result, gates = _search(tiny, tau_period=1, tau_min=0.2, estimator="hard_concrete")
    assert len(result.history) == 3 and result.frozen_epoch is None
    assert all(gates.gate(p.name).noise is None and gates.gate(p.name).concrete_beta is None for p in gates.points)
    # The recorded masks are the binary 1[m >= 0] of the gates the search leaves.
    assert all(mask.dtype == torch.bool and torch.equal(mask, gates.gate(name).hard().bool().cpu())
               for name, mask in result.last_masks.items())
    # The training forward pass saw the stochastic, continuous gates: another loss than the paper's gates give.
    straight, _ = _search(tiny, tau_period=1, tau_min=0.2)
    assert all(a["loss_ce"] != b["loss_ce"] for a, b in zip(result.history, straight.history, strict=True))


def test_hard_concrete_l0_is_the_probability_of_a_nonzero_gate():
    gates = GateSet([GatePoint("a", "x", 2)])
    with torch.no_grad():
        gates.gate("a").logits.copy_(torch.tensor([0.0, 1.0]))
    gates.set_hard_concrete(2 / 3)
    expected = torch.sigmoid(torch.tensor([0.0, 1.0]) - 2 / 3 * math.log(0.1 / 1.1))
    assert float(gates.soft_fraction().detach()) == pytest.approx(float(expected.mean()))
    # ... which is what sampling says: P(z > 0)
    generator, hits = torch.Generator().manual_seed(1), torch.zeros(2)
    for _ in range(4000):
        gates.sample_noise(1.0, generator)
        hits += (gates.gate("a").values().detach() > 0).float()
    assert torch.allclose(hits / 4000, expected, atol=0.03)


@pytest.mark.parametrize("options", [{"estimator": "gumbel"}, {"estimator": "hard_concrete", "gate_noise": 0.1},
                                     {"estimator": "hard_concrete", "hard_concrete_beta": 0.0}])
def test_hard_concrete_bad_settings_are_one_line_errors(options):
    with pytest.raises(BiseError, match="estimator") as error:
        SearchSettings(**options).validate()
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------- tau floor, L0

def test_tau_floor_bounds_the_gates_temperature_not_the_schedule(tiny):
    result, gates = _search(tiny, tau_period=1, tau_min=0.2, tau_floor=0.4)
    assert len(result.history) == SearchSettings(tau_period=1, tau_min=0.2).num_epochs == 3
    assert [row["tau"] for row in result.history] == [1.0, 0.5, 0.25]
    assert all(gates.gate(p.name).tau == 0.4 for p in gates.points)  # max(0.125, floor)


def test_soft_fraction_is_the_mean_sigmoid_and_differentiable():
    gates = GateSet([GatePoint("a", "x", 2), GatePoint("b", "y", 2)])
    with torch.no_grad():
        gates.gate("a").logits.copy_(torch.tensor([0.0, 1.0]))
        gates.gate("b").logits.copy_(torch.tensor([-1.0, 2.0]))
    gates.set_tau(0.5)
    value = gates.soft_fraction()
    expected = torch.sigmoid(torch.tensor([0.0, 2.0, -2.0, 4.0]))
    assert float(value.detach()) == pytest.approx(float(expected.mean()))
    value.backward()
    assert torch.allclose(gates.gate("a").logits.grad, (expected * (1 - expected))[:2] / 0.5 / 4)


# ------------------------------------------------------------------------------------------- restarts

def test_restarts_keep_the_best_validation_run(tiny):
    result, _ = _search(tiny, gate_init=0.0, tau_period=1, tau_min=0.5, restarts=2, mask_lr=0.5)
    assert [row["restart"] for row in result.history] == [0, 1]
    values = [row["val_acc"] for row in result.history]  # one epoch per run: its value is the run's selection
    assert result.best_value == max(values) and result.restart == values.index(max(values))  # ties: earlier run


def test_restarts_need_validation(tiny):
    with pytest.raises(BiseError, match="val_holdout"):
        _search(tiny, val=False, tau_period=1, tau_min=0.5, restarts=2)


# ------------------------------------------------------------------------------------------- frozen masks

def _gate_with(m: list[float], v: list[float] | None, settings: SearchSettings):
    gates = GateSet([GatePoint("a", "x", len(m))])
    with torch.no_grad():
        gates.gate("a").logits.copy_(torch.tensor(m))
    opt = make_mask_optimizer(gates.parameters(), settings)
    if v is not None:
        opt.state[gates.gate("a").logits]["momentum_buffer"] = torch.tensor(v)
    return gates, opt


def _worst_case(m0: float, v0: float, tau: float, bound: float, steps: int, settings: SearchSettings) -> float:
    """The logit after `steps` SGD steps whose gradient always pushes toward zero as hard as the bound allows."""
    m, v = torch.tensor(m0, dtype=torch.float64), torch.tensor(v0, dtype=torch.float64)
    sign = 1.0 if m0 > 0 else -1.0
    for _ in range(steps):
        soft = torch.sigmoid(m / tau)
        grad = sign * bound * soft * (1 - soft) / tau
        v = settings.mask_momentum * v + grad + settings.mask_weight_decay * m
        m = m - settings.mask_lr * v
    return float(m)


def test_frozen_criterion_is_sound_against_the_worst_case_gradient():
    settings = SearchSettings()
    tau, bound, steps = 0.01, 5.0, 2000
    for m0, v0 in ((0.4, 0.0), (-0.4, 0.0), (0.4, 0.3), (-0.5, -0.2)):
        gates, opt = _gate_with([m0], [v0], settings)
        if masks_frozen(gates, opt, settings, tau, steps, bound):
            assert math.copysign(1, _worst_case(m0, v0, tau, bound, steps, settings)) == math.copysign(1, m0)
    # The criterion fires for a gate far from 0 and not for one near it (or one carried toward 0 by momentum).
    assert masks_frozen(*_gate_with([0.4, -0.4], [0.0, 0.0], settings), settings, tau, steps, bound)
    assert not masks_frozen(*_gate_with([0.4, -0.02], [0.0, 0.0], settings), settings, tau, steps, bound)
    assert not masks_frozen(*_gate_with([0.4], [40.0], settings), settings, tau, steps, bound)
    # A gate near 0 does flip under that gradient: the criterion is not vacuous.
    assert _worst_case(0.02, 0.0, tau, bound, steps, settings) < 0
    # Adam and noisy gates never qualify.
    for other in (SearchSettings(mask_optimizer="adam"), SearchSettings(gate_noise=0.1)):
        assert not masks_frozen(*_gate_with([5.0], None, other), other, tau, steps, bound)


def test_saturated_gates_are_frozen_whatever_the_gradient():
    # sigmoid(m / tau) is exactly 1 (or 0) in float32: the straight-through gradient is exactly zero, so no
    # gradient bound is needed; a gate merely far from 0 (sigmoid 1e-13, not 0) needs one.
    settings, huge = SearchSettings(), 1e30
    assert masks_frozen(*_gate_with([0.5, -1.0], [0.0, 0.0], settings), settings, 0.01, 2000, huge)
    assert not masks_frozen(*_gate_with([0.5, -0.3], [0.0, 0.0], settings), settings, 0.01, 2000, huge)
    assert torch.sigmoid(torch.tensor(-30.0)) > 0 and torch.sigmoid(torch.tensor(-100.0)) == 0
    # Momentum carrying the gate back toward the unsaturated zone defeats the exact branch.
    assert not masks_frozen(*_gate_with([0.5], [-300.0], settings), settings, 0.01, 2000, huge)


def test_exact_branch_needs_no_bound_and_the_bounded_branch_is_opt_in():
    settings = SearchSettings()
    # 0.4 / 0.01 = 40: float32 sigmoid exactly 1, frozen without any bound; 0.1 / 0.01 = 10 is not saturated.
    assert masks_frozen(*_gate_with([0.4, -1.5], [0.0, 0.0], settings), settings, 0.01, 2000)
    assert not masks_frozen(*_gate_with([0.4, 0.1], [0.0, 0.0], settings), settings, 0.01, 2000)
    # The same unsaturated gate passes the bounded branch under a small enough gradient bound.
    assert masks_frozen(*_gate_with([0.4, 0.1], [0.0, 0.0], settings), settings, 0.01, 2000, 1e-5)
    # Weight decay over many steps can bring a saturated gate back to the live zone: not final.
    assert not masks_frozen(*_gate_with([0.4], [0.0], settings), settings, 0.01, 10**6)


FROZEN_EARLY = dict(gate_init=3.0, tau_period=1, tau_min=0.01, mask_lr=0.002)  # 7 epochs, saturated after 3


def test_stop_when_frozen_changes_no_result(tiny_mlp):
    full, _ = _search(tiny_mlp, stop_when_frozen=False, **FROZEN_EARLY)
    fast, _ = _search(tiny_mlp, **FROZEN_EARLY)
    assert len(full.history) == len(fast.history) == 7
    # The masks froze early, so most epochs of the second search ran forward-only ...
    assert fast.frozen_epoch is not None and fast.frozen_epoch <= 4 and fast.frozen_epoch == full.frozen_epoch
    # ... and every result is bit for bit that of the full schedule: masks, history rows (losses, MI, head
    # accuracies, validation values), the selected epoch, the bias heads (their leakage metric) and the gates.
    assert fast.history == full.history and fast.best_epoch == full.best_epoch
    for a, b in ((full.masks, fast.masks), (full.last_masks, fast.last_masks)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(full.head_states, fast.head_states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.unrounded_masks[k], fast.unrounded_masks[k]) for k in full.masks)


def test_bounded_branch_is_opt_in_and_keeps_the_masks(tiny_mlp):
    options = dict(gate_init=1.0, tau_period=1, tau_min=0.01, mask_lr=0.05)
    full, _ = _search(tiny_mlp, stop_when_frozen=False, **options)
    bounded, _ = _search(tiny_mlp, frozen_grad_margin=10.0, **options)
    # The bounded branch fires before the exact one could (an unsaturated gate), and the masks agree here.
    assert bounded.frozen_epoch is not None and bounded.frozen_epoch < (full.frozen_epoch or len(full.history))
    for name, mask in full.masks.items():
        assert torch.equal(mask, bounded.masks[name]) and torch.equal(full.last_masks[name],
                                                                      bounded.last_masks[name])
