"""LfF (Nam et al., NeurIPS 2020): GCE, the per-sample loss EMA, relative difficulty and the training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bise_cli.baselines.lff import SampleLossEMA, generalized_cross_entropy, relative_difficulty, train_lff
from bise_cli.core.errors import BiseError
from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import fit
from bise_cli.models.mlp import MLP


def test_gce_value_and_gradient_by_hand():
    q = 0.7
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    y = torch.tensor([0, 2])
    p_y = F.softmax(logits, 1)[torch.arange(2), y]
    # The implemented value: CE * p_y^q * q.
    loss = generalized_cross_entropy(logits, y, q)
    assert torch.allclose(loss, -torch.log(p_y) * p_y ** q * q)
    # Its gradient is q times the gradient of the GCE formula (1 - p_y^q) / q.
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (formula,) = torch.autograd.grad(((1 - p_y ** q) / q).sum(), logits)
    assert torch.allclose(grad, q * formula, atol=1e-6)
    # A hand value for sample 0: p_y = softmax([2, .5, -1])[0].
    p0 = torch.exp(torch.tensor(2.0)) / torch.exp(torch.tensor([2.0, 0.5, -1.0])).sum()
    assert loss[0].item() == pytest.approx((-torch.log(p0) * p0 ** q * q).item(), rel=1e-6)


def test_ema_update_and_class_normalisation():
    labels = torch.tensor([0, 0, 1, 1])
    ema = SampleLossEMA(labels, num_classes=2, alpha=0.7)
    ema.update(torch.tensor([1.0, 3.0]), torch.tensor([0, 2]))   # first visit: the loss itself
    assert ema.value.tolist() == pytest.approx([1.0, 0.0, 3.0, 0.0])
    ema.update(torch.tensor([2.0, 4.0]), torch.tensor([0, 1]))   # 0.7 * 1 + 0.3 * 2; sample 1 first visit
    assert ema.value.tolist() == pytest.approx([1.3, 4.0, 3.0, 0.0])
    assert ema.class_max().tolist() == pytest.approx([4.0, 3.0])
    assert ema.normalized(torch.tensor([0, 2])).tolist() == pytest.approx([1.3 / 4.0, 1.0])
    w = relative_difficulty(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert w.tolist() == pytest.approx([0.5, 0.0])


def _biased_problem(n: int = 200, seed: int = 0) -> Split:
    """Feature 0 carries the target, feature 1 a shortcut that agrees with it on 90 % of the samples."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    b = torch.where(torch.rand(n, generator=g) < 0.9, y, 1 - y)
    x = torch.randn(n, 4, generator=g) * 0.5
    x[:, 0] += 0.5 * (2 * y - 1)
    x[:, 1] += 2.0 * (2 * b - 1)
    return Split(x, y, b)


def _model():
    return MLP(2, in_features=4, hidden=[8], double_scale=False)


def test_lff_trains_deterministically_and_differs_from_plain_ce():
    split = _biased_problem()
    recipe = TrainRecipe(epochs=3, batch_size=32, optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.9)
    first, history = train_lff(_model, split, recipe, seed=3)
    again, _ = train_lff(_model, split, recipe, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    assert len(history) == 3 and 0 <= history[-1]["weight_mean"] <= 1 and not first.training
    # Plain CE from the same initialisation (LfF's debiased model is the second one built from the seed).
    with torch.random.fork_rng():
        torch.manual_seed(3)
        _model()
        plain = _model()
    fit(plain, split, recipe, seed=3)
    assert not torch.allclose(plain.classifier.weight, first.classifier.weight)


def test_lff_upweights_the_samples_the_biased_model_fails_on():
    split = _biased_problem(400, seed=1)
    _, history = train_lff(_model, split, TrainRecipe(epochs=8, batch_size=50, optimizer="adam", lr=1e-2,
                                                       weight_decay=0.0), seed=0)
    # As the biased model learns the shortcut, the mean weight falls below 0.5 and the weights spread out.
    assert history[-1]["weight_mean"] < 0.5 and history[-1]["weight_std"] > 0.1


def test_lff_refuses_bad_settings_and_divergence():
    split = _biased_problem(40)
    with pytest.raises(BiseError, match="q"):
        train_lff(_model, split, TrainRecipe(epochs=1, batch_size=8), q=0.0)
    with pytest.raises(BiseError, match="diverged"):
        train_lff(_model, split, TrainRecipe(epochs=2, batch_size=8, lr=1e12, momentum=0.0))


def test_lff_adamw_runs():
    _, history = train_lff(_model, _biased_problem(40), TrainRecipe(epochs=1, batch_size=16, optimizer="adamw",
                                                                     lr=1e-3))
    assert len(history) == 1
