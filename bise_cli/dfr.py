"""Deep Feature Reweighting (DFR; Kirichenko, Izmailov and Wilson, "Last Layer Re-Training is Sufficient for
Robustness to Spurious Correlations", ICLR 2023): a baseline that keeps the vanilla backbone frozen and retrains
only its last layer on group-balanced data.

The recipe of the DFR paper and its code:

- features z are the bottleneck (the input of the model's `classifier`), standardised with the mean and
  standard deviation of the fitting set;
- the last layer is an L1-regularised logistic regression (liblinear) fitted on a group-balanced subsample:
  every (y, b) group present is subsampled, without replacement, to the size of the smallest one;
- coefficients and intercepts are averaged over several such subsamples (DFR's final model uses 10);
- the inverse regularisation strength C is chosen from a grid on held-out data by worst-group accuracy.

Two variants (DFR's Sec. 5): `dfr_train` fits on the biased training split with its bias labels (DFR^Tr_Tr) and
`dfr_val` on half of the unbiased validation split, choosing C on the other half and refitting on all of it
(DFR^Tr_Val). The result folds the standardisation into one nn.Linear (`apply_dfr`), so the debiased model is
the vanilla backbone with a new `classifier` and nothing else.

Multi-class problems use one-vs-rest binary regressions, which is what liblinear does for several classes (and
what scikit-learn did with solver="liblinear" before it refused multi-class input, in 1.8).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from bise_cli.data.base import bias_columns
from bise_cli.errors import BiseError, check_choice
from bise_cli.metrics import ACCURACY_METRICS, accuracy_metrics

# DFR's grid of inverse regularisation strengths (its code's C_OPTIONS), strongest fit first.
DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


@dataclass
class DFRResult:
    """The averaged logistic regression on standardised features: logits = weight @ ((z - mean) / std) + bias."""

    weight: torch.Tensor   # (C, D)
    bias: torch.Tensor     # (C,)
    mean: torch.Tensor     # (D,)
    std: torch.Tensor      # (D,)
    c: float
    history: list[dict] = field(default_factory=list)  # one row per C of the grid: its selection metrics

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') with W' z + b' = weight ((z - mean) / std) + bias: the standardisation inside the layer."""
        weight = self.weight / self.std
        return weight, self.bias - weight @ self.mean

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return z.to(weight.dtype) @ weight.t() + bias


# ------------------------------------------------------------------------------------------------- groups

def group_ids(y: torch.Tensor, b: torch.Tensor, num_bias: int) -> np.ndarray:
    """One integer per group: the (y, b) cell for one bias attribute; with several (b of shape (N, A)), the
    (y, alignment pattern) cell, the groups the metrics use (the (y, b_1, ..., b_A) cells would be mostly empty:
    Multi-Color MNIST has 1,000 of them for 25 both-conflicting training samples)."""
    y = y.long().cpu()
    columns = bias_columns(b)
    if len(columns) == 1:
        return (y * num_bias + columns[0].long().cpu()).numpy()
    cell = y.clone()
    for column in columns:
        cell = cell * 2 + (column.long().cpu() == y).long()
    return cell.numpy()


def balanced_indices(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a group-balanced subsample: every group present is drawn without replacement down to the size
    of the smallest present group (DFR's balancing); sorted, so the result does not depend on group order."""
    values, counts = np.unique(groups, return_counts=True)
    size = int(counts.min())
    chosen = [rng.choice(np.flatnonzero(groups == g), size=size, replace=False) for g in values]
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------ logistic fits

def _l1_options() -> dict:
    # scikit-learn 1.8 deprecated `penalty` in favour of `l1_ratio` (l1_ratio=1 is the L1 penalty).
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


# The bias of a class the fitting set does not contain: far below any fitted logit.
ABSENT_CLASS_BIAS = -1e4


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L1 logistic regression (liblinear) as a (num_classes, D) weight and (num_classes,) bias whose argmax is
    the regression's prediction. Binary: sklearn's single row w becomes the rows [0; w] (softmax of [0, s] is
    sigmoid(s)). More classes: one-vs-rest, one binary regression per class. A class absent from the fitting
    set (a tiny split's balanced subsample) gets a zero row and a very low bias: it is never predicted."""
    present = np.unique(y)
    if len(present) < 2:
        raise BiseError(f"DFR: the fitting set holds only class(es) {present.tolist()}; it needs at least two")

    def binary(target: np.ndarray) -> tuple[np.ndarray, float]:
        model = LogisticRegression(C=c, solver="liblinear", random_state=seed, **_l1_options())
        model.fit(x, target)
        return model.coef_[0], float(model.intercept_[0])

    if num_classes == 2:
        w, b = binary(y)
        return np.stack([np.zeros_like(w), w]), np.array([0.0, b])
    absent = (np.zeros(x.shape[1]), ABSENT_CLASS_BIAS)
    rows = [binary((y == k).astype(int)) if k in present else absent for k in range(num_classes)]
    return np.stack([w for w, _ in rows]), np.array([b for _, b in rows])


def fit_balanced(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, num_classes: int, c: float,
                 n_subsamples: int, rng: np.random.Generator, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias averaged over `n_subsamples` fits, each on a fresh group-balanced subsample."""
    weights, biases = [], []
    for k in range(n_subsamples):
        index = balanced_indices(groups, rng)
        w, b = fit_logreg(x[index], y[index], num_classes, c, seed + k)
        weights.append(w)
        biases.append(b)
    return np.mean(weights, axis=0), np.mean(biases, axis=0)


def _standardise(z: torch.Tensor) -> tuple[StandardScaler, np.ndarray]:
    scaler = StandardScaler().fit(z.double().cpu().numpy())
    return scaler, scaler.transform(z.double().cpu().numpy())


# --------------------------------------------------------------------------------------------------- DFR

def run_dfr(z_fit: torch.Tensor, y_fit: torch.Tensor, b_fit: torch.Tensor, z_sel: torch.Tensor,
            y_sel: torch.Tensor, b_sel: torch.Tensor, *, num_classes: int, num_bias: int,
            c_grid: tuple[float, ...] | list[float] = DFR_C_GRID, n_subsamples: int = 10,
            n_select_subsamples: int = 1, seed: int = 0, select_metric: str = "acc_worst_group",
            z_final: torch.Tensor | None = None, y_final: torch.Tensor | None = None,
            b_final: torch.Tensor | None = None) -> DFRResult:
    """Choose C on the selection set, then fit the final averaged regression with it.

    For every C of `c_grid`: fit on balanced subsamples of the fitting set (`n_select_subsamples`, averaged; DFR's
    tuning uses one), score `select_metric` (a bise_cli.metrics accuracy metric over the selection set's groups)
    and keep the best; ties go to the earlier C of the grid (DFR's argmax). The final model averages
    `n_subsamples` balanced fits on the final set (`z_final`..., default: the fitting set), standardised with
    that set's own mean and standard deviation.
    """
    check_choice("dfr select_metric", select_metric, ACCURACY_METRICS)
    if not c_grid or any(c <= 0 for c in c_grid):
        raise BiseError(f"DFR: c_grid must hold positive values (got {list(c_grid)})")
    if n_subsamples < 1 or n_select_subsamples < 1:
        raise BiseError(f"DFR: n_subsamples and n_select_subsamples must be >= 1 (got {n_subsamples}, "
                        f"{n_select_subsamples})")
    rng = np.random.default_rng(seed)
    scaler, x_fit = _standardise(z_fit)
    x_sel = scaler.transform(z_sel.double().cpu().numpy())
    y_fit_np, groups_fit = y_fit.long().cpu().numpy(), group_ids(y_fit, b_fit, num_bias)
    history, best = [], None
    for c in c_grid:
        w, bias = fit_balanced(x_fit, y_fit_np, groups_fit, num_classes=num_classes, c=float(c),
                               n_subsamples=n_select_subsamples, rng=rng, seed=seed)
        pred = torch.from_numpy((x_sel @ w.T + bias).argmax(1))
        metrics = accuracy_metrics(y_sel.cpu(), b_sel.cpu(), pred, num_classes, num_bias)
        value = metrics[select_metric]
        history.append({"c": float(c), **{m: metrics[m] for m in ACCURACY_METRICS}})
        if not math.isnan(value) and (best is None or value > best[1]):
            best = (float(c), value)
    if best is None:
        raise BiseError(f"DFR: {select_metric} is undefined on the selection set for every C (no such samples)")
    if z_final is None:
        z_final, y_final, b_final = z_fit, y_fit, b_fit
    scaler, x_final = _standardise(z_final)
    w, bias = fit_balanced(x_final, y_final.long().cpu().numpy(), group_ids(y_final, b_final, num_bias),
                           num_classes=num_classes, c=best[0], n_subsamples=n_subsamples, rng=rng, seed=seed)
    return DFRResult(weight=torch.from_numpy(w), bias=torch.from_numpy(bias),
                     mean=torch.from_numpy(scaler.mean_.copy()), std=torch.from_numpy(scaler.scale_.copy()),
                     c=best[0], history=history)


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into two halves (the first gets the extra sample when n is odd)."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[: (n + 1) // 2]), np.sort(order[(n + 1) // 2:])


def dfr_train(z_train: torch.Tensor, y_train: torch.Tensor, b_train: torch.Tensor,
              z_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
              b_val: torch.Tensor | None = None, **options) -> DFRResult:
    """DFR on the biased training split with its bias labels. C is chosen on the validation split when there is
    one; otherwise on a held-out half of the training split (fitting on the other half), and the final model
    is refitted on all of it. `options` go to `run_dfr`."""
    if z_val is not None:
        return run_dfr(z_train, y_train, b_train, z_val, y_val, b_val, **options)
    fit, sel = (torch.from_numpy(i) for i in _halves(len(y_train), options.get("seed", 0)))
    return run_dfr(z_train[fit], y_train[fit], b_train[fit], z_train[sel], y_train[sel], b_train[sel],
                   z_final=z_train, y_final=y_train, b_final=b_train, **options)


def dfr_val(z_val: torch.Tensor, y_val: torch.Tensor, b_val: torch.Tensor, **options) -> DFRResult:
    """DFR on the unbiased validation split: fit on one half, choose C on the other, refit on all of it (as
    DFR's code does). Validation metrics of the resulting model are therefore not held-out numbers."""
    fit, sel = (torch.from_numpy(i) for i in _halves(len(y_val), options.get("seed", 0)))
    return run_dfr(z_val[fit], y_val[fit], b_val[fit], z_val[sel], y_val[sel], b_val[sel],
                   z_final=z_val, y_final=y_val, b_final=b_val, **options)


def apply_dfr(model: nn.Module, result: DFRResult) -> nn.Module:
    """A copy of `model` whose `classifier` computes the DFR layer (standardisation folded in); the backbone is
    untouched, so the model keeps its architecture and can be evaluated, saved and timed like any other."""
    new = copy.deepcopy(model)
    layer = new.classifier
    weight, bias = result.folded()
    if tuple(layer.weight.shape) != tuple(weight.shape) or layer.bias is None:
        raise BiseError(f"DFR: the model's classifier {tuple(layer.weight.shape)} does not match the fitted "
                        f"layer {tuple(weight.shape)} (or has no bias)")
    # Written into the existing layer (several backbones expose `classifier` as a read-only property).
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight))
        layer.bias.copy_(bias.to(layer.bias))
    return new
