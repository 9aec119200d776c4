"""Deep Feature Reweighting (DFR; Kirichenko, Izmailov and Wilson, "Last Layer Re-Training is Sufficient for
Robustness to Spurious Correlations", ICLR 2023): a baseline that keeps the vanilla backbone frozen and retrains
only its last layer on group-balanced data.

This module follows the order of operations of DFR's released evaluation code (its functions
`dfr_train_subset_tune` / `dfr_train_subset_eval` for DFR^Tr_Tr and `dfr_on_validation_tune` /
`dfr_on_validation_eval` for DFR^Tr_Val, with the script's defaults), step by step:

- features z are the bottleneck (the input of the model's `classifier`); the last layer is an L1-regularised
  logistic regression (liblinear) on standardised features;
- a group-balanced subsample takes every (y, b) group present down to the size of the smallest one, without
  replacement (each group's indices shuffled, the first ones kept, the groups concatenated in group order);
- choosing C: ONE balanced subsample of the fitting set is drawn before the loop over the grid, and every C of
  the grid is fitted on that same subsample and scored on the held-out set by worst-group accuracy; ties go to
  the earlier C of the grid (numpy's argmax);
- the final layer averages the coefficients and intercepts of several fits on fresh balanced subsamples, with
  the standardisation fitted on the training split's embeddings (in both variants).

The two variants (DFR's Sec. 5):

- `dfr_train` (DFR^Tr_Tr) fits on the biased training split with its bias labels. C is chosen with the scaler
  fitted on the (whole, unbalanced) fitting set and liblinear limited to 20 iterations (`select_max_iter`, DFR's
  `max_iter=20`), scored on the validation split; the final model averages 10 subsamples of the training split.
  Without a validation split (DFR's code always has one), C is chosen on a held-out half of the training split
  (the other half fits), which is as biased as the training split; the final model uses all of it.
- `dfr_val` (DFR^Tr_Val) fits on the unbiased validation split: a random half (the larger one when the size is
  odd) is balanced and fits, with the scaler fitted on that balanced subsample; the other half scores C; the
  final model averages 20 subsamples of the whole validation split (DFR's `num_retrains=20`). Validation
  metrics of the resulting model are therefore not held-out numbers.

Random numbers come from one seeded numpy Generator per call, drawn in DFR's order (the split into halves, the
subsample, then for every fit the seed liblinear gets, as scikit-learn draws it from numpy's global generator
when no random_state is given).

Choices of our own (README, deviations table): several classes use one-vs-rest binary regressions (DFR's code
handles two classes; one-vs-rest is what liblinear does for several, and what scikit-learn did with
solver="liblinear" before it refused multi-class input in 1.8); with several bias attributes the groups are
the (y, alignment pattern) cells; groups are the ones present (DFR's code counts 0..max id); DFR's class-weight
search is off (its default); `n_select_subsamples` > 1 (default 1, DFR's) scores each C on that many subsamples,
all drawn before the loop, by the mean of their metrics.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.metrics import ACCURACY_METRICS, accuracy_metrics
from bise_cli.data.base import bias_columns

log = logging.getLogger(__name__)

# DFR's grid of inverse regularisation strengths (its code's C_OPTIONS), strongest fit first.
DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
# liblinear's iteration limit for the final fits (scikit-learn's default, which DFR's code keeps).
FINAL_MAX_ITER = 100


@dataclass
class DFRResult:
    """The averaged logistic regression on standardised features: logits = weight @ ((z - mean) / std) + bias."""

    weight: torch.Tensor   # (C, D)
    bias: torch.Tensor     # (C,)
    mean: torch.Tensor     # (D,)
    std: torch.Tensor      # (D,)
    c: float               # the chosen inverse regularisation strength
    n_subsamples: int = 1  # balanced subsamples averaged into weight and bias
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
    """Indices of a group-balanced subsample, drawn as DFR's code draws it: for every group present (in
    increasing id order) its indices are shuffled and the first m kept, m the size of the smallest present
    group; the groups are concatenated in that order."""
    values = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in values]
    size = min(len(m) for m in members)
    for m in members:
        rng.shuffle(m)
    return np.concatenate([m[:size] for m in members])


def halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held_out) positions of a random split of range(n), as DFR's tuning splits the validation split:
    shuffled, the first n // 2 held out, the rest (the larger half when n is odd) for fitting."""
    order = np.arange(n)
    rng.shuffle(order)
    return order[n // 2:], order[: n // 2]


# ------------------------------------------------------------------------------------------ logistic fits

def _l1_options() -> dict:
    # scikit-learn 1.8 deprecated `penalty` in favour of `l1_ratio` (l1_ratio=1 is the L1 penalty).
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def liblinear_seed(rng: np.random.Generator) -> int:
    """The seed of one liblinear fit, drawn from the run's generator at fit time (scikit-learn draws it the same
    way from numpy's global generator when random_state is None, as in DFR's code)."""
    return int(rng.integers(np.iinfo(np.int32).max))


# The bias of a class the fitting set does not contain: far below any fitted logit.
ABSENT_CLASS_BIAS = -1e4


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, seed: int,
               max_iter: int = FINAL_MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """L1 logistic regression (liblinear) as a (num_classes, D) weight and (num_classes,) bias whose argmax is
    the regression's prediction. Binary: sklearn's single row w becomes the rows [0; w] (softmax of [0, s] is
    sigmoid(s)). More classes: one-vs-rest, one binary regression per class (all with the same liblinear seed,
    as one multi-class liblinear call has). A class absent from the fitting set (a tiny split's balanced
    subsample) gets a zero row and a very low bias: it is never predicted."""
    present = np.unique(y)
    if len(present) < 2:
        raise BiseError(f"DFR: the fitting set holds only class(es) {present.tolist()}; it needs at least two")

    def binary(target: np.ndarray) -> tuple[np.ndarray, float]:
        model = LogisticRegression(C=c, solver="liblinear", random_state=seed, max_iter=max_iter,
                                   **_l1_options())
        model.fit(x, target)
        return model.coef_[0], float(model.intercept_[0])

    if num_classes == 2:
        w, b = binary(y)
        return np.stack([np.zeros_like(w), w]), np.array([0.0, b])
    absent = (np.zeros(x.shape[1]), ABSENT_CLASS_BIAS)
    rows = [binary((y == k).astype(int)) if k in present else absent for k in range(num_classes)]
    return np.stack([w for w, _ in rows]), np.array([b for _, b in rows])


@contextmanager
def _counting_unconverged(what: str, max_iter: int):
    """Collect liblinear's convergence warnings (one per fit that stopped at `max_iter`; DFR's tuning limits it
    to 20 on purpose) into one log line instead of one warning per fit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    stopped = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if stopped:
        log.info("DFR %s: %d liblinear fit(s) stopped at max_iter=%d before converging", what, stopped, max_iter)


def _numpy(z: torch.Tensor) -> np.ndarray:
    return z.double().cpu().numpy()


def choose_c(z_fit: torch.Tensor, y_fit: torch.Tensor, b_fit: torch.Tensor, z_sel: torch.Tensor,
             y_sel: torch.Tensor, b_sel: torch.Tensor, *, num_classes: int, num_bias: int,
             c_grid, select_metric: str, rng: np.random.Generator, scale_on: str, max_iter: int,
             n_select_subsamples: int = 1) -> tuple[float, list[dict]]:
    """DFR's tuning: the balanced subsample(s) of the fitting set drawn once, before the loop over `c_grid`;
    every C fitted on them and scored by `select_metric` on the selection set; the best C (ties: the earlier)
    and one history row per C. `scale_on` is where the standardisation is fitted: "fit" (the whole fitting
    set, DFR^Tr_Tr) or "subsample" (the balanced subsample, DFR^Tr_Val)."""
    x_fit, x_sel = _numpy(z_fit), _numpy(z_sel)
    y_fit_np = y_fit.long().cpu().numpy()
    groups = group_ids(y_fit, b_fit, num_bias)
    whole = StandardScaler().fit(x_fit) if scale_on == "fit" else None
    prepared = []
    for _ in range(n_select_subsamples):
        index = balanced_indices(groups, rng)
        scaler = whole if whole is not None else StandardScaler().fit(x_fit[index])
        prepared.append((scaler.transform(x_fit[index]), y_fit_np[index], scaler.transform(x_sel)))
    history, best = [], None
    for c in c_grid:
        rows = []
        for x, y, x_held in prepared:
            with _counting_unconverged(f"tuning C={c}", max_iter):
                w, bias = fit_logreg(x, y, num_classes, float(c), liblinear_seed(rng), max_iter)
            pred = torch.from_numpy((x_held @ w.T + bias).argmax(1))
            metrics = accuracy_metrics(y_sel.cpu(), b_sel.cpu(), pred, num_classes, num_bias)
            rows.append([metrics[m] for m in ACCURACY_METRICS])
        row = {"c": float(c), **dict(zip(ACCURACY_METRICS, np.mean(rows, axis=0).tolist(), strict=True))}
        history.append(row)
        value = row[select_metric]
        if not math.isnan(value) and (best is None or value > best[1]):
            best = (float(c), value)
    if best is None:
        raise BiseError(f"DFR: {select_metric} is undefined on the selection set for every C (no such samples)")
    return best[0], history


def fit_averaged(z: torch.Tensor, y: torch.Tensor, b: torch.Tensor, z_scale: torch.Tensor, *, c: float,
                 num_classes: int, num_bias: int, n_subsamples: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, StandardScaler]:
    """DFR's final model: weight and bias averaged over `n_subsamples` fits, each on a fresh balanced subsample
    of (z, y, b), standardised with a scaler fitted on `z_scale` (the training embeddings)."""
    scaler = StandardScaler().fit(_numpy(z_scale))
    x, y_np, groups = scaler.transform(_numpy(z)), y.long().cpu().numpy(), group_ids(y, b, num_bias)
    weights, biases = [], []
    with _counting_unconverged(f"final layer (C={c}, {n_subsamples} subsamples)", FINAL_MAX_ITER):
        for _ in range(n_subsamples):
            index = balanced_indices(groups, rng)
            w, bias = fit_logreg(x[index], y_np[index], num_classes, c, liblinear_seed(rng), FINAL_MAX_ITER)
            weights.append(w)
            biases.append(bias)
    return np.mean(weights, axis=0), np.mean(biases, axis=0), scaler


# --------------------------------------------------------------------------------------------------- DFR

def _check(c_grid, n_subsamples: int, n_select_subsamples: int, select_metric: str, select_max_iter: int) -> None:
    check_choice("baselines.dfr.select_metric", select_metric, ACCURACY_METRICS)
    if not isinstance(c_grid, (list, tuple)) or not c_grid or any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 for c in c_grid):
        raise BiseError(f"baselines.dfr.c_grid must be a non-empty list of numbers > 0, got {c_grid!r}")
    for name, value in (("n_subsamples", n_subsamples), ("n_select_subsamples", n_select_subsamples),
                        ("select_max_iter", select_max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BiseError(f"baselines.dfr.{name} must be an integer >= 1, got {value!r}")


# The settings that differ between the two variants: one value per stage in conf/config.yaml.
PER_STAGE = ("n_subsamples", "select_max_iter")


def dfr_options(settings: dict, stage: str) -> dict:
    """The keyword options of `dfr_train` / `dfr_val` (`stage`) from the `baselines.dfr` config, checked (one
    clear error for a bad value). `n_subsamples` and `select_max_iter` hold one value per stage
    ({dfr_train: ..., dfr_val: ...}) or one number for both."""
    options = {key: settings[key] for key in ("c_grid", "n_select_subsamples", "select_metric")}
    options["c_grid"] = list(options["c_grid"]) if isinstance(options["c_grid"], (list, tuple)) else \
        options["c_grid"]
    for key in PER_STAGE:
        value = settings[key]
        if isinstance(value, dict):
            if stage not in value:
                raise BiseError(f"baselines.dfr.{key} has no value for {stage}: give {{dfr_train: N, dfr_val: N}} "
                                f"or one number, got {value!r}")
            value = value[stage]
        options[key] = value
    _check(options["c_grid"], options["n_subsamples"], options["n_select_subsamples"], options["select_metric"],
           options["select_max_iter"])
    return options


def _result(w: np.ndarray, bias: np.ndarray, scaler: StandardScaler, c: float, n_subsamples: int,
            history: list[dict]) -> DFRResult:
    return DFRResult(weight=torch.from_numpy(w), bias=torch.from_numpy(bias),
                     mean=torch.from_numpy(scaler.mean_.copy()), std=torch.from_numpy(scaler.scale_.copy()),
                     c=c, n_subsamples=n_subsamples, history=history)


def dfr_train(z_train: torch.Tensor, y_train: torch.Tensor, b_train: torch.Tensor,
              z_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
              b_val: torch.Tensor | None = None, *, num_classes: int, num_bias: int, c_grid=DFR_C_GRID,
              n_subsamples: int = 10, n_select_subsamples: int = 1, select_max_iter: int = 20,
              select_metric: str = "acc_worst_group", seed: int = 0) -> DFRResult:
    """DFR^Tr_Tr (DFR's `dfr_train_subset_tune` then `dfr_train_subset_eval`): C chosen on the validation split,
    or, without one, on a held-out half of the training split (the other half fits); the final layer averages
    `n_subsamples` balanced fits of the whole training split, standardised with its mean and deviation."""
    _check(c_grid, n_subsamples, n_select_subsamples, select_metric, select_max_iter)
    rng = np.random.default_rng(seed)
    if z_val is None:
        fit, held = (torch.from_numpy(i) for i in halves(len(y_train), rng))
        tune = (z_train[fit], y_train[fit], b_train[fit], z_train[held], y_train[held], b_train[held])
    else:
        tune = (z_train, y_train, b_train, z_val, y_val, b_val)
    c, history = choose_c(*tune, num_classes=num_classes, num_bias=num_bias, c_grid=c_grid,
                          select_metric=select_metric, rng=rng, scale_on="fit", max_iter=select_max_iter,
                          n_select_subsamples=n_select_subsamples)
    w, bias, scaler = fit_averaged(z_train, y_train, b_train, z_train, c=c, num_classes=num_classes,
                                   num_bias=num_bias, n_subsamples=n_subsamples, rng=rng)
    return _result(w, bias, scaler, c, n_subsamples, history)


def dfr_val(z_val: torch.Tensor, y_val: torch.Tensor, b_val: torch.Tensor, z_train: torch.Tensor, *,
            num_classes: int, num_bias: int, c_grid=DFR_C_GRID, n_subsamples: int = 20,
            n_select_subsamples: int = 1, select_max_iter: int = FINAL_MAX_ITER,
            select_metric: str = "acc_worst_group", seed: int = 0) -> DFRResult:
    """DFR^Tr_Val (DFR's `dfr_on_validation_tune` then `dfr_on_validation_eval`): C chosen by fitting on a
    balanced subsample of one half of the validation split (standardised with that subsample's statistics) and
    scoring on the other half; the final layer averages `n_subsamples` balanced fits of the whole validation
    split, standardised with the mean and deviation of the training embeddings `z_train`."""
    _check(c_grid, n_subsamples, n_select_subsamples, select_metric, select_max_iter)
    rng = np.random.default_rng(seed)
    fit, held = (torch.from_numpy(i) for i in halves(len(y_val), rng))
    c, history = choose_c(z_val[fit], y_val[fit], b_val[fit], z_val[held], y_val[held], b_val[held],
                          num_classes=num_classes, num_bias=num_bias, c_grid=c_grid, select_metric=select_metric,
                          rng=rng, scale_on="subsample", max_iter=select_max_iter,
                          n_select_subsamples=n_select_subsamples)
    w, bias, scaler = fit_averaged(z_val, y_val, b_val, z_train, c=c, num_classes=num_classes, num_bias=num_bias,
                                   n_subsamples=n_subsamples, rng=rng)
    return _result(w, bias, scaler, c, n_subsamples, history)


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
