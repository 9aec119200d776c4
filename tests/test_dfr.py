"""DFR (Kirichenko et al., ICLR 2023): the order of DFR's code (against a reference computation written step by
step after it), balanced subsampling, the folded last layer, C selection, settings, and the record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import bise_cli.baselines.dfr as dfr_module
from bise_cli.baselines.dfr import (
    DFR_C_GRID,
    DFRResult,
    _l1_options,
    apply_dfr,
    balanced_indices,
    dfr_options,
    dfr_train,
    dfr_val,
    fit_logreg,
    group_ids,
)
from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.models.mlp import MLP

from conftest import TINY_OVERRIDES, run_bise

CONFIG = Path(dfr_module.__file__).parents[1] / "conf" / "config.yaml"


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


def _spurious(n: int, rho: float, rng: np.random.Generator, dim: int = 8):
    """Binary y and b with P(b = y) = rho; the features carry y weakly and b strongly (a spurious feature), on
    unequal scales. Float64 numpy (as DFR's embeddings) and the same as torch tensors."""
    y = rng.integers(0, 2, n)
    b = np.where(rng.random(n) < rho, y, 1 - y)
    z = rng.normal(size=(n, dim))
    z[:, 0] += 1.0 * (2 * y - 1)
    z[:, 1] += 2.5 * (2 * b - 1)
    z = z * np.linspace(0.5, 4.0, dim) + 3.0
    return z, y, b


# ---------------------------------------------------------------- a reference written after DFR's code order
#
# DFR's `dfr_evaluate_spurious.py` (binary, the script's defaults: no class weights, balance_dfr_val and
# notrain_dfr_val on), step by step, with one seeded numpy Generator in place of numpy's global generator and
# liblinear's seed drawn from it at each fit (scikit-learn draws it from the global generator when DFR passes
# no random_state). Groups are g = 2 y + b. Not used by bise_cli: an independent transcription to test against.

def _draw(rng):
    return int(rng.integers(np.iinfo(np.int32).max))


def _logreg(c, rng, **extra):
    return LogisticRegression(C=c, solver="liblinear", random_state=_draw(rng), **_l1_options(), **extra)


def _balance(x, y, g, rng):
    n_groups = np.max(g) + 1
    g_idx = [np.where(g == k)[0] for k in range(n_groups)]
    min_g = np.min([len(k) for k in g_idx])
    for k in g_idx:
        rng.shuffle(k)
    return (np.concatenate([x[k[:min_g]] for k in g_idx]), np.concatenate([y[k[:min_g]] for k in g_idx]),
            np.concatenate([g[k[:min_g]] for k in g_idx]))


def _worst(preds, y, g):
    return np.min([(preds == y)[g == k].mean() for k in range(np.max(g) + 1)])


def _average(coefs, intercepts):
    return np.mean(coefs, axis=0), np.mean(intercepts, axis=0)


def reference_dfr_val(x_train, x_val, y_val, g_val, c_options, num_retrains, seed):
    """dfr_on_validation_tune (num_retrains=1) then dfr_on_validation_eval."""
    rng = np.random.default_rng(seed)
    # --- tune: shuffle, hold out the first half, balance the second, scaler on the balanced half
    n_val = len(x_val) // 2
    idx = np.arange(len(x_val))
    rng.shuffle(idx)
    x_vt, y_vt, g_vt = _balance(x_val[idx[n_val:]], y_val[idx[n_val:]], g_val[idx[n_val:]], rng)
    x_ho, y_ho, g_ho = x_val[idx[:n_val]], y_val[idx[:n_val]], g_val[idx[:n_val]]
    scaler = StandardScaler()
    x_vt = scaler.fit_transform(x_vt)
    x_ho = scaler.transform(x_ho)
    worst_accs = {}
    for c in c_options:
        logreg = _logreg(c, rng)
        logreg.fit(x_vt, y_vt)
        worst_accs[c] = _worst(logreg.predict(x_ho), y_ho, g_ho)
    best_c = list(worst_accs)[int(np.argmax(list(worst_accs.values())))]
    # --- eval: scaler on the training embeddings, num_retrains balanced draws of all of val
    scaler = StandardScaler()
    scaler.fit(x_train)
    coefs, intercepts = [], []
    for _ in range(num_retrains):
        x_b, y_b, _ = _balance(x_val, y_val, g_val, rng)
        logreg = _logreg(best_c, rng)
        logreg.fit(scaler.transform(x_b), y_b)
        coefs.append(logreg.coef_)
        intercepts.append(logreg.intercept_)
    return best_c, worst_accs, scaler, *_average(coefs, intercepts)


def reference_dfr_train(x_train, y_train, g_train, x_val, y_val, g_val, c_options, num_retrains, seed):
    """dfr_train_subset_tune (learn_class_weights off) then dfr_train_subset_eval."""
    rng = np.random.default_rng(seed)
    # --- tune: scaler on all of train, ONE balanced draw, max_iter=20, worst group on val
    scaler = StandardScaler()
    scaler.fit(x_train)
    x_b, y_b, _ = _balance(x_train, y_train, g_train, rng)
    x_b, x_v = scaler.transform(x_b), scaler.transform(x_val)
    worst_accs = {}
    for c in c_options:
        logreg = _logreg(c, rng, max_iter=20)
        logreg.fit(x_b, y_b)
        worst_accs[c] = _worst(logreg.predict(x_v), y_val, g_val)
    best_c = list(worst_accs)[int(np.argmax(list(worst_accs.values())))]
    # --- eval: scaler on all of train, num_retrains fresh balanced draws
    scaler = StandardScaler()
    scaler.fit(x_train)
    coefs, intercepts = [], []
    for _ in range(num_retrains):
        x_b, y_b, _ = _balance(x_train, y_train, g_train, rng)
        logreg = _logreg(best_c, rng)
        logreg.fit(scaler.transform(x_b), y_b)
        coefs.append(logreg.coef_)
        intercepts.append(logreg.intercept_)
    return best_c, worst_accs, scaler, *_average(coefs, intercepts)


def _assert_same_model(result: DFRResult, best_c, worst_accs, scaler, coef, intercept, x_test):
    assert result.c == best_c
    assert [row["c"] for row in result.history] == list(worst_accs)
    assert [row["acc_worst_group"] for row in result.history] == list(worst_accs.values())
    assert np.array_equal(result.mean.numpy(), scaler.mean_) and np.array_equal(result.std.numpy(), scaler.scale_)
    # Binary: bise's rows are [0; w] and [0; b], so the logit difference is DFR's decision function.
    assert np.array_equal(result.weight.numpy()[1], coef[0]) and not result.weight[0].any()
    assert np.array_equal(result.bias.numpy(), np.array([0.0, intercept[0]]))
    ours = result.logits(torch.from_numpy(x_test)).argmax(1).numpy()
    theirs = (scaler.transform(x_test) @ coef.T + intercept).ravel() > 0   # LogisticRegression.predict
    assert np.array_equal(ours, theirs.astype(int))


@pytest.mark.parametrize("seed", [0, 3])
def test_dfr_val_is_dfrs_code_step_by_step(seed):
    rng = np.random.default_rng(100 + seed)
    x_train, _, _ = _spurious(600, 0.9, rng)      # biased: its statistics standardise the final layer
    x_val, y_val, b_val = _spurious(240, 0.5, rng)
    x_test, _, _ = _spurious(300, 0.5, rng)
    grid, retrains = [1.0, 0.3, 0.07, 0.01], 5
    expected = reference_dfr_val(x_train, x_val, y_val, 2 * y_val + b_val, grid, retrains, seed)
    result = dfr_val(torch.from_numpy(x_val), torch.from_numpy(y_val), torch.from_numpy(b_val),
                     torch.from_numpy(x_train), num_classes=2, num_bias=2, c_grid=grid, n_subsamples=retrains,
                     seed=seed)
    assert result.n_subsamples == retrains
    _assert_same_model(result, *expected, x_test)


@pytest.mark.parametrize("seed", [0, 5])
def test_dfr_train_is_dfrs_code_step_by_step(seed):
    rng = np.random.default_rng(200 + seed)
    x_train, y_train, b_train = _spurious(500, 0.95, rng)
    x_val, y_val, b_val = _spurious(200, 0.5, rng)
    x_test, _, _ = _spurious(300, 0.5, rng)
    grid, retrains = list(DFR_C_GRID), 4
    expected = reference_dfr_train(x_train, y_train, 2 * y_train + b_train, x_val, y_val, 2 * y_val + b_val, grid,
                                   retrains, seed)
    t = torch.from_numpy
    result = dfr_train(t(x_train), t(y_train), t(b_train), t(x_val), t(y_val), t(b_val), num_classes=2, num_bias=2,
                       c_grid=grid, n_subsamples=retrains, select_max_iter=20, seed=seed)
    _assert_same_model(result, *expected, x_test)


def test_one_balanced_subsample_serves_every_c_and_the_iteration_limits(monkeypatch):
    # The subsamples drawn: one before the C loop, then one per averaged final fit, whatever the grid's length;
    # liblinear's iteration limit per fit: 20 while tuning DFR on train, 100 while tuning on val and at the end.
    draws, limits = [], []
    real_draw, real_fit = dfr_module.balanced_indices, dfr_module.fit_logreg
    monkeypatch.setattr(dfr_module, "balanced_indices", lambda g, rng: draws.append(1) or real_draw(g, rng))
    monkeypatch.setattr(dfr_module, "fit_logreg", lambda *a: limits.append(a[-1]) or real_fit(*a))
    z, y, b = _features(12, 2, seed=0)
    options = dfr_options(yaml.safe_load(CONFIG.read_text())["baselines"]["dfr"], "dfr_train")
    dfr_train(z, y, b, num_classes=2, num_bias=2, **{**options, "n_subsamples": 3})
    assert len(draws) == 1 + 3 and limits == [20] * len(DFR_C_GRID) + [100] * 3
    draws.clear()
    limits.clear()
    options = dfr_options(yaml.safe_load(CONFIG.read_text())["baselines"]["dfr"], "dfr_val")
    dfr_val(z, y, b, z, num_classes=2, num_bias=2, **{**options, "n_subsamples": 4, "n_select_subsamples": 2})
    assert len(draws) == 2 + 4 and limits == [100] * (2 * len(DFR_C_GRID) + 4)


# ---------------------------------------------------------------------------------------------- the pieces

def test_balanced_subsample_has_equal_group_counts():
    y = torch.tensor([0] * 50 + [1] * 30 + [0] * 7 + [1] * 13)
    b = torch.tensor([0] * 50 + [1] * 30 + [1] * 7 + [0] * 13)
    groups = group_ids(y, b, 2)
    index = balanced_indices(groups, np.random.default_rng(0))
    assert np.unique(groups[index], return_counts=True)[1].tolist() == [7, 7, 7, 7]
    assert len(set(index.tolist())) == len(index)  # without replacement
    assert groups[index].tolist() == sorted(groups[index].tolist())  # DFR's order: group by group


def test_multi_attribute_groups_are_the_present_cells():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([[0, 0], [0, 1], [0, 1], [1, 1], [1, 1], [0, 1]])
    groups = group_ids(y, b, 2)
    assert len(np.unique(groups)) == 4  # (0,0,0), (0,0,1), (1,1,1), (1,0,1)
    index = balanced_indices(groups, np.random.default_rng(0))
    assert len(index) == 4 and len(np.unique(groups[index])) == 4


def test_groups_of_several_bias_attributes_are_alignment_patterns_per_class():
    y = torch.tensor([0, 0, 0, 1, 1])
    b = torch.tensor([[0, 0], [0, 3], [5, 7], [1, 1], [2, 1]])   # per row: (left, right) colours
    ids = group_ids(y, b, num_bias=10)
    # (y, left aligned, right aligned): (0,1,1), (0,1,0), (0,0,0), (1,1,1), (1,0,1)
    assert ids.tolist() == [0 * 4 + 3, 0 * 4 + 2, 0, 1 * 4 + 3, 1 * 4 + 1]
    assert group_ids(y, b[:, 0], num_bias=10).tolist() == [0, 0, 5, 11, 12]  # one attribute: the (y, b) cell


@pytest.mark.parametrize("num_classes", [2, 3])
def test_logistic_layer_matches_the_sklearn_pipeline(num_classes):
    z, y, _ = _features(40, num_classes, seed=0)
    x = StandardScaler().fit_transform(z.double().numpy())
    w, bias = fit_logreg(x, y.numpy(), num_classes, c=0.3, seed=7)
    regression = LogisticRegression(C=0.3, solver="liblinear", random_state=7, **_l1_options())
    if num_classes > 2:
        regression = OneVsRestClassifier(regression)   # what liblinear does for several classes
    reference = make_pipeline(StandardScaler(), regression).fit(z.double().numpy(), y.numpy())
    fitted = reference[-1]
    coefs = fitted.coef_ if num_classes == 2 else np.concatenate([e.coef_ for e in fitted.estimators_])
    assert np.allclose(w[-len(coefs):], coefs)
    result = DFRResult(torch.from_numpy(w), torch.from_numpy(bias), torch.from_numpy(reference[0].mean_),
                       torch.from_numpy(reference[0].scale_), c=0.3)
    assert (result.logits(z).argmax(1).numpy() == reference.predict(z.double().numpy())).all()
    # The folded nn.Linear equals "standardise, then the regression" exactly (up to float32).
    standardised = (z.double() - result.mean) / result.std
    assert torch.allclose(result.logits(z), standardised @ result.weight.t() + result.bias, atol=1e-4)


def test_apply_dfr_replaces_only_the_last_layer():
    torch.manual_seed(0)
    model = MLP(3, in_features=12, hidden=[8, 6], double_scale=False).eval()
    x = torch.randn(90, 12)
    with torch.no_grad():
        z = model.features(x)
    y = torch.arange(90) % 3
    result = dfr_train(z, y, y, z, y, y, num_classes=3, num_bias=3, c_grid=[1.0], n_subsamples=2, seed=0)
    new = apply_dfr(model, result)
    with torch.no_grad():
        assert torch.allclose(new(x), result.logits(z).float(), atol=1e-4)
        assert torch.equal(new.features(x), z)
    assert new is not model and not torch.equal(new.classifier.weight, model.classifier.weight)
    bad = DFRResult(torch.zeros(2, 6), torch.zeros(2), torch.zeros(6), torch.ones(6), 1.0)
    with pytest.raises(BiseError, match="does not match"):
        apply_dfr(model, bad)


def test_c_selection_picks_the_best_on_a_constructed_case():
    # Fit and selection sets where only feature 0 carries y; features 1..29 are noise the fit set makes look
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
    result = dfr_train(z_fit, y_fit, y_fit, z_sel, y_sel, y_sel, num_classes=2, num_bias=2, c_grid=grid,
                       n_subsamples=1, seed=0, select_metric="acc")
    scores = {row["c"]: row["acc"] for row in result.history}
    assert result.c == 0.1 and scores[0.1] > scores[100.0]
    assert [row["c"] for row in result.history] == grid
    # Ties go to the earlier grid value (DFR's argmax): two C so strong that both keep nothing but the intercept.
    tie = dfr_train(z_fit, y_fit, y_fit, z_sel, y_sel, y_sel, num_classes=2, num_bias=2, c_grid=[1e-4, 1e-5],
                    n_subsamples=1, seed=0, select_metric="acc")
    assert tie.history[0]["acc"] == tie.history[1]["acc"] and tie.c == 1e-4


def test_seeded_determinism_and_the_two_variants():
    z, y, b = _features(15, 3, seed=1)
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(0))
    z, y, b = z[order], y[order], b[order]
    z_train = z * 2 + 1
    options = dict(num_classes=3, num_bias=3, c_grid=[1.0, 0.1], n_subsamples=3)
    first, again = dfr_val(z, y, b, z_train, seed=4, **options), dfr_val(z, y, b, z_train, seed=4, **options)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert first.c == again.c and first.history == again.history and first.n_subsamples == 3
    other = dfr_val(z, y, b, z_train, seed=5, **options)
    assert not torch.equal(first.weight, other.weight)
    # dfr_val fits on val but standardises with the training embeddings' statistics (DFR's code).
    assert torch.allclose(first.mean, z_train.double().mean(0))
    # dfr_train without val selects on a held-out half and refits on the whole training split.
    no_val = dfr_train(z, y, b, seed=4, **options)
    assert torch.allclose(no_val.mean, z.double().mean(0)) and len(no_val.history) == 2
    with_val = dfr_train(z[:60], y[:60], b[:60], z[60:], y[60:], b[60:], seed=4, **options)
    assert torch.allclose(with_val.mean, z[:60].double().mean(0))


def test_settings_per_stage_and_bad_values():
    config = yaml.safe_load(CONFIG.read_text())
    settings = config["baselines"]["dfr"]
    # The shipped defaults are DFR's code: 10 / 20 retrains, max_iter 20 / 100 while tuning.
    train, val = dfr_options(settings, "dfr_train"), dfr_options(settings, "dfr_val")
    assert (train["n_subsamples"], train["select_max_iter"]) == (10, 20)
    assert (val["n_subsamples"], val["select_max_iter"]) == (20, 100)
    assert train["c_grid"] == list(DFR_C_GRID) and train["n_select_subsamples"] == 1
    assert dfr_options({**settings, "n_subsamples": 5}, "dfr_val")["n_subsamples"] == 5   # one number: both
    for stage, bad, message in (
            ("dfr_train", {"n_subsamples": {"dfr_train": 0, "dfr_val": 20}}, "n_subsamples must be an integer"),
            ("dfr_val", {"n_subsamples": {"dfr_train": 10}}, "has no value for dfr_val"),
            ("dfr_train", {"c_grid": [1.0, -1.0]}, "c_grid must be a non-empty list"),
            ("dfr_train", {"select_metric": "dp_diff"}, "select_metric")):
        with pytest.raises(BiseError, match=message):
            dfr_options({**settings, **bad}, stage)


def test_records_carry_the_chosen_c_and_the_subsamples(tmp_path):
    # Through the real entry point, per-stage overrides as a user types them.
    result = run_bise("run", *TINY_OVERRIDES, "stages=[vanilla,dfr_train,dfr_val]",
                      "baselines.dfr.n_subsamples.dfr_val=3", "output_root=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = list((tmp_path / "out" / "runs").iterdir())
    records = {r["stage"]: r for r in read_jsonl(folder / "metrics.jsonl")}
    assert records["dfr_train"]["dfr_subsamples"] == 10 and records["dfr_val"]["dfr_subsamples"] == 3
    for stage in ("dfr_train", "dfr_val"):
        history = json.loads((folder / f"{stage}_history.json").read_text())
        assert records[stage]["dfr_c"] in DFR_C_GRID and [row["c"] for row in history] == list(DFR_C_GRID)
    # A bad DFR setting stops the run before the vanilla model trains (exit 2, one line).
    bad = run_bise("run", *TINY_OVERRIDES, "stages=[vanilla,dfr_val]", "baselines.dfr.select_max_iter.dfr_val=0",
                   "output_root=bad", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "baselines.dfr.select_max_iter must be an integer >= 1, got 0" in bad.stderr
    assert not (tmp_path / "bad" / "runs").exists() or not any((tmp_path / "bad" / "runs").rglob("metrics.jsonl"))


def test_unconverged_tuning_fits_are_one_log_line_not_a_warning_each(caplog):
    import logging
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    z, y, b = _features(30, 2, seed=2, dim=12)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="bise_cli.baselines.dfr"):
        warnings.simplefilter("always")
        dfr_train(z, y, b, num_classes=2, num_bias=2, c_grid=[1.0, 0.3], n_subsamples=2, select_max_iter=1, seed=0)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any("stopped at max_iter=1 before converging" in r.getMessage() for r in caplog.records)
