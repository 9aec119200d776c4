"""The paired statistic every comparison prints (bise table --compare, the benchmark studies): one definition."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from bise_cli.reporting.paired import format_p, paired_difference


def test_paired_difference_is_the_t_interval_and_ttest_rel():
    a, b = [60.0, 62.5, 58.0, 61.0], [58.0, 61.0, 57.5, 58.0]
    result = paired_difference(a, b)
    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diff) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert result.n == 4 and result.mean == pytest.approx(mean)
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half))
    assert result.p == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_equal_differences_and_single_pairs_have_no_p():
    same = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every difference 0.5: no t statistic
    assert same.mean == pytest.approx(0.5) and same.low == same.high == same.mean and math.isnan(same.p)
    one = paired_difference([1.0], [0.0])
    assert one.mean == 1.0 and math.isnan(one.low) and math.isnan(one.p)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])


def test_format_p():
    assert [format_p(v) for v in (math.nan, 0.0004, 0.0456)] == ["n/a", "<0.001", "0.046"]
