"""The BISE search: reweighting, MI estimator, schedule, cached head training, selection, errors."""

from __future__ import annotations

import math

import pytest
import torch

from bise_cli.bise import (
    SearchSettings,
    group_weights,
    make_head,
    normalized_mutual_information,
    run_search,
    train_head_on_features,
    train_head_on_model,
)
from bise_cli.data.biased_mnist import build_biased_mnist
from bise_cli.errors import BiseError
from bise_cli.masking import GateSet
from bise_cli.models import build_backbone
from bise_cli.train import fit, freeze, predict


def test_nominal_rho_weights_match_the_paper():
    table = group_weights("nominal_rho", torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                          10, 10, 0.99)
    assert table[3, 3].item() == pytest.approx(1 / 9.9)           # 0.101
    assert table[3, 4].item() == pytest.approx(9 / (10 * 0.01))   # 90
    # Under the ideal construction the expected weight is 1.
    assert (0.99 * table[0, 0] + 0.01 * table[0, 1]).item() == pytest.approx(1.0)


def test_group_inverse_frequency_weights():
    y = torch.tensor([0, 0, 0, 1])
    b = torch.tensor([0, 0, 1, 1])
    table = group_weights("group_inverse_freq", y, b, 2, 2, None)
    assert table[0, 0].item() == pytest.approx(1 / (4 * 0.5))
    assert table[1, 1].item() == pytest.approx(1 / (4 * 0.25))
    assert table[1, 0].item() == pytest.approx(1 / (4 * 0.25))  # empty cell: count clamped to 1
    assert torch.equal(group_weights("none", y, b, 2, 2, None), torch.ones(2, 2))


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
    with pytest.raises(BiseError, match="unknown pruning.reweighting"):
        SearchSettings(reweighting="magic").validate()


@pytest.fixture(scope="module")
def tiny(embedded_digits):
    """A small BiasedMNIST and a briefly trained width-0.25 SimpleConvNet."""
    torch.manual_seed(0)
    bundle = build_biased_mnist(embedded_digits, rho=0.9, seed=0, max_samples=600, clean_split=True)
    model = build_backbone("simple_convnet", 10, width=0.25)
    fit(model, bundle["train"], epochs=2, batch_size=50, lr=0.05, seed=0)
    return bundle, freeze(model)


def test_cached_and_uncached_head_training_agree(tiny):
    bundle, model = tiny
    split = bundle["search"]
    z = predict(model, split, 200, features=True)["z"]
    results = []
    for cached in (True, False):
        head, opt = make_head(z.shape[1], 10, 0.1, 0.9, 1e-4, seed=5)
        generator = torch.Generator().manual_seed(11)
        if cached:
            train_head_on_features(head, opt, z, split.b, 3, 50, generator)
        else:
            train_head_on_model(head, opt, model, split, 3, 50, generator, "cpu")
        results.append(torch.cat([head.weight.detach().flatten(), head.bias.detach()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_search_runs_selects_and_keeps_weights_frozen(tiny):
    bundle, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = GateSet(model.gate_points(), init=1.0).attach(model)
    settings = SearchSettings(tau_period=1, tau_min=0.2, head_pretrain_epochs=2, head_refine_epochs=1,
                              batch_size=50, gate_init=1.0, mask_lr=0.5)
    result = run_search(model, gates, bundle["search"], bundle["val"], bundle["test"], num_classes=10,
                        num_bias=10, rho=0.9, settings=settings, seed=0)
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
        run_search(model, gates, bundle["search"], None, None, num_classes=10, num_bias=10, rho=0.9,
                   settings=SearchSettings())
