"""Metrics from one table of per-sample predictions (y, b, prediction). Names are declared once here.

Groups are the (y, b) cells present in the data. With accuracy A_g of group g:

- acc              = fraction of samples with prediction == y
- acc_unbiased     = mean over present (y, b) groups of A_g        (BiasedMNIST's "unbiased accuracy")
- acc_aligned      = accuracy on samples with b == y
- acc_conflicting  = accuracy on samples with b != y
- acc_worst_group  = min over present groups of A_g
- acc_avg_group    = the same number as acc_unbiased, under the name the text literature uses
- acc_weighted_avg_group = sum over present groups of p_train(g) A_g, renormalised (the official code's
                   CivilComments average; needs the training split's group proportions)

With several bias attributes (b of shape (N, A), e.g. Multi-Color MNIST's left and right colours), the groups
are the 2^A alignment patterns instead (attribute k aligned iff b_k == y). Each pattern's accuracy is pooled
over its samples, as the BISE paper's code and FFW's code compute it; acc_unbiased is the mean of the pattern
accuracies, acc_worst_group their minimum, acc_aligned the accuracy on samples aligned on every attribute and
acc_conflicting on samples conflicting on every attribute. Each pattern has its own metric, e.g.
acc_both_aligned, acc_left_aligned_right_conflicting (`pattern_name`).

DebiAN's code (Li et al., ECCV 2022, which built Multi-Color MNIST) averages differently: a pattern's accuracy
is the mean of the accuracies of its (y, b_1, ..., b_A) cells (for Multi-Color MNIST the (digit, left colour,
right colour) cells), and its unbiased accuracy the mean of those over the patterns. That convention is
recorded beside the pooled one as acc_unbiased_cells (empty cells skipped). On a test set whose cells are nearly
equal in size (Multi-Color MNIST's) the two are close but not identical.

Disparity for binary tasks, computed by fairlearn (`fairlearn.metrics`, sensitive feature = b):

- dp_diff = max_s P(pred = 1 | b = s) - min_s P(pred = 1 | b = s)          (demographic_parity_difference)
- eo_diff = max(TPR difference, FPR difference) across values of b        (equalized_odds_difference)

A value of b with no positive samples (y = 1) has no true-positive rate and one with no negative samples no
false-positive rate; fairlearn counts such a missing rate as 0, so it enters the difference (a value of b
without positives whose other values have TPR 0.8 gives a TPR difference of 0.8). A split with one value of b
present gives 0 for both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Bumped when a metric's definition changes or one is added: cached stage results hold their metrics, so the
# evaluation part of every cache key carries this version (bise_cli.run.stages.Context.eval_key).
# 2: acc_unbiased_cells; dp_diff / eo_diff by fairlearn (a missing rate counts as 0). 3: the leakage probes read
# features at the evaluation's batch size (always batch 500 before).
METRICS_VERSION = 3
ACCURACY_METRICS = ("acc", "acc_unbiased", "acc_aligned", "acc_conflicting", "acc_worst_group")
MULTI_ATTRIBUTE_METRICS = ("acc_unbiased_cells",)  # only with several bias attributes
DISPARITY_METRICS = ("dp_diff", "eo_diff")
EFFICIENCY_METRICS = ("sparsity_units", "sparsity_weights", "params", "macs", "latency_ms_b1",
                      "latency_ms_b100")
LEAKAGE_METRICS = ("leakage", "leakage_head")
ALL_METRICS = (ACCURACY_METRICS + ("acc_avg_group",) + MULTI_ATTRIBUTE_METRICS + DISPARITY_METRICS
               + EFFICIENCY_METRICS + LEAKAGE_METRICS)


def _mean(mask: torch.Tensor, correct: torch.Tensor) -> float:
    """Accuracy over the samples selected by `mask`; NaN when none are selected."""
    count = int(mask.sum())
    return float(correct[mask].float().mean()) if count else math.nan


def group_accuracy_matrix(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor, num_classes: int,
                          num_bias: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and sample count of every (y, b) cell; accuracy is NaN for empty cells."""
    correct = (pred == y).double()
    cell = y * num_bias + b
    counts = torch.bincount(cell, minlength=num_classes * num_bias).double()
    hits = torch.bincount(cell, weights=correct, minlength=num_classes * num_bias)
    acc = torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, math.nan))
    return acc.view(num_classes, num_bias), counts.view(num_classes, num_bias).long()


def pattern_name(names: tuple[str, ...] | list[str], aligned: tuple[bool, ...]) -> str:
    """Metric name of one alignment pattern: acc_both_aligned, acc_left_aligned_right_conflicting, ..."""
    words = ["aligned" if a else "conflicting" for a in aligned]
    if len(names) == 2 and words[0] == words[1]:
        return f"acc_both_{words[0]}"
    return "acc_" + "_".join(f"{n}_{w}" for n, w in zip(names, words, strict=True))


def alignment_groups(y: torch.Tensor, b: torch.Tensor) -> list[tuple[tuple[bool, ...], torch.Tensor]]:
    """(pattern, sample mask) for each of the 2^A alignment patterns of A bias attributes, all-aligned first:
    pattern[k] is True when attribute k agrees with the target."""
    aligned = b.long().cpu() == y.long().cpu().unsqueeze(1)
    attributes = b.shape[1]
    groups = []
    for code in range(2 ** attributes):
        pattern = tuple(not (code >> (attributes - 1 - k)) & 1 for k in range(attributes))
        groups.append((pattern, (aligned == torch.tensor(pattern)).all(1)))
    return groups


def multi_attribute_metrics(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor,
                            names: tuple[str, ...] | list[str], num_classes: int | None = None,
                            num_bias: int | None = None) -> dict:
    """Accuracy metrics over the 2^A alignment patterns of A bias attributes (see the module docstring)."""
    y, b, pred = y.long().cpu(), b.long().cpu(), pred.long().cpu()
    correct = pred == y
    aligned = b == y.unsqueeze(1)
    patterns = {pattern_name(names, pattern): (_mean(mask, correct), int(mask.sum()))
                for pattern, mask in alignment_groups(y, b)}
    present = [acc for acc, count in patterns.values() if count]
    unbiased = sum(present) / len(present) if present else math.nan
    return {
        "acc": _mean(torch.ones_like(correct), correct),
        "acc_unbiased": unbiased,
        "acc_unbiased_cells": cell_averaged_unbiased(y, b, correct),
        "acc_aligned": _mean(aligned.all(1), correct),
        "acc_conflicting": _mean((~aligned).all(1), correct),
        "acc_worst_group": min(present) if present else math.nan,
        "acc_avg_group": unbiased,
        **{name: acc for name, (acc, _) in patterns.items()},
        "group_count": {name: count for name, (_, count) in patterns.items()},
        # Per attribute, the (class x bias value) tables that `group_acc` / `group_count` hold for one attribute.
        **_attribute_tables(y, b, pred, names, num_classes or int(y.max()) + 1, num_bias or int(b.max()) + 1),
    }


def cell_averaged_unbiased(y: torch.Tensor, b: torch.Tensor, correct: torch.Tensor) -> float:
    """DebiAN's unbiased accuracy: per alignment pattern, the mean accuracy of its (y, b_1, ..., b_A) cells
    (empty cells skipped), then the mean over the patterns that have samples."""
    cells, cell_of = torch.unique(torch.cat([y.unsqueeze(1), b], 1), dim=0, return_inverse=True)
    counts = torch.bincount(cell_of).double()
    accuracy = torch.bincount(cell_of, weights=correct.double()) / counts
    pattern_of_cell = cells[:, 1:] == cells[:, :1]            # (cells, A): attribute k aligned in the cell
    per_pattern = [float(accuracy[(pattern_of_cell == torch.tensor(pattern)).all(1)].mean())
                   for pattern, _ in alignment_groups(y, b)
                   if (pattern_of_cell == torch.tensor(pattern)).all(1).any()]
    return sum(per_pattern) / len(per_pattern) if per_pattern else math.nan


def _attribute_tables(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor, names, num_classes: int,
                      num_bias: int) -> dict:
    """{"attribute_group_acc": {name: matrix}, "attribute_group_count": {name: counts}}; None for empty cells."""
    accuracy, count = {}, {}
    for name, column in zip(names, b.unbind(1), strict=True):
        matrix, counts = group_accuracy_matrix(y, column, pred, num_classes, num_bias)
        accuracy[name] = [[None if math.isnan(v) else round(v, 6) for v in row] for row in matrix.tolist()]
        count[name] = counts.tolist()
    return {"attribute_group_acc": accuracy, "attribute_group_count": count}


def group_proportions(y: torch.Tensor, b: torch.Tensor, num_classes: int, num_bias: int) -> torch.Tensor:
    """The share of every (y, b) cell in a split (one bias attribute): the weights of acc_weighted_avg_group."""
    cells = torch.bincount(y.long().cpu() * num_bias + b.long().cpu().flatten(), minlength=num_classes * num_bias)
    return (cells.double() / max(len(y), 1)).view(num_classes, num_bias)


def accuracy_metrics(y: torch.Tensor, b: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     num_bias: int, bias_names: tuple[str, ...] | list[str] | None = None,
                     group_weights: torch.Tensor | None = None) -> dict:
    """Every accuracy metric of the module docstring plus the group matrix (as nested lists). With
    `group_weights` (the training split's `group_proportions`), also `acc_weighted_avg_group` = sum_g w_g A_g
    over the groups present, the weights renormalised over them (the average the official code reports for
    CivilComments)."""
    if b.dim() == 2 and b.shape[1] > 1:
        names = bias_names or [f"bias{k}" for k in range(b.shape[1])]
        return multi_attribute_metrics(y, b, pred, names, num_classes, num_bias)
    y, b, pred = y.long().cpu(), b.long().cpu().flatten(), pred.long().cpu()
    correct = pred == y
    matrix, counts = group_accuracy_matrix(y, b, pred, num_classes, num_bias)
    present = matrix[counts > 0]
    unbiased = float(present.mean()) if len(present) else math.nan
    weighted = {}
    if group_weights is not None:
        w = group_weights.double().cpu() * (counts > 0)
        weighted["acc_weighted_avg_group"] = float((w * matrix.nan_to_num()).sum() / w.sum()) if w.sum() else math.nan
    return {
        **weighted,
        "acc": _mean(torch.ones_like(correct), correct),
        "acc_unbiased": unbiased,
        "acc_aligned": _mean(b == y, correct),
        "acc_conflicting": _mean(b != y, correct),
        "acc_worst_group": float(present.min()) if len(present) else math.nan,
        "acc_avg_group": unbiased,
        "group_acc": [[None if math.isnan(v) else round(v, 6) for v in row] for row in matrix.tolist()],
        "group_count": counts.tolist(),
    }


def disparity_metrics(y: torch.Tensor, s: torch.Tensor, pred: torch.Tensor) -> dict:
    """Demographic parity and equalised odds differences of binary (0/1) predictions across values of `s`,
    computed by fairlearn (the module docstring says what an empty cell gives)."""
    # Imported here: fairlearn loads scikit-learn and pandas, needed only for binary tasks.
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    y, s, pred = (t.long().cpu().flatten().numpy() for t in (y, s, pred))
    if len(np.unique(s)) < 2:
        # One value of s: no disparity (fairlearn's answer too, but fairlearn rejects a single-sample split).
        return {"dp_diff": 0.0, "eo_diff": 0.0}
    # Labels 0/1: fairlearn takes 1 as the positive label, also in a group where only one label occurs.
    return {"dp_diff": float(demographic_parity_difference(y, pred, sensitive_features=s)),
            "eo_diff": float(equalized_odds_difference(y, pred, sensitive_features=s))}


def overlapping_group_metrics(y: torch.Tensor, pred: torch.Tensor, memberships: torch.Tensor,
                              names: list[str]) -> dict:
    """WILDS-style evaluation over overlapping groups: for each identity column k and label v, the accuracy on
    samples with identity k and y == v. Returns per-group accuracies, their mean and their minimum."""
    correct = (pred.cpu() == y.cpu())
    per_group = {}
    for k, name in enumerate(names):
        for label in (0, 1):
            mask = memberships[:, k].bool().cpu() & (y.cpu() == label)
            if mask.any():
                per_group[f"{name}:1,y:{label}"] = _mean(mask, correct)
    values = list(per_group.values())
    return {
        "groups": per_group,
        "acc_avg_group": sum(values) / len(values) if values else math.nan,
        "acc_worst_group": min(values) if values else math.nan,
    }
