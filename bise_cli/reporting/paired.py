"""The paired comparison of two methods over the same seeds: the mean difference, its 95 % t interval and the
two-sided paired t-test p (scipy.stats.ttest_rel). One definition for `bise table --compare` and the benchmark
studies, so that a number in the README means the same wherever it was printed."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class PairedDifference(NamedTuple):
    """mean(a - b) with its 95 % t interval [low, high] and p; n the number of pairs."""

    mean: float
    low: float
    high: float
    p: float
    n: int


def paired_difference(a, b) -> PairedDifference:
    """The paired difference of two equally long sequences (pair i = seed i).

    With fewer than two pairs the interval and p are NaN. When every difference is the same (up to float
    rounding) the interval collapses onto the mean and p is NaN: the t statistic is undefined, and reporting 0 or
    1 would claim a certainty the test does not give."""
    from scipy import stats

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples must have the same length (got {len(xa)} and {len(xb)})")
    n, diff = len(xa), xa - xb
    mean = float(diff.mean()) if n else math.nan
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, math.nan, n)
    spread = float(diff.std(ddof=1))
    if spread <= 1e-12 * max(1.0, abs(mean)):  # equal differences up to float rounding
        spread = 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * spread / math.sqrt(n)
    p = float(stats.ttest_rel(xa, xb).pvalue) if spread > 0 else math.nan
    return PairedDifference(mean, mean - half, mean + half, p, n)


def format_p(value: float) -> str:
    """A p-value as the tables print it: 'n/a' when undefined, '<0.001' below that, else three decimals."""
    if value is None or math.isnan(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"
