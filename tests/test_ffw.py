"""The FFW baseline (bise_cli/baselines/ffw.py): gates, masks, plateau schedule, selection and settings checks.

Tiny random data (uint8 3x16x16 images) and a width-0.125 SimpleConvNet keep the whole file to a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import pytest
import torch

from bise_cli.baselines.ffw import (
    FFWSettings,
    GatedModel,
    Plateau,
    WeightGates,
    apply_weight_masks,
    gate_value,
    gated_weight_names,
    run_ffw,
    weight_sparsity,
)
from bise_cli.core.errors import BiseError
from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import fit, freeze
from bise_cli.models import build_backbone

NUM_BIAS = 4
SIZE = 16  # SimpleConvNet pools globally: small images keep the CPU runs short


def _encode(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    b = torch.randint(0, NUM_BIAS, (n,), generator=g)
    # A bias-coloured first channel, so there is something for the bias head and the probe to find.
    x[:, 0] += (b * 60).to(torch.uint8).view(-1, 1, 1)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y, b, encode=_encode)


@contextmanager
def _one_thread():
    # Tiny tensors: one thread avoids OpenMP overhead, which dominates (10x) on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _threads():
    """Overrides conftest's two-thread setting for this module."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def vanilla() -> torch.nn.Module:
    """A frozen SimpleConvNet trained for a few epochs on y = b: its features carry the bias, as a vanilla model's."""
    with _one_thread():
        torch.manual_seed(0)
        model = build_backbone("simple_convnet", 10, width=0.125)
        s = _split(200, 0)
        fit(model, Split(s.x, s.b.clone(), s.b, encode=_encode), TrainRecipe(epochs=3, batch_size=50, lr=0.05))
    return freeze(model)


@pytest.fixture
def model(vanilla) -> torch.nn.Module:
    return copy.deepcopy(vanilla)


def _tiny_settings(**overrides) -> FFWSettings:
    base = dict(max_epochs=4, head_max_epochs=20, head_patience=2, batch_size=30, eval_batch_size=100,
                gate_lr=5e-2)
    return FFWSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def data() -> tuple[Split, Split]:
    return _split(60, 1), _split(40, 2)


@pytest.fixture(scope="module")
def search(vanilla, data):
    """One small FFW run shared by the tests that only inspect its outcome."""
    model = copy.deepcopy(vanilla)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _one_thread():
        result = run_ffw(model, *data, num_bias=NUM_BIAS, settings=_tiny_settings(), seed=0)
    return model, before, result


def _random_gates(model: torch.nn.Module, seed: int) -> WeightGates:
    gates = WeightGates(model, gated_weight_names(model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in gates.logits:
            # Bounded away from 0 so a tiny temperature saturates the sigmoid exactly.
            sign = torch.where(torch.rand(w.shape, generator=g) < 0.3, -1.0, 1.0)
            w.copy_(sign * (0.01 + torch.rand(w.shape, generator=g)))
    return gates


# ---------------------------------------------------------------------------------------------------- gates

def test_gated_weights_are_conv_and_linear_weights_only(model):
    names = gated_weight_names(model)
    assert names == ["extracter.0.weight", "extracter.3.weight", "extracter.6.weight", "extracter.9.weight",
                     "fc.weight"]


def test_gates_at_init_reproduce_vanilla_logits_exactly(model, data):
    gated = GatedModel(model, WeightGates(model, gated_weight_names(model), init=0.0)).eval()
    x = _encode(data[1].x[:20])
    with torch.no_grad():
        assert torch.equal(gated(x), model(x))


def test_gate_forward_value_and_backward_derivative_on_a_hand_case():
    w = torch.tensor([0.0, 1.0, -1.0, 3.0], requires_grad=True)
    temperature = 0.5
    g = gate_value(w, temperature)
    s = torch.sigmoid(w.detach() / temperature)
    assert torch.allclose(g, torch.tensor([1.0, 1.0, 2 * torch.sigmoid(torch.tensor(-2.0)).item(), 1.0]))
    g.sum().backward()
    # Derivative of the unclamped 2 sigma(w / T), also where the clamp is active (w > 0).
    assert torch.allclose(w.grad, 2 * s * (1 - s) / temperature)
    assert w.grad[1] > 0 and w.grad[3] > 0


def test_apply_weight_masks_zeroes_exactly_the_masked_weights_and_matches_hard_gates(model, data):
    gates = _random_gates(model, seed=3)
    masks = gates.binary_masks()
    pruned = apply_weight_masks(model, masks)
    dense, sparse = dict(model.named_parameters()), dict(pruned.named_parameters())
    for name, mask in masks.items():
        assert torch.all(sparse[name][~mask] == 0)
        assert torch.equal(sparse[name][mask], dense[name][mask])
    for name in dense:
        if name not in masks:
            assert torch.equal(sparse[name], dense[name])
    assert weight_sparsity(masks) == pytest.approx(sum(int((~m).sum()) for m in masks.values())
                                                   / sum(m.numel() for m in masks.values()))
    x = _encode(data[1].x[:20])
    gated = GatedModel(model, gates).eval()
    with torch.no_grad():
        with gates.hard_mode():
            hard = gated(x)
        # A vanishing temperature turns the soft gate into the same binary mask.
        gates.temperature = 1e-6
        assert torch.equal(gated(x), hard)
        assert torch.equal(pruned(x), hard)


def test_weight_sparsity_hand_case():
    masks = {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([[False, True], [True, True]])}
    assert weight_sparsity(masks) == pytest.approx(3 / 8)
    assert weight_sparsity({}) == 0.0


# ------------------------------------------------------------------------------------------------- plateau

def test_plateau_fires_after_more_than_patience_bad_steps():
    plateau = Plateau(patience=2, threshold=0.05)
    assert not plateau.step(1.0)          # first value sets the best
    assert not plateau.step(0.97)         # < 5% better: bad 1
    assert not plateau.step(0.9)          # 10% better: new best, count reset
    assert not plateau.step(0.88)         # bad 1
    assert not plateau.step(0.95)         # bad 2
    assert plateau.step(0.87)             # bad 3 > patience 2: plateau, count restarts
    assert plateau.best == 0.9
    assert not plateau.step(0.89)


def test_plateau_with_zero_threshold_accepts_any_decrease():
    plateau = Plateau(patience=0, threshold=0.0)
    assert not plateau.step(1.0)
    assert not plateau.step(0.999)
    assert plateau.step(0.999)            # equal is not an improvement


# -------------------------------------------------------------------------------------------------- search

def test_run_ffw_leaves_the_model_unchanged(search):
    model, before, result = search
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_run_ffw_history_and_masks(search):
    model, _, result = search
    assert [r["epoch"] for r in result.history] == list(range(1, len(result.history) + 1))
    keys = {"epoch", "T", "loss", "mi", "val_mi", "probe_acc", "sparsity_weights"}
    assert all(keys <= row.keys() for row in result.history)
    assert set(result.weight_masks) == set(gated_weight_names(model))
    for name, param in model.named_parameters():
        if name in result.weight_masks:
            assert result.weight_masks[name].dtype == torch.bool
            assert result.weight_masks[name].shape == param.shape
    # The gates moved (lr 5e-2): something got pruned.
    assert result.history[-1]["sparsity_weights"] > 0


def test_best_epoch_is_the_lowest_probe_accuracy_with_ties_to_the_later_epoch(search):
    _, _, result = search
    accs = [r["probe_acc"] for r in result.history]
    lowest = min(accs)
    assert result.best_epoch == max(i + 1 for i, a in enumerate(accs) if a == lowest)
    assert result.best_probe_acc == lowest
    best_row = result.history[result.best_epoch - 1]
    assert weight_sparsity(result.weight_masks) == pytest.approx(best_row["sparsity_weights"])


def test_temperature_drops_exactly_at_validation_mi_plateaus(model, data):
    # Patience 0 and a 50% relative threshold: T drops whenever the validation MI does not halve.
    settings = _tiny_settings(max_epochs=5, t_patience=0, t_threshold=0.5, t_factor=0.1, t_min=5e-3)
    result = run_ffw(model, *data, num_bias=NUM_BIAS, settings=settings, seed=0)
    replay = Plateau(patience=0, threshold=0.5)
    drops = [r["t_dropped"] for r in result.history]
    assert drops == [replay.step(r["val_mi"]) for r in result.history]
    assert True in drops[1:] and False in drops[1:]  # the case exercises both branches
    temperature = 1.0
    for row in result.history:
        assert row["T"] == pytest.approx(temperature)
        temperature *= 0.1 if row["t_dropped"] else 1.0
    assert len(result.history) == settings.max_epochs  # T never fell below t_min here


def test_search_stops_when_the_temperature_falls_below_t_min(model, data):
    # A 99.99% threshold makes every epoch after the first a plateau: drops at epochs 2, 3, 4 -> T = 1e-3 < 5e-3.
    settings = _tiny_settings(max_epochs=8, t_patience=0, t_threshold=0.9999, t_min=5e-3)
    result = run_ffw(model, *data, num_bias=NUM_BIAS, settings=settings, seed=0)
    assert [r["t_dropped"] for r in result.history] == [False, True, True, True]
    assert [r["T"] for r in result.history] == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_probe_only_at_temperature_drops_falls_back_to_the_last_gates(model, data):
    settings = _tiny_settings(max_epochs=2, probe_at="temperature_drop")
    result = run_ffw(model, *data, num_bias=NUM_BIAS, settings=settings, seed=0)
    assert all(r["probe_acc"] is None for r in result.history)
    assert result.best_epoch == 2
    assert all(torch.equal(result.weight_masks[k], result.last_masks[k]) for k in result.last_masks)


def test_run_ffw_rejects_a_model_that_is_not_frozen(data):
    model = build_backbone("simple_convnet", 10, width=0.125).eval()
    with pytest.raises(ValueError, match="frozen"):
        run_ffw(model, *data, num_bias=NUM_BIAS, settings=_tiny_settings())


# -------------------------------------------------------------------------------------------------- settings

def test_default_settings_are_ffw_and_valid():
    s = FFWSettings().validate()
    assert (s.alpha, s.gamma, s.gate_lr, s.gate_weight_decay, s.t0, s.t_factor) == (1.0, 10.0, 1e-3, 1e-4, 1.0, 0.1)
    assert (s.t_patience, s.t_threshold, s.t_min, s.max_epochs) == (5, 5e-2, 1e-8, 200)
    assert (s.head_lr, s.head_momentum, s.head_patience, s.head_tolerance, s.head_max_epochs) == (
        0.1, 0.9, 5, 1e-3, 200)
    assert s.batch_size == 100 and s.gate_init == 0.0


@pytest.mark.parametrize("change", [
    {"gamma": -1.0}, {"alpha": -0.5}, {"t_factor": 1.0}, {"t_factor": 0.0}, {"t_min": 2.0}, {"t_min": 0.0},
    {"t_threshold": 1.0}, {"t_patience": -1}, {"head_tolerance": -0.1}, {"max_epochs": 0},
    {"head_max_epochs": 0}, {"batch_size": 0}, {"gate_lr": 0.0}, {"head_weight_decay": -1e-4},
    {"head_momentum": 1.0}, {"gate_init": float("nan")}, {"probe_at": "never"},
])
def test_bad_settings_raise_a_one_line_bise_error(change):
    with pytest.raises(BiseError) as info:
        dataclasses.replace(FFWSettings(), **change).validate()
    assert "\n" not in str(info.value)


def test_run_ffw_validates_settings_and_bias_count(model, data):
    with pytest.raises(BiseError):
        run_ffw(model, *data, num_bias=NUM_BIAS, settings=FFWSettings(gamma=-1.0))
    with pytest.raises(BiseError, match="num_bias"):
        run_ffw(model, *data, num_bias=1, settings=_tiny_settings())
