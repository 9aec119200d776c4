"""Metric formulas on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from bise_cli.metrics import accuracy_metrics, disparity_metrics, overlapping_group_metrics


def test_accuracy_family_by_hand():
    # groups (y, b): (0,0) 2 samples, both right; (0,1) 2 samples, one right; (1,1) 1 sample, wrong.
    y = torch.tensor([0, 0, 0, 0, 1])
    b = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 0])
    m = accuracy_metrics(y, b, pred, num_classes=2, num_bias=2)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["acc_aligned"] == pytest.approx(2 / 3)          # (0,0) x2 right, (1,1) wrong
    assert m["acc_conflicting"] == pytest.approx(1 / 2)
    assert m["acc_unbiased"] == pytest.approx((1 + 0.5 + 0) / 3)  # the empty (1,0) group is skipped
    assert m["acc_worst_group"] == 0.0
    assert m["group_acc"] == [[1.0, 0.5], [None, 0.0]]
    assert m["group_count"] == [[2, 2], [0, 1]]


def test_no_conflicting_samples_gives_nan():
    m = accuracy_metrics(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([1, 0]), 3, 3)
    assert math.isnan(m["acc_conflicting"]) and m["acc_aligned"] == 0.5


def test_disparity_by_hand():
    # s=0: preds 1,0,0,0 with y 1,1,0,0 -> selection 0.25, TPR 0.5, FPR 0
    # s=1: preds 1,1,1,0 with y 1,0,0,1 -> selection 0.75, TPR 0.5, FPR 1
    y = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1])
    s = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    m = disparity_metrics(y, s, pred)
    assert m["dp_diff"] == pytest.approx(0.5)
    assert m["eo_diff"] == pytest.approx(1.0)


def test_overlapping_groups_by_hand():
    y = torch.tensor([0, 1, 1, 0])
    pred = torch.tensor([0, 0, 1, 1])
    identities = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    m = overlapping_group_metrics(y, pred, identities, ["male", "muslim"])
    assert m["groups"] == {"male:1,y:0": 1.0, "male:1,y:1": 0.0, "muslim:1,y:1": 0.5}
    assert m["acc_worst_group"] == 0.0 and m["acc_avg_group"] == pytest.approx(0.5)
