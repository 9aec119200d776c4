"""The BISE search: reweighting, MI estimator, schedule, cached head training, selection, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.data.base import Split
from bise_cli.data.biased_mnist import build_biased_mnist
from bise_cli.method.probe import feature_epoch, make_head, model_epoch
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import resolve, sample_weights
from bise_cli.method.search import SearchSettings, normalized_mutual_information, run_search
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone
from bise_cli.models.masking import GateSet

ONE = torch.zeros(1, dtype=torch.long)


def _w(weights, y: int, *b: int) -> float:
    bias = torch.tensor([list(b)]) if len(b) > 1 else torch.tensor([b[0]])
    return weights(torch.tensor([y]), bias).item()


def test_nominal_rho_weights_match_the_paper():
    weights = sample_weights("nominal_rho", ONE, ONE, 10, 10, (0.99,))
    assert _w(weights, 3, 3) == pytest.approx(1 / 9.9)           # aligned: 1/(C rho) = 0.101
    assert _w(weights, 3, 4) == pytest.approx(9 / (10 * 0.01))   # conflicting: (C-1)/(C(1-rho)) = 90
    # Under the ideal construction the expected weight is 1.
    assert 0.99 * _w(weights, 0, 0) + 0.01 * _w(weights, 0, 1) == pytest.approx(1.0)


def test_group_balanced_weights_and_none():
    y = torch.tensor([0, 0, 0, 1])
    b = torch.tensor([0, 0, 1, 1])
    for name in ("group_balanced", "empirical"):  # the paper's option 8 and EMPIRICAL are one rule
        weights = sample_weights(name, y, b, 2, 2, None)
        assert _w(weights, 0, 0) == pytest.approx(1 / (4 * 0.5))
        assert _w(weights, 1, 1) == pytest.approx(1 / (4 * 0.25))
        assert _w(weights, 1, 0) == pytest.approx(1 / (4 * 0.25))  # empty cell: count clamped to 1
    assert torch.equal(sample_weights("none", y, b, 2, 2, None)(y, b), torch.ones(4))


def test_multicolor_weights_match_the_official_options_1_and_3():
    rho = (0.99, 0.95)
    inverse = sample_weights("inverse_rho", ONE, torch.zeros(1, 2, dtype=torch.long), 10, 10, rho)
    # Option 3: 1 / (P_L P_R), P = rho if that side is aligned else 1 - rho.
    assert _w(inverse, 2, 2, 2) == pytest.approx(1 / (0.99 * 0.95))          # 1.0633
    assert _w(inverse, 2, 2, 5) == pytest.approx(1 / (0.99 * 0.05))          # 20.202
    assert _w(inverse, 2, 7, 2) == pytest.approx(1 / (0.01 * 0.95))          # 105.26
    assert _w(inverse, 2, 7, 5) == pytest.approx(1 / (0.01 * 0.05))          # 2000
    nominal = sample_weights("nominal_rho", ONE, torch.zeros(1, 2, dtype=torch.long), 10, 10, rho)
    # Option 1: P_test(group) / P_train(group) with P_test = (1/C) aligned, (C-1)/C conflicting per side.
    assert _w(nominal, 2, 2, 2) == pytest.approx((1 / 100) / (0.99 * 0.95))
    assert _w(nominal, 2, 7, 5) == pytest.approx((81 / 100) / (0.01 * 0.05))


def test_reweighting_defaults_follow_the_paper_and_bad_input_is_clear():
    assert resolve("auto", "biased_mnist") == "nominal_rho"
    assert resolve("auto", "multicolor_mnist") == "inverse_rho"
    assert resolve("auto", "civilcomments") == "group_balanced"
    assert resolve("auto", "biased_mnist", unsupervised=True) == "empirical"
    assert resolve("none", "biased_mnist") == "none"
    with pytest.raises(BiseError, match="unknown reweighting 'magic'"):
        resolve("magic", "biased_mnist")
    with pytest.raises(BiseError, match="nominal rho"):
        sample_weights("nominal_rho", ONE, ONE, 2, 2, None)


def test_mi_estimator_extremes():
    b = torch.arange(4).repeat(5)
    perfect = torch.nn.functional.one_hot(b, 4).float()
    assert normalized_mutual_information(b, perfect, 4).item() == pytest.approx(1.0, abs=1e-6)
    uniform = torch.full((20, 4), 0.25)
    assert normalized_mutual_information(b, uniform, 4).item() == pytest.approx(0.0, abs=1e-6)


def test_mi_estimator_by_hand():
    # Two samples, K = 2: b = (0, 1), q = ((0.8, 0.2), (0.4, 0.6)).
    b = torch.tensor([0, 1])
    q = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    p = torch.tensor([[0.4, 0.1], [0.2, 0.3]])
    pb, pq = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    expected = (p * torch.log(p / (pb * pq))).sum() / math.log(2)
    assert normalized_mutual_information(b, q, 2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_paper_schedule_is_100_epochs_and_bad_schedules_are_refused():
    assert SearchSettings().num_epochs == 100
    assert SearchSettings(tau_period=2, tau_min=0.04).num_epochs == 10
    for bad in (dict(tau_factor=1.0), dict(tau_factor=0.0), dict(tau_min=2.0), dict(tau_period=0)):
        with pytest.raises(BiseError, match="never stops"):
            SearchSettings(**bad).validate()
    with pytest.raises(BiseError, match="gamma"):
        SearchSettings(gamma=-1).validate()


@pytest.fixture(scope="module")
def tiny(embedded_digits):
    """A small BiasedMNIST and a briefly trained width-0.25 SimpleConvNet."""
    torch.manual_seed(0)
    bundle = build_biased_mnist(embedded_digits, rho=0.9, seed=0, max_samples=600, clean_split=True)
    model = build_backbone("simple_convnet", 10, width=0.25)
    fit(model, bundle["train"], TrainRecipe(epochs=2, batch_size=50, lr=0.05), seed=0)
    return bundle, freeze(model)


def test_cached_and_uncached_head_training_agree(tiny):
    bundle, model = tiny
    split = bundle["search"]
    z = predict(model, split, 200, features=True)["z"]
    results = []
    for cached in (True, False):
        head, opt = make_head(z.shape[1], 10, 0.1, 0.9, 1e-4, seed=5)
        generator = torch.Generator().manual_seed(11)
        for _ in range(3):
            if cached:
                feature_epoch([(head, opt)], z, split.b, 50, generator)
            else:
                model_epoch([(head, opt)], model, split, 50, generator, "cpu")
        results.append(torch.cat([head.weight.detach().flatten(), head.bias.detach()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_search_runs_selects_and_keeps_weights_frozen(tiny):
    bundle, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = GateSet(model.gate_points(), init=1.0).attach(model)
    settings = SearchSettings(tau_period=1, tau_min=0.2, head_pretrain_epochs=2, head_refine_epochs=1,
                              batch_size=50, gate_init=1.0, mask_lr=0.5)
    weights = sample_weights("nominal_rho", bundle["search"].y, bundle["search"].b, 10, 10, (0.9,))
    result = run_search(model, gates, bundle["search"], bundle["val"], bundle["test"], num_classes=10,
                        num_bias=10, weights=weights, settings=settings, seed=0)
    gates.detach()
    assert len(result.history) == settings.num_epochs == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    vals = [row["val_acc"] for row in result.history]
    best = max(range(len(vals)), key=lambda i: (vals[i], i)) + 1  # ties go to the later epoch
    assert result.best_epoch == best
    assert result.cached_features and not result.approximate_cache
    assert set(result.masks) == {p.name for p in model.gate_points()}
    assert all(row["mi"] is None or 0 <= row["mi"] <= 1 for row in result.history)


def test_search_refuses_an_unfrozen_model(tiny):
    bundle, _ = tiny
    model = build_backbone("simple_convnet", 10, width=0.25)
    gates = GateSet(model.gate_points()).attach(model)
    with pytest.raises(ValueError, match="frozen"):
        run_search(model, gates, bundle["search"], None, None, num_classes=10, num_bias=10,
                   weights=sample_weights("none", bundle["search"].y, bundle["search"].b, 10, 10, None),
                   settings=SearchSettings())


def test_two_bias_attributes_get_one_head_each_and_the_last_masks_without_val(tiny):
    """Multi-Color MNIST style: b has two columns; the search trains two heads and sums their MI."""
    bundle, model = tiny
    search = bundle["search"]
    second = torch.roll(search.b, 1)  # a second, differently distributed attribute
    split = Split(search.x, search.y, torch.stack([search.b, second], 1), search.encode)
    gates = GateSet(model.gate_points(), init=1.0).attach(model)
    settings = SearchSettings(tau_period=1, tau_min=0.3, head_pretrain_epochs=1, head_refine_epochs=1,
                              batch_size=100, gate_init=1.0, selection="last")
    weights = sample_weights("inverse_rho", split.y, split.b, 10, 10, (0.9, 0.5))
    result = run_search(model, gates, split, None, None, num_classes=10, num_bias=10, weights=weights,
                        settings=settings, bias_names=("left", "right"), seed=0)
    last = gates.binary_masks()
    gates.detach()
    assert len(result.head_states) == len(result.pretrain_head_states) == 2
    assert all(torch.equal(result.masks[k], last[k]) for k in last)
    assert result.best_epoch == len(result.history) == 2
    assert all(row["mi"] is None or 0 <= row["mi"] <= 2 for row in result.history)  # a sum of two in [0, 1]


def test_round_to_rounds_the_selected_masks_up(tiny):
    bundle, model = tiny
    gates = GateSet(model.gate_points(), init=1.0).attach(model)
    settings = SearchSettings(tau_period=1, tau_min=0.3, head_pretrain_epochs=1, head_refine_epochs=1,
                              batch_size=100, gate_init=1.0, mask_lr=0.5, selection="last", round_to=4)
    weights = sample_weights("nominal_rho", bundle["search"].y, bundle["search"].b, 10, 10, (0.9,))
    result = run_search(model, gates, bundle["search"], None, None, num_classes=10, num_bias=10, weights=weights,
                        settings=settings, seed=0)
    gates.detach()
    for name, mask in result.masks.items():
        kept, before = int(mask.sum()), int(result.unrounded_masks[name].sum())
        assert kept >= before and (kept % 4 == 0 or kept == mask.numel() or before == 0)
        assert bool((mask | ~result.unrounded_masks[name]).all())  # every unit kept before is still kept
    with pytest.raises(BiseError, match="round_to"):
        SearchSettings(round_to=0).validate()


def test_augmentation_switches_the_cached_head_features_off(tiny):
    """With an augmented search split the frozen model sees new inputs every epoch: cached features would be an
    approximation, so `cache_features=auto` recomputes them."""
    bundle, model = tiny
    search = bundle["search"]
    flips = Split(search.x, search.y, search.b, search.encode, augment=lambda x, g: x.flip(-1))
    weights = sample_weights("none", search.y, search.b, 10, 10, None)
    for augment, cached in ((True, False), (False, True)):
        gates = GateSet(model.gate_points(), init=1.0).attach(model)
        settings = SearchSettings(tau_period=1, tau_min=0.6, head_pretrain_epochs=1, head_refine_epochs=1,
                                  batch_size=100, gate_init=1.0, selection="last", augment=augment)
        result = run_search(model, gates, flips, None, None, num_classes=10, num_bias=10, weights=weights,
                            settings=settings, seed=0)
        gates.detach()
        assert result.cached_features is cached and not result.approximate_cache
