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


def test_weighted_average_group_accuracy_uses_the_training_shares():
    from bise_cli.metrics import group_proportions

    # Training shares of the 4 (y, b) cells: 0.5, 0.25, 0.125, 0.125.
    y_train = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1])
    b_train = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0])
    weights = group_proportions(y_train, b_train, 2, 2)
    assert weights.tolist() == [[0.5, 0.125], [0.125, 0.25]]
    # Test: cell (0,0) all right, (0,1) all wrong, (1,1) half right, (1,0) absent (its weight is dropped).
    y = torch.tensor([0, 0, 0, 1, 1])
    b = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 0, 1, 1, 0])
    metrics = accuracy_metrics(y, b, pred, 2, 2, group_weights=weights)
    expected = (0.5 * 1.0 + 0.125 * 0.0 + 0.25 * 0.5) / (0.5 + 0.125 + 0.25)
    assert metrics["acc_weighted_avg_group"] == pytest.approx(expected)
    assert "acc_weighted_avg_group" not in accuracy_metrics(y, b, pred, 2, 2)


def test_selection_metric_is_checked():
    from bise_cli.bise import SearchSettings
    from bise_cli.errors import BiseError

    SearchSettings(selection_metric="acc_weighted_avg_group", also_select_by=("acc_avg_group",)).validate()
    with pytest.raises(BiseError, match="unknown pruning.selection_metric 'acc_best'"):
        SearchSettings(selection_metric="acc_best").validate()


def test_several_attributes_also_get_each_attributes_class_by_bias_tables():
    from bise_cli.metrics import accuracy_metrics

    y = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 1], [1, 0], [1, 1]])  # two attributes
    pred = torch.tensor([0, 1, 0, 1, 0, 1])
    metrics = accuracy_metrics(y, b, pred, 2, 2, ("left", "right"))
    # left: (y0,b0) 2 samples 1 right; (y0,b1) 1 sample right; (y1,b0) empty; (y1,b1) 3 samples, 2 right.
    assert metrics["attribute_group_acc"]["left"] == [[0.5, 1.0], [None, round(2 / 3, 6)]]
    assert metrics["attribute_group_count"]["left"] == [[2, 1], [0, 3]]
    assert metrics["attribute_group_acc"]["right"] == [[0.0, 1.0], [0.0, 1.0]]
    assert metrics["attribute_group_count"]["right"] == [[1, 2], [1, 2]]
