"""`pruning.stop_when_frozen`'s dead-unit branch (bise_cli.method.frozen):
a gate whose unit outputs exactly zero on every
search sample is final, and the forward-only tail it allows changes no result; the branch refuses itself where
its argument fails (an upstream gate still moving, augmentation, gate noise, ...), and a unit that wakes up
after the stop undoes the forward-only epoch."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from bise_cli.core.precision import FP32
from bise_cli.data.augment import crop_flip
from bise_cli.data.base import Split
from bise_cli.method.frozen import (
    dead_unit_pass,
    dead_unit_refusal,
    dead_units,
    describe_blocking,
    gate_finality,
    revived,
)
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import SearchSettings, make_mask_optimizer, run_search
from bise_cli.method.train import fit, freeze
from bise_cli.models import build_backbone
from bise_cli.models.masking import GatePoint, GateSet
from bise_cli.models.mlp import MLP

KILLED = range(0, 100, 10)  # first-layer units made dead (bias -10: the inputs are at most 1/255)
# tau halves every epoch from 1 to 0.01 (7 epochs); the live gates start at 3, saturated from tau 0.125 on.
SCHEDULE = dict(tau_period=1, tau_min=0.01, mask_lr=0.002, head_pretrain_epochs=1, head_refine_epochs=1,
                batch_size=100)


@pytest.fixture(scope="module")
def killed_mlp(tiny):
    """The search tests' data with the Multi-Color MNIST MLP trained for an epoch, ten first-layer units killed."""
    torch.manual_seed(0)
    model = build_backbone("mlp", 10)
    fit(model, tiny[0]["train"], TrainRecipe(epochs=1, batch_size=50, lr=0.05), seed=0)
    with torch.no_grad():
        model.feature[0].bias[list(KILLED)] = -10.0
    return tiny[0], freeze(model)


def _start(gates: GateSet) -> None:
    """Every gate at +3 (saturates as tau falls), the killed units' gates at exactly 0 (never saturate)."""
    with torch.no_grad():
        for point in gates.points:
            gates.gate(point.name).logits.fill_(3.0)
        gates.gate("fc0").logits[list(KILLED)] = 0.0


def _search(data, search=None, hook=None, **options):
    """One search on a copy of the model; returns the result and the gates' final logits."""
    bundle, model = data
    model = copy.deepcopy(model)
    gates = GateSet(model.gate_points()).attach(model)
    _start(gates)
    handle = model.feature[0].register_forward_hook(hook(gates)) if hook else None
    search = search or bundle["search"]
    settings = SearchSettings(**{**SCHEDULE, **options})
    weights = sample_weights("nominal_rho", search.y, search.b, 10, 10, (0.9,))
    try:
        result = run_search(model, gates, search, bundle["val"], None, num_classes=10, num_bias=10, weights=weights,
                            settings=settings, seed=0)
        return result, gates.logits_snapshot()
    finally:
        gates.detach()
        if handle:
            handle.remove()


def _assert_identical(full, fast) -> None:
    """Every result of the forward-only tail is bit for bit the full schedule's."""
    (full, full_logits), (fast, fast_logits) = full, fast
    assert fast.history == full.history and fast.best_epoch == full.best_epoch
    assert fast.frozen_epoch == full.frozen_epoch
    for a, b in ((full.masks, fast.masks), (full.last_masks, fast.last_masks), (full_logits, fast_logits)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(full.head_states, fast.head_states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ the criterion

def _one_gate(m: list[float], v: list[float], settings: SearchSettings):
    gates = GateSet([GatePoint("a", "x", len(m))])
    with torch.no_grad():
        gates.gate("a").logits.copy_(torch.tensor(m))
    opt = make_mask_optimizer(gates.parameters(), settings)
    opt.state[gates.gate("a").logits]["momentum_buffer"] = torch.tensor(v)
    return gates, opt


def _zero_gradient_steps(m0: float, v0: float, steps: int, settings: SearchSettings) -> float:
    """The gate after `steps` SGD steps on an exactly zero gradient (weight decay and momentum only)."""
    gates, opt = _one_gate([m0], [v0], settings)
    for _ in range(steps):
        opt.zero_grad()
        gates.gate("a").logits.grad = torch.zeros(1)
        opt.step()
    return float(gates.gate("a").logits.detach())


def test_a_dead_unit_makes_its_gate_final_only_if_zero_gradient_steps_keep_its_mask():
    settings, tau, steps = SearchSettings(), 0.01, 2000
    dead = {"a": torch.tensor([True, True, True, True, True])}
    # m = 0 without momentum (stays exactly 0: mask 1), small |m| with small momentum, m = 0 with momentum,
    # |m| close to 0 with momentum toward it.
    m, v = [0.0, 0.05, -0.05, 0.0, 0.001], [0.0, 1e-4, -1e-4, 1e-6, 0.05]
    check = gate_finality(*_one_gate(m, v, settings), settings, tau, steps, dead=dead)
    assert check.counts == {"live": 0, "drift": 2, "saturated": 0, "dead": 3, "bounded": 0}
    assert check.watch["a"].tolist() == [True, True, True, False, False] and not check.frozen
    # Those judged final keep their mask over the steps left; the two others do flip (the test is not vacuous).
    for m0, v0, final in zip(m, v, check.watch["a"].tolist(), strict=True):
        kept = (_zero_gradient_steps(m0, v0, steps, settings) >= 0) == (m0 >= 0)
        assert kept or not final
    assert _zero_gradient_steps(0.0, 1e-6, 1, settings) < 0 and _zero_gradient_steps(0.001, 0.05, 5, settings) < 0
    assert _zero_gradient_steps(0.0, 0.0, steps, settings) == 0.0  # 1[0 >= 0]: kept
    # Not known to be dead: the same gates are live (m = 0 never saturates).
    assert gate_finality(*_one_gate(m, v, settings), settings, tau, steps).counts["live"] == 3


def test_the_dead_unit_branch_refuses_what_breaks_its_argument(killed_mlp):
    bundle, model = killed_mlp
    plain = SearchSettings()
    assert dead_unit_refusal(model, plain, same_inputs=True) is None
    assert "augmented" in dead_unit_refusal(model, plain, same_inputs=False)
    for option, value, reason in (("gate_noise", 0.1, "noise"), ("estimator", "hard_concrete", "noise"),
                                  ("mask_optimizer", "adam", "adam"),
                                  ("sparsity_weight", 0.1, "sparsity")):
        assert reason in dead_unit_refusal(model, dataclasses.replace(plain, **{option: value}), True)
    training = copy.deepcopy(model)
    training.feature[1].train()  # e.g. a BatchNorm left in training mode
    assert "training mode" in dead_unit_refusal(training, plain, True)
    bound = copy.deepcopy(model)
    bound.bind_gates = lambda gates: None  # a model with mask-dependent layers (BERT's mask-aware LayerNorm)
    assert "mask-dependent" in dead_unit_refusal(bound, plain, True)


def test_gates_record_the_largest_input_per_unit(killed_mlp):
    bundle, model = killed_mlp
    model = copy.deepcopy(model)
    gates = GateSet(model.gate_points()).attach(model)
    x = bundle["search"].encode(bundle["search"].x[:50])
    gates.record_peaks(True)
    with torch.no_grad():
        model(x)
        model(x[:10] * 2)
    gates.record_peaks(False)
    model(x)  # not recorded
    peaks = gates.peaks()
    def hidden(inputs):  # the first gate's input, computed as the model does (same batch shapes)
        return torch.relu(model.feature[0](inputs.flatten(1) / 255)).amax(0)

    assert torch.equal(peaks["fc0"], torch.maximum(hidden(x), hidden(x[:10] * 2)))
    assert set(dead_units(peaks)["fc0"].nonzero().flatten().tolist()) >= set(KILLED)
    # NaN is not zero, and a unit is watched if it was final only as dead.
    nan = {"fc0": torch.full((100,), float("nan"))}
    assert not dead_units(nan)["fc0"].any()
    watch = {"fc0": torch.zeros(100, dtype=torch.bool)}
    watch["fc0"][KILLED[0]] = True
    assert not revived(peaks, watch) and revived(nan, watch)
    gates.detach()


# -------------------------------------------------------------------------------------------- the search

def test_the_stop_fires_on_dead_units_and_changes_no_result(killed_mlp, caplog):
    with caplog.at_level("INFO", logger="bise_cli.method.search"):
        full = _search(killed_mlp, stop_when_frozen=False)
        fast = _search(killed_mlp)
    assert "on dead units" in caplog.text and "is not any more" not in caplog.text
    assert len(fast[0].history) == 7
    # Saturation alone cannot freeze the killed units' gates (m = 0 exactly): the dead-unit branch does, early.
    assert fast[0].frozen_epoch is not None and fast[0].frozen_epoch <= 4
    assert all(fast[1]["fc0"][i] == 0 for i in KILLED) and all(fast[0].masks["fc0"][i] for i in KILLED)
    _assert_identical(full, fast)


def test_augmentation_refuses_the_dead_unit_branch(killed_mlp):
    bundle, _ = killed_mlp
    augmented = dataclasses.replace(bundle["search"], augment=crop_flip)
    result, logits = _search(killed_mlp, search=augmented, augment=True)
    # The killed units are as dead as before, but their gates count only by saturation: never frozen.
    assert result.frozen_epoch is None and all(logits["fc0"][i] == 0 for i in KILLED)


def _wakes_up_late(gates):
    """A forward hook on the first Linear that revives a killed unit once tau < 0.07 (epoch 5 on): a model whose
    activations change between epochs, which the dead-unit branch cannot foresee."""
    def hook(_module, _inputs, out):
        if gates.gate("fc0").tau < 0.07:
            out = out.clone()
            out[:, KILLED[0]] += 11.0
        return out
    return hook


def test_a_unit_that_wakes_up_after_the_stop_undoes_the_forward_only_epoch(killed_mlp, caplog):
    full = _search(killed_mlp, hook=_wakes_up_late, stop_when_frozen=False)
    with caplog.at_level("WARNING", logger="bise_cli.method.search"):
        fast = _search(killed_mlp, hook=_wakes_up_late)
    assert "runs again in full" in caplog.text
    # The woken unit's gate moved (a forward-only replay would have left it at 0), identically in both runs.
    assert fast[1]["fc0"][KILLED[0]] != 0
    _assert_identical(full, fast)


def _upstream_flip_model() -> MLP:
    """Two inputs, two hidden layers of two units, two classes; gates fc0 = [a, u], fc1 = [c, d]:
    a = relu(x0), u = 1, c = relu(a + u), d = relu(1 - 5 u): d is dead while u's gate is on and alive (d = 1)
    once it is off. Logits (-c, c + d) with every label 0: the loss pushes c, hence u's gate, down."""
    model = MLP(num_classes=2, in_features=2, hidden=(2, 2), double_scale=False)
    with torch.no_grad():
        model.feature[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        model.feature[0].bias.copy_(torch.tensor([0.0, 1.0]))
        model.feature[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, -5.0]]))
        model.feature[2].bias.copy_(torch.tensor([0.0, 1.0]))
        model.classifier.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))
        model.classifier.bias.zero_()
    return freeze(model)


def _flip_search(stop: bool, u: float = 0.3, **options):
    model = _upstream_flip_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 2, generator=g)
    split = Split(x, torch.zeros(200, dtype=torch.long), (torch.rand(200, generator=g) < 0.5).long())
    gates = GateSet(model.gate_points()).attach(model)
    with torch.no_grad():
        gates.gate("fc0").logits.copy_(torch.tensor([3.0, u]))     # a saturates; u is on, near 0
        gates.gate("fc1").logits.copy_(torch.tensor([3.0, 0.0]))   # c saturates; d is dead
    settings = SearchSettings(**{**dict(tau_period=1, tau_min=0.01, mask_lr=0.01, gamma=0.0, head_pretrain_epochs=1,
                                        head_refine_epochs=1, batch_size=50, selection="last",
                                        stop_when_frozen=stop), **options})
    weights = sample_weights("none", split.y, split.b, 2, 2, None)
    try:
        return run_search(model, gates, split, None, None, num_classes=2, num_bias=2, weights=weights,
                          settings=settings, seed=0), gates.logits_snapshot()
    finally:
        gates.detach()


def test_a_unit_dead_while_an_upstream_gate_still_moves_is_not_final(caplog):
    settings = SearchSettings()
    # After the first epoch: d is dead but u's gate is not final (live, unsaturated): no stop.
    model = _upstream_flip_model()
    gates = GateSet(model.gate_points()).attach(model)
    with torch.no_grad():
        gates.gate("fc0").logits.copy_(torch.tensor([3.0, 0.3]))
        gates.gate("fc1").logits.copy_(torch.tensor([3.0, 0.0]))
    gates.record_peaks(True)
    model(torch.rand(20, 2))
    gates.record_peaks(False)
    dead = dead_units(gates.peaks())
    assert dead["fc1"].tolist() == [False, True] and not dead["fc0"].any()
    # The pass over a split under the current masks finds the same, and d alive once u's gate is off.
    split = Split(torch.rand(30, 2), torch.zeros(30, dtype=torch.long), torch.zeros(30, dtype=torch.long))
    assert dead_unit_pass(model, gates, split, 7, FP32, "cpu")["fc1"].tolist() == [False, True]
    with torch.no_grad():
        gates.gate("fc0").logits[1] = -0.3
    assert not dead_unit_pass(model, gates, split, 7, FP32, "cpu")["fc1"].any()
    with torch.no_grad():
        gates.gate("fc0").logits[1] = 0.3
    opt = make_mask_optimizer(gates.parameters(), settings)
    check = gate_finality(gates, opt, settings, 0.1, 100, dead=dead)  # a and c saturated at tau 0.1, u not
    assert check.counts["live"] == 1 and check.counts["dead"] == 1 and not check.frozen
    assert (describe_blocking(gates, check, 0.1, gates.peaks())
            == "1 on (m/tau 3 to 3): fc0[1] m 0.3 (m/tau 3, on, max|h| 1)")
    gates.detach()
    # The search: u's gate flips off, d wakes up and its gate goes off too; the criterion never fired before.
    with caplog.at_level("INFO", logger="bise_cli.method.search"):
        full, fast = _flip_search(stop=False), _flip_search(stop=True)
    assert "is not any more" not in caplog.text  # no stop that the guard had to undo
    sparsity = [row["sparsity_units"] for row in full[0].history]
    assert sparsity[0] == 0 and sparsity[-1] == 0.5  # all on after epoch 1; u and d off at the end
    assert not full[0].last_masks["fc0"][1] and not full[0].last_masks["fc1"][1] and full[1]["fc1"][1] < 0
    changed = max(i for i in range(1, len(sparsity)) if sparsity[i] != sparsity[i - 1]) + 1  # 1-based epoch
    assert full[0].frozen_epoch is None or full[0].frozen_epoch >= changed
    assert fast[0].history == full[0].history and fast[0].frozen_epoch == full[0].frozen_epoch
    assert all(torch.equal(fast[0].last_masks[k], full[0].last_masks[k]) for k in full[0].last_masks)
    assert not math.isnan(full[0].history[-1]["loss_ce"])


def test_a_unit_dead_under_masks_no_longer_in_force_is_not_final(caplog):
    """One batch per epoch: u's gate jumps in the epoch's only step from just above 0 to saturated off, after
    the forward pass that saw d dead. Every other gate is final then, but d was dead under masks that are no
    longer in force: the branch must not count it (d wakes up and its gate goes off)."""
    options = dict(u=1e-4, tau0=0.01, tau_min=0.001, mask_lr=1.0, mask_momentum=0.0, batch_size=200)
    with caplog.at_level("INFO", logger="bise_cli.method.search"):
        full, fast = _flip_search(stop=False, **options), _flip_search(stop=True, **options)
    # Not even a stop after epoch 1 that the guard would then undo.
    assert "is not any more" not in caplog.text and "masks frozen after epoch 1 " not in caplog.text
    assert full[0].history[0]["sparsity_units"] == 0.25 and full[0].history[-1]["sparsity_units"] == 0.5
    assert full[0].frozen_epoch == fast[0].frozen_epoch == 2  # by saturation, once d's gate has gone off
    assert fast[0].history == full[0].history
    assert not fast[0].last_masks["fc1"][1] and torch.equal(fast[1]["fc1"], full[1]["fc1"])


def test_dead_units_found_under_earlier_masks_do_not_count_after_a_change(caplog):
    """One batch per epoch, tau 1, 0.01, 1e-4: after epoch 1 the masks have not changed, and the pass under them
    finds d dead (u is still on). In epoch 2 u's gate jumps to saturated off: every other gate is final, but the
    dead units found under the old masks must not count (d is alive now)."""
    options = dict(u=0.05, tau_factor=0.01, tau_min=1e-5, mask_lr=0.1, mask_momentum=0.0, batch_size=200)
    with caplog.at_level("DEBUG", logger="bise_cli.method.search"):
        full, fast = _flip_search(stop=False, **options), _flip_search(stop=True, **options)
    assert [row["sparsity_units"] for row in full[0].history] == [0.0, 0.25, 0.5]
    assert "epoch 1: 1 of 4 gates not final (1 live" in caplog.text and "1 on dead units" in caplog.text
    assert "is not any more" not in caplog.text and full[0].frozen_epoch is None
    assert fast[0].history == full[0].history and fast[0].frozen_epoch is None
