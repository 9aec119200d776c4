"""Label noise (exact count, never the same class, seeded) and vectorised bootstrap confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.core.metrics import ACCURACY_METRICS, accuracy_metrics
from bise_cli.data.noise import flip_labels
from bise_cli.method.bootstrap import bootstrap_ci, bootstrap_distribution, resample_counts


def test_flip_labels_count_classes_and_seed():
    y = torch.arange(1000) % 7
    noisy, flipped = flip_labels(y, 0.23, 7, seed=1)
    assert int(flipped.sum()) == 230 and int((noisy != y).sum()) == 230
    assert torch.equal(noisy != y, flipped)                       # a flipped label never stays the same
    assert noisy.min() >= 0 and noisy.max() < 7 and noisy.dtype == y.dtype
    assert torch.equal(flip_labels(y, 0.23, 7, seed=1)[0], noisy)
    assert not torch.equal(flip_labels(y, 0.23, 7, seed=2)[0], noisy)
    # Uniform over the other classes: every other class is reached from class 0.
    assert set(noisy[flipped & (y == 0)].tolist()) == set(range(1, 7))
    same, none = flip_labels(y, 0.0, 7, seed=1)
    assert torch.equal(same, y) and not none.any()
    assert int(flip_labels(torch.zeros(3, dtype=torch.long), 0.5, 2, seed=0)[1].sum()) == 2  # round(1.5) = 2
    with pytest.raises(BiseError, match="fraction"):
        flip_labels(y, 1.5, 7, seed=0)


def _table(n: int, seed: int, attributes: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    shape = (n,) if attributes == 1 else (n, attributes)
    b = torch.where(torch.rand(shape, generator=g) < 0.7, y if attributes == 1 else y[:, None].expand(shape),
                    torch.randint(0, 3, shape, generator=g))
    pred = torch.where(torch.rand(n, generator=g) < 0.8, y, torch.randint(0, 3, (n,), generator=g))
    return y, b, pred


def _slow_reference(y, b, pred, n, seed, alpha):
    """One explicit resampled table per resample (the same draws), scored by bise_cli.core.metrics."""
    draws = resample_counts(y, b, pred, n, seed)
    # A representative sample of every (group, correct) category; every copy of it scores the same.
    from bise_cli.method.bootstrap import group_codes
    code, _, _ = group_codes(y, b)
    category = code * 2 + (pred == y).long().numpy()
    counts = np.stack([draws["counts"] - draws["hits"], draws["hits"]], 2).reshape(n, -1)  # (n, 2G)
    values = {m: [] for m in ACCURACY_METRICS}
    for r in range(n):
        index = np.concatenate([np.repeat(np.flatnonzero(category == k)[0], c) for k, c in enumerate(counts[r])
                                if c])
        m = accuracy_metrics(y[index], b[index], pred[index], 3, 3)
        for name in ACCURACY_METRICS:
            values[name].append(m[name])
    out = {}
    for name, v in values.items():
        v = np.array(v, dtype=float)
        v = v[~np.isnan(v)]
        out[name] = tuple(np.quantile(v, [alpha / 2, 1 - alpha / 2]))
    return out


@pytest.mark.parametrize("attributes", [1, 2])
def test_bootstrap_matches_a_slow_loop_with_the_same_draws(attributes):
    y, b, pred = _table(60, seed=attributes, attributes=attributes)
    fast = bootstrap_ci(y, b, pred, n=200, seed=7, alpha=0.1)
    slow = _slow_reference(y, b, pred, 200, 7, 0.1)
    for name in ACCURACY_METRICS:
        assert fast[name] == pytest.approx(slow[name], abs=1e-6), name


def test_bootstrap_agrees_in_distribution_with_an_index_bootstrap():
    y, b, pred = _table(300, seed=3)
    fast = bootstrap_distribution(y, b, pred, n=2000, seed=0)
    rng = np.random.default_rng(1)
    slow = [accuracy_metrics(y[i], b[i], pred[i], 3, 3) for i in rng.integers(0, 300, size=(400, 300))]
    for name in ("acc", "acc_unbiased", "acc_conflicting"):
        reference = np.array([m[name] for m in slow])
        assert np.nanmean(fast[name]) == pytest.approx(reference.mean(), abs=0.01)
        assert np.nanstd(fast[name]) == pytest.approx(reference.std(), rel=0.2)


def test_bootstrap_ci_contains_the_point_estimate_and_is_seeded():
    y, b, pred = _table(500, seed=0)
    point = accuracy_metrics(y, b, pred, 3, 3)
    ci = bootstrap_ci(y, b, pred, n=500, seed=1)
    for name in ("acc", "acc_unbiased", "acc_aligned", "acc_conflicting"):
        assert ci[name][0] <= point[name] <= ci[name][1], name
    assert bootstrap_ci(y, b, pred, n=500, seed=1) == ci
    assert bootstrap_ci(y, b, pred, n=500, seed=2) != ci
    narrow = bootstrap_ci(y, b, pred, ["acc"], n=500, seed=1, alpha=0.5)["acc"]
    assert ci["acc"][0] <= narrow[0] <= narrow[1] <= ci["acc"][1]


def test_bootstrap_undefined_metric_is_nan_and_unknown_metric_is_refused():
    y = torch.tensor([0, 1, 2, 0])
    ci = bootstrap_ci(y, y, y, ["acc", "acc_conflicting"], n=50, seed=0)
    assert ci["acc"] == (1.0, 1.0) and all(math.isnan(v) for v in ci["acc_conflicting"])
    with pytest.raises(BiseError, match="bootstrap metric"):
        bootstrap_ci(y, y, y, ["dp_diff"])
