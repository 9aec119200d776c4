"""The official code's optional search settings: MI subset, cosine temperature, cosine mask lr, Adam gates."""

from __future__ import annotations

import math

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import SearchSettings, make_mask_optimizer, mi_subset_mask, run_search
from bise_cli.models.masking import GateSet


def _search(tiny, **options):
    bundle, model = tiny
    gates = GateSet(model.gate_points(), init=0.5).attach(model)
    settings = SearchSettings(head_pretrain_epochs=1, head_refine_epochs=1, batch_size=100, gate_init=0.5,
                              **options)
    weights = sample_weights("nominal_rho", bundle["search"].y, bundle["search"].b, 10, 10, (0.9,))
    try:
        return run_search(model, gates, bundle["search"], bundle["val"], None, num_classes=10, num_bias=10,
                          weights=weights, settings=settings, seed=0)
    finally:
        gates.detach()


def test_defaults_are_the_papers():
    s = SearchSettings()
    assert (s.mi_subset, s.tau_schedule, s.mask_lr_schedule, s.mask_optimizer) == ("conflicting", "periodic",
                                                                                     "none", "sgd")
    # The periodic rule: halve after every tau_period-th epoch only.
    assert [s.tau_after(e, 1.0) for e in (1, 9, 10)] == [1.0, 1.0, 0.5]


def test_cosine_tau_runs_the_same_number_of_epochs_and_refits_heads_periodically(tiny):
    options = dict(tau_schedule="cosine", tau_period=2, tau_min=0.2, tau0=1.0)
    epochs = SearchSettings(**options).num_epochs
    assert epochs == SearchSettings(tau_period=2, tau_min=0.2).num_epochs == 6
    result = _search(tiny, **options)
    taus = [row["tau"] for row in result.history]
    expected = [0.2 + 0.8 * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, epochs + 1)]
    assert taus == pytest.approx(expected)
    assert taus[0] == 1.0 and SearchSettings(**options).tau_after(epochs, taus[-1]) == pytest.approx(0.2)
    assert [("head_acc_refined" in row) for row in result.history] == [False, True] * 3


def test_cosine_mask_lr_anneals_over_the_mask_epochs(tiny):
    result = _search(tiny, mask_lr_schedule="cosine", mask_lr=0.4, tau_period=1, tau_min=0.2)
    epochs = len(result.history)
    assert epochs == 3
    lrs = [row["mask_lr"] for row in result.history]
    assert lrs == pytest.approx([0.4 * (1 + math.cos(math.pi * k / epochs)) / 2 for k in range(epochs)])
    assert "mask_lr" not in _search(tiny, tau_period=1, tau_min=0.5).history[0]  # default: no schedule, no column


def test_adam_mask_optimizer():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_mask_optimizer(params, SearchSettings(mask_optimizer="adam", mask_lr=0.05, mask_weight_decay=0.0))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.05
    assert isinstance(make_mask_optimizer(params, SearchSettings()), torch.optim.SGD)
    # Adam's first step moves every parameter with a non-zero gradient by lr (sign-like), unlike SGD.
    params[0].grad = torch.tensor([1e-3, -2.0, 0.0])
    opt.step()
    assert params[0].detach().tolist() == pytest.approx([-0.05, 0.05, 0.0], abs=1e-6)


def test_adam_search_runs(tiny):
    result = _search(tiny, tau_period=1, tau_min=0.5, mask_lr=0.05, mask_optimizer="adam")
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss_ce"])


def test_mi_subset_masks():
    y = torch.zeros(25, dtype=torch.long)
    column = torch.tensor([0] * 20 + [1] * 5)  # 20 aligned, 5 conflicting
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mi_subset_mask(column, y, SearchSettings(), g), column != y)
    assert mi_subset_mask(column, y, SearchSettings(mi_subset="all"), g).all()
    settings = SearchSettings(mi_subset="conflicting_plus_aligned", mi_aligned_share=0.1)
    masks = [mi_subset_mask(column, y, settings, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    for mask in masks:
        assert mask[20:].all() and int(mask[:20].sum()) == 2  # every conflicting + round(0.1 * 20) aligned
    assert torch.equal(masks[0], masks[1])
    full = mi_subset_mask(column, y, SearchSettings(mi_subset="conflicting_plus_aligned", mi_aligned_share=1.0), g)
    assert full.all()


def test_conflicting_plus_aligned_search_runs(tiny):
    result = _search(tiny, mi_subset="conflicting_plus_aligned", mi_aligned_share=0.3, tau_period=1, tau_min=0.5)
    assert all(row["mi"] is None or 0 <= row["mi"] <= 1 for row in result.history)


@pytest.mark.parametrize("option, value", [("mi_subset", "some"), ("tau_schedule", "linear"),
                                           ("mask_lr_schedule", "step"), ("mask_optimizer", "rmsprop"),
                                           ("mi_aligned_share", 1.5)])
def test_bad_options_are_one_line_errors(option, value):
    with pytest.raises(BiseError, match=f"pruning.{option}") as error:
        SearchSettings(**{option: value}).validate()
    assert "\n" not in str(error.value)
