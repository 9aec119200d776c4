"""Metric formulas on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bise_cli.core.metrics import accuracy_metrics, disparity_metrics, overlapping_group_metrics


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
    from bise_cli.core.metrics import group_proportions

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
    from bise_cli.core.errors import BiseError
    from bise_cli.method.search import SearchSettings

    SearchSettings(selection_metric="acc_weighted_avg_group", also_select_by=("acc_avg_group",)).validate()
    with pytest.raises(BiseError, match="unknown pruning.selection_metric 'acc_best'"):
        SearchSettings(selection_metric="acc_best").validate()


def test_several_attributes_also_get_each_attributes_class_by_bias_tables():
    from bise_cli.core.metrics import accuracy_metrics

    y = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 1], [1, 0], [1, 1]])  # two attributes
    pred = torch.tensor([0, 1, 0, 1, 0, 1])
    metrics = accuracy_metrics(y, b, pred, 2, 2, ("left", "right"))
    # left: (y0,b0) 2 samples 1 right; (y0,b1) 1 sample right; (y1,b0) empty; (y1,b1) 3 samples, 2 right.
    assert metrics["attribute_group_acc"]["left"] == [[0.5, 1.0], [None, round(2 / 3, 6)]]
    assert metrics["attribute_group_count"]["left"] == [[2, 1], [0, 3]]
    assert metrics["attribute_group_acc"]["right"] == [[0.0, 1.0], [0.0, 1.0]]
    assert metrics["attribute_group_count"]["right"] == [[1, 2], [1, 2]]


def test_multicolor_patterns_pooled_and_cell_averaged_by_hand():
    # (digit, left, right) cells; pattern = (left == digit, right == digit).
    rows = [  # (y, left, right, pred)
        (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 0),   # both aligned: cells 3/3 and 0/1
        (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0),                 # L aligned, R conflicting: cells 1/2 and 1/1
        (1, 0, 1, 1),                                             # L conflicting, R aligned: one cell 1/1
        (2, 0, 1, 0), (2, 0, 1, 1), (2, 1, 0, 2), (2, 1, 0, 2),   # both conflicting: cells 0/2 and 2/2
    ]
    y, left, right, pred = (torch.tensor(column) for column in zip(*rows, strict=True))
    m = accuracy_metrics(y, torch.stack([left, right], 1), pred, 3, 3, ("left", "right"))
    # Pooled per pattern (the BISE paper's and FFW's code): 3/4, 2/3, 1/1, 2/4.
    assert m["acc_both_aligned"] == pytest.approx(0.75)
    assert m["acc_left_aligned_right_conflicting"] == pytest.approx(2 / 3)
    assert m["acc_left_conflicting_right_aligned"] == 1.0 and m["acc_both_conflicting"] == 0.5
    assert m["acc_unbiased"] == pytest.approx((0.75 + 2 / 3 + 1 + 0.5) / 4)
    # Cell-averaged per pattern (DebiAN's code): (1 + 0) / 2, (1/2 + 1) / 2, 1, (0 + 1) / 2.
    assert m["acc_unbiased_cells"] == pytest.approx((0.5 + 0.75 + 1 + 0.5) / 4)
    # A pattern without samples is skipped by both averages.
    keep = torch.tensor([i for i, row in enumerate(rows) if row[0] != 1 or row[1] != 0])
    m = accuracy_metrics(y[keep], torch.stack([left, right], 1)[keep], pred[keep], 3, 3, ("left", "right"))
    assert m["acc_unbiased_cells"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert m["acc_unbiased"] == pytest.approx((0.75 + 2 / 3 + 0.5) / 3)
    # One bias attribute: no cell-averaged variant (its cells are its groups: acc_unbiased is that average).
    assert "acc_unbiased_cells" not in accuracy_metrics(y, left, pred, 3, 3)


def test_disparity_with_an_empty_cell_counts_the_missing_rate_as_zero():
    # s=1 has no negatives: its FPR is missing and counts as 0 (fairlearn). s=0: TPR 1/2, FPR 1/2; s=1: TPR 1/2.
    y = torch.tensor([1, 1, 0, 0, 1, 1])
    s = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([1, 0, 0, 1, 1, 0])
    m = disparity_metrics(y, s, pred)
    assert m["eo_diff"] == pytest.approx(0.5) and m["dp_diff"] == pytest.approx(0.0)
    # One value of s present: no disparity (also for a single sample, which fairlearn itself rejects).
    assert disparity_metrics(y, torch.zeros_like(s), pred) == {"dp_diff": 0.0, "eo_diff": 0.0}
    assert disparity_metrics(y[:1], s[:1], pred[:1]) == {"dp_diff": 0.0, "eo_diff": 0.0}


def _disparity_by_definition(y, s, pred, missing=0.0):
    """fairlearn's semantics written out: per value of s the selection rate, TPR and FPR, a missing rate (no
    positives / no negatives) counted as `missing` (fairlearn: 0; None: that value skipped, the convention bise
    used before); the differences are max - min over the values of s."""
    selection, tpr, fpr = [], [], []
    for value in np.unique(s):
        g = s == value
        selection.append(pred[g].mean())
        for rates, cell in ((tpr, g & (y == 1)), (fpr, g & (y == 0))):
            rate = pred[cell].mean() if cell.any() else missing
            if rate is not None:
                rates.append(rate)

    def spread(values):
        return max(values) - min(values) if values else 0.0

    return spread(selection), max(spread(tpr), spread(fpr))


def test_disparity_agrees_with_fairlearn_on_random_cases_with_empty_cells():
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    rng = np.random.default_rng(0)
    empty_cells = conventions_differ = 0
    for case in range(100):
        n = int(rng.integers(2, 16))
        values = int(rng.integers(1, 4))
        y, s, pred = rng.integers(0, 2, n), rng.integers(0, values, n), rng.integers(0, 2, n)
        ours = disparity_metrics(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(pred))
        expected = (demographic_parity_difference(y, pred, sensitive_features=s),
                    equalized_odds_difference(y, pred, sensitive_features=s))
        assert (ours["dp_diff"], ours["eo_diff"]) == pytest.approx(expected, abs=1e-12), case
        assert (ours["dp_diff"], ours["eo_diff"]) == pytest.approx(_disparity_by_definition(y, s, pred)), case
        empty_cells += any(not ((s == v) & (y == label)).any() for v in np.unique(s) for label in (0, 1))
        conventions_differ += _disparity_by_definition(y, s, pred, missing=None)[1] != ours["eo_diff"]
    # A third of the cases (35 of these 100) have a value of s without positives or without negatives, and in
    # many of them (13) skipping that value instead of counting its rate as 0 would change eo_diff.
    assert empty_cells > 25 and conventions_differ > 8


def test_biased_mnist_baselines_are_attributed_to_their_methods_in_the_reference_footer(tmp_path):
    import json

    from bise_cli.reporting.tables import constant_context, format_table, load_records, summarize
    from bise_cli.run.registry import spec as stage

    records = [{"stage": name, "keys": ["dataset", "rho", "seed"], "dataset": "biased_mnist", "rho": 0.99,
                "seed": 0, "acc": 0.9} for name in ("bise", "lff", "softcon", "bcon_bbal")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    df = load_records(tmp_path)
    footer = format_table(summarize(df, metrics=["acc"]), "md", reference=True, context=constant_context(df))
    lines = {line.split(")")[0]: line for line in footer.splitlines() if line.startswith("paper acc (")}
    hong_yang = lines["paper acc (biased_mnist: softcon, bcon_bbal"]
    assert "Hong & Yang" in hong_yang and "NeurIPS 2021" in hong_yang
    assert "Barbano et al.'s table (ICLR 2023)" in hong_yang
    lff = lines["paper acc (biased_mnist: lff"]
    assert "Nam et al." in lff and "NeurIPS 2020" in lff and "Barbano" in lff
    assert lines["paper acc (biased_mnist: bise"].endswith("De Moura Matos et al., CVPR 2026")
    for name in ("softcon", "bcon_bbal"):
        assert "Hong & Yang, NeurIPS 2021" in stage(name).description
