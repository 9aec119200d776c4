"""Percentile bootstrap confidence intervals of the accuracy metrics of one prediction table (y, b, pred).

Every accuracy metric of bise_cli.core.metrics (acc, acc_unbiased, acc_worst_group, acc_aligned, acc_conflicting)
is a function of two numbers per group: how many samples it holds and how many of them are predicted right.
Resampling the N samples with replacement therefore only matters through the counts of the 2G categories
(group, correct or not), and those counts follow a multinomial with N trials and the categories' observed
frequencies. So all resamples are drawn at once as an (n, 2G) count matrix, which is exactly the ordinary
sample bootstrap, vectorised: no loop over resamples and no (n, N) index matrix.

Groups follow bise_cli.core.metrics: the (y, b) cells for one bias attribute; the 2^A alignment patterns
(attribute k aligned iff b_k == y) for A attributes. A group absent from a resample is left out of that
resample's mean and minimum, as the metrics do for the test set. Resamples where a metric is undefined (no
aligned or no conflicting sample) are ignored by its quantiles.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from bise_cli.core.errors import check_choice
from bise_cli.core.metrics import ACCURACY_METRICS


def group_codes(y: torch.Tensor, b: torch.Tensor, num_bias: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code per sample, aligned flag per group, conflicting flag per group) for the groups of the metrics."""
    y, b = y.long().cpu().numpy(), b.long().cpu().numpy()
    if b.ndim == 2 and b.shape[1] > 1:
        attributes = b.shape[1]
        aligned = b == y[:, None]
        # Bit k (most significant first) set when attribute k is aligned: all ones = aligned everywhere.
        code = (aligned * (2 ** np.arange(attributes - 1, -1, -1))).sum(1)
        groups = np.arange(2 ** attributes)
        return code, groups == 2 ** attributes - 1, groups == 0
    b = b.reshape(-1)
    num_bias = num_bias or int(max(b.max(initial=0), y.max(initial=0))) + 1
    code = y * num_bias + b
    groups = np.arange(int(code.max(initial=0)) + 1)
    return code, groups // num_bias == groups % num_bias, groups // num_bias != groups % num_bias


def resample_counts(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor, n: int, seed: int,
                    num_bias: int | None = None) -> dict[str, np.ndarray]:
    """The bootstrap as counts: {"counts", "hits"} of shape (n, G) per resample and group, plus the group
    flags "aligned" and "conflicting" (G,)."""
    code, aligned, conflicting = group_codes(y, b, num_bias)
    groups = len(aligned)
    correct = (pred.long().cpu().numpy() == y.long().cpu().numpy()).astype(np.int64)
    category = code * 2 + correct                       # (group, correct) -> one of 2G categories
    observed = np.bincount(category, minlength=2 * groups)
    present = np.flatnonzero(observed)
    draws = np.zeros((n, 2 * groups), dtype=np.int64)
    if len(code):
        rng = np.random.default_rng(seed)
        draws[:, present] = rng.multinomial(len(code), observed[present] / len(code), size=n)
    hits = draws[:, 1::2]
    return {"counts": draws[:, 0::2] + hits, "hits": hits, "aligned": aligned, "conflicting": conflicting}


def _ratio(hits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def metrics_from_counts(counts: np.ndarray, hits: np.ndarray, aligned: np.ndarray,
                        conflicting: np.ndarray) -> dict[str, np.ndarray]:
    """Every accuracy metric per resample (rows of `counts` and `hits`); NaN where undefined."""
    group_acc = _ratio(hits, counts)
    with warnings.catch_warnings():  # all-NaN rows (no group present) are NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        unbiased, worst = np.nanmean(group_acc, 1), np.nanmin(group_acc, 1)
    return {
        "acc": _ratio(hits.sum(1), counts.sum(1)),
        "acc_unbiased": unbiased,
        "acc_aligned": _ratio(hits[:, aligned].sum(1), counts[:, aligned].sum(1)),
        "acc_conflicting": _ratio(hits[:, conflicting].sum(1), counts[:, conflicting].sum(1)),
        "acc_worst_group": worst,
    }


def bootstrap_distribution(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor,
                           metrics: tuple[str, ...] | list[str] = ACCURACY_METRICS, *, n: int = 1000,
                           seed: int = 0, num_bias: int | None = None) -> dict[str, np.ndarray]:
    """{metric: (n,) values over bootstrap resamples}."""
    for metric in metrics:
        check_choice("bootstrap metric", metric, ACCURACY_METRICS)
    values = metrics_from_counts(**resample_counts(y, b, pred, n, seed, num_bias))
    return {metric: values[metric] for metric in metrics}


def bootstrap_ci(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor,
                 metrics: tuple[str, ...] | list[str] = ACCURACY_METRICS, *, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05, num_bias: int | None = None) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the (alpha/2, 1 - alpha/2) percentile interval over `n` bootstrap resamples."""
    if not 0 < alpha < 1 or n < 1:
        raise ValueError(f"need 0 < alpha < 1 and n >= 1 (got alpha={alpha}, n={n})")
    out = {}
    for metric, values in bootstrap_distribution(y, b, pred, metrics, n=n, seed=seed, num_bias=num_bias).items():
        finite = values[~np.isnan(values)]
        if not len(finite):
            out[metric] = (float("nan"), float("nan"))
            continue
        low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
        out[metric] = (float(low), float(high))
    return out
