"""DFR (Kirichenko et al., ICLR 2023): balanced subsampling, the folded last layer, C selection, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bise_cli.dfr import (
    DFRResult,
    _l1_options,
    apply_dfr,
    balanced_indices,
    dfr_train,
    dfr_val,
    group_ids,
    run_dfr,
)
from bise_cli.errors import BiseError
from bise_cli.models.mlp import MLP


def _features(n_per_group: int, num_classes: int, seed: int, dim: int = 6, shift: float = 2.0):
    """Balanced toy features: every (y, b) cell has n_per_group samples; z carries y (weakly) and b."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), num_classes * n_per_group)
    b = np.tile(np.repeat(np.arange(num_classes), n_per_group), num_classes)
    z = rng.normal(size=(len(y), dim))
    z[:, 0] += shift * y
    z[:, 1] += 3.0 * b
    z = z * np.arange(1, dim + 1) + 5.0  # unequal scales and offsets: the standardisation matters
    return torch.tensor(z, dtype=torch.float32), torch.tensor(y), torch.tensor(b)


def test_balanced_subsample_has_equal_group_counts():
    y = torch.tensor([0] * 50 + [1] * 30 + [0] * 7 + [1] * 13)
    b = torch.tensor([0] * 50 + [1] * 30 + [1] * 7 + [0] * 13)
    groups = group_ids(y, b, 2)
    index = balanced_indices(groups, np.random.default_rng(0))
    assert np.unique(groups[index], return_counts=True)[1].tolist() == [7, 7, 7, 7]
    assert len(set(index.tolist())) == len(index)  # without replacement


def test_multi_attribute_groups_are_the_present_cells():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([[0, 0], [0, 1], [0, 1], [1, 1], [1, 1], [0, 1]])
    groups = group_ids(y, b, 2)
    assert len(np.unique(groups)) == 4  # (0,0,0), (0,0,1), (1,1,1), (1,0,1)
    index = balanced_indices(groups, np.random.default_rng(0))
    assert len(index) == 4 and len(np.unique(groups[index])) == 4


@pytest.mark.parametrize("num_classes", [2, 3])
def test_folded_layer_matches_the_sklearn_pipeline(num_classes):
    z, y, b = _features(40, num_classes, seed=0)
    # A balanced set and one subsample: the fit sees every sample, like the reference pipeline.
    result = run_dfr(z, y, b, z, y, b, num_classes=num_classes, num_bias=num_classes, c_grid=[0.3],
                     n_subsamples=1, seed=0)
    regression = LogisticRegression(C=0.3, solver="liblinear", random_state=0, **_l1_options())
    if num_classes > 2:
        regression = OneVsRestClassifier(regression)
    reference = make_pipeline(StandardScaler(), regression).fit(z.double().numpy(), y.numpy())
    expected = reference.predict(z.double().numpy())
    assert (result.logits(z).argmax(1).numpy() == expected).all()
    fitted = reference[-1]
    coefs = fitted.coef_ if num_classes == 2 else np.concatenate([e.coef_ for e in fitted.estimators_])
    assert np.allclose(result.weight[-len(coefs):].numpy(), coefs)
    # The folded nn.Linear equals "standardise, then the regression" exactly (up to float32).
    standardised = (z.double() - result.mean) / result.std
    assert torch.allclose(result.logits(z), standardised @ result.weight.t() + result.bias, atol=1e-4)
    if num_classes == 2:
        assert torch.equal(result.weight[0], torch.zeros_like(result.weight[0])) and result.bias[0] == 0


def test_apply_dfr_replaces_only_the_last_layer():
    torch.manual_seed(0)
    model = MLP(3, in_features=12, hidden=[8, 6], double_scale=False).eval()
    x = torch.randn(90, 12)
    with torch.no_grad():
        z = model.features(x)
    y = torch.arange(90) % 3
    result = run_dfr(z, y, y, z, y, y, num_classes=3, num_bias=3, c_grid=[1.0], n_subsamples=2, seed=0)
    new = apply_dfr(model, result)
    with torch.no_grad():
        assert torch.allclose(new(x), result.logits(z).float(), atol=1e-4)
        assert torch.equal(new.features(x), z)
    assert new is not model and not torch.equal(new.classifier.weight, model.classifier.weight)
    bad = DFRResult(torch.zeros(2, 6), torch.zeros(2), torch.zeros(6), torch.ones(6), 1.0)
    with pytest.raises(BiseError, match="does not match"):
        apply_dfr(model, bad)


def test_c_selection_picks_the_best_on_a_constructed_case():
    # Fit and selection sets where only feature 0 carries y; features 1..5 are noise the fit set makes look
    # useful (tiny fit set). Strong regularisation keeps only feature 0 and generalises; the grid must find it.
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 2, n)
        z = rng.normal(size=(n, 30))
        z[:, 0] += 1.5 * (2 * y - 1)
        return torch.tensor(z, dtype=torch.float32), torch.tensor(y)

    z_fit, y_fit = make(40)
    z_sel, y_sel = make(2000)
    grid = [100.0, 0.1]
    result = run_dfr(z_fit, y_fit, y_fit, z_sel, y_sel, y_sel, num_classes=2, num_bias=2, c_grid=grid,
                     n_subsamples=1, seed=0, select_metric="acc")
    scores = {row["c"]: row["acc"] for row in result.history}
    assert result.c == max(grid, key=lambda c: scores[c])
    assert [row["c"] for row in result.history] == grid
    # Another metric is honoured, and ties go to the earlier grid value (DFR's argmax).
    tie = run_dfr(z_fit, y_fit, y_fit, z_fit, y_fit, y_fit, num_classes=2, num_bias=2, c_grid=[50.0, 100.0],
                  n_subsamples=1, seed=0, select_metric="acc_worst_group")
    if tie.history[0]["acc_worst_group"] == tie.history[1]["acc_worst_group"]:
        assert tie.c == 50.0
    with pytest.raises(BiseError, match="select_metric"):
        run_dfr(z_fit, y_fit, y_fit, z_sel, y_sel, y_sel, num_classes=2, num_bias=2, select_metric="dp_diff")


def test_seeded_determinism_and_the_two_variants():
    z, y, b = _features(15, 3, seed=1)
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))
    z, y, b = z[order], y[order], b[order]
    options = dict(num_classes=3, num_bias=3, c_grid=[1.0, 0.1], n_subsamples=3)
    first, again = dfr_val(z, y, b, seed=4, **options), dfr_val(z, y, b, seed=4, **options)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert first.c == again.c and first.history == again.history
    other = dfr_val(z, y, b, seed=5, **options)
    assert not torch.equal(first.weight, other.weight)
    # dfr_val refits on all of val: its standardisation is val's.
    assert torch.allclose(first.mean, z.double().mean(0))
    # dfr_train without val selects on a held-out half and refits on the whole training split.
    no_val = dfr_train(z, y, b, seed=4, **options)
    assert torch.allclose(no_val.mean, z.double().mean(0)) and len(no_val.history) == 2
    with_val = dfr_train(z[:60], y[:60], b[:60], z[60:], y[60:], b[60:], seed=4, **options)
    assert torch.allclose(with_val.mean, z[:60].double().mean(0))


def test_groups_of_several_bias_attributes_are_alignment_patterns_per_class():
    from bise_cli.dfr import group_ids

    y = torch.tensor([0, 0, 0, 1, 1])
    b = torch.tensor([[0, 0], [0, 3], [5, 7], [1, 1], [2, 1]])   # per row: (left, right) colours
    ids = group_ids(y, b, num_bias=10)
    # (y, left aligned, right aligned): (0,1,1), (0,1,0), (0,0,0), (1,1,1), (1,0,1)
    assert ids.tolist() == [0 * 4 + 3, 0 * 4 + 2, 0, 1 * 4 + 3, 1 * 4 + 1]
    assert group_ids(y, b[:, 0], num_bias=10).tolist() == [0, 0, 5, 11, 12]  # one attribute: the (y, b) cell
