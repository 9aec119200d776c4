"""Per-sample weights r(y, b) of the reweighted cross-entropy L_r (BISE, Sec. 3; the official code's options).

L_r = (1/B) sum_j r(y_j, b_j) CE_j drives both the mask search and the fine-tuning stages, so the choice is one
top-level setting (`reweighting`). With C classes, "aligned" on attribute k meaning b_k == y and rho_k the
nominal training correlation of attribute k:

| name | paper option | weight |
|---|---|---|
| nominal_rho | 1 | one attribute: aligned 1/(C rho), conflicting (C-1)/(C (1-rho)), i.e. P_test/P_train of the
|             |   | sample's group for an unbiased test set; several attributes: the product over attributes |
| inverse_rho | 3 | 1 / prod_k P_k with P_k = rho_k if aligned on k else 1 - rho_k (equal total weight per group) |
| group_balanced | 8 | 1 / (G p(y, b)) with p the empirical frequency of the (y, b) cell in the split, G the number of
|                |   | cells (counts clamped >= 1): every cell gets equal total weight, the mean weight is 1 |
| empirical | EMPIRICAL | the same rule as group_balanced, the paper's name for it when b are pseudo labels from an
|           |           | identification model |
| none | 0 | 1 everywhere (plain cross-entropy) |

`auto` picks the paper's per-dataset default (the dataset's `DatasetSpec.reweighting`, bise_cli.data.registry;
`empirical` for the unsupervised variant).
"""

from __future__ import annotations

import torch

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.data.base import bias_columns
from bise_cli.data.registry import spec

REWEIGHTINGS = ("nominal_rho", "inverse_rho", "group_balanced", "empirical", "none")


def resolve(name: str, dataset: str, unsupervised: bool = False) -> str:
    """The concrete reweighting for `name` (`auto` -> the paper's default for `dataset`)."""
    check_choice("reweighting", name, ("auto", *REWEIGHTINGS))
    if name != "auto":
        return name
    if unsupervised:
        return "empirical"
    return spec(dataset).reweighting


def _cells(y: torch.Tensor, b: torch.Tensor, num_bias: int) -> torch.Tensor:
    """One integer per (y, b_1, ..., b_A) cell."""
    cell = y.long()
    for column in bias_columns(b):
        cell = cell * num_bias + column.long()
    return cell


class SampleWeights:
    """r(y, b) for batches: a lookup table over every (y, b) cell, built once from the weighting split."""

    def __init__(self, table: torch.Tensor, num_bias: int):
        self.table, self.num_bias = table, num_bias

    def to(self, device) -> SampleWeights:
        return SampleWeights(self.table.to(device), self.num_bias)

    def __call__(self, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.table[_cells(y, b, self.num_bias)]


def sample_weights(name: str, y: torch.Tensor, b: torch.Tensor, num_classes: int, num_bias: int,
                   rho: tuple[float, ...] | list[float] | None) -> SampleWeights:
    """The weighting `name` for a split with targets `y` and bias labels `b` ((N,) or (N, A))."""
    check_choice("reweighting", name, REWEIGHTINGS)
    attributes = len(bias_columns(b))
    cells = num_classes * num_bias ** attributes
    if name == "none":
        return SampleWeights(torch.ones(cells), num_bias)
    if name in ("group_balanced", "empirical"):
        counts = torch.bincount(_cells(y, b, num_bias), minlength=cells).double().clamp(min=1)
        return SampleWeights((len(y) / (cells * counts)).float(), num_bias)
    if rho is None or len(rho) != attributes or not all(0 < r <= 1 for r in rho):
        raise BiseError(f"reweighting={name} needs the nominal rho of each of the {attributes} bias attribute(s) "
                        f"in (0, 1], got {rho}; use reweighting=group_balanced for data without one")
    # Enumerate every cell: aligned[k] tells whether attribute k equals the class.
    grid = torch.cartesian_prod(*[torch.arange(n) for n in [num_classes] + [num_bias] * attributes])
    grid = grid.view(-1, 1 + attributes)
    table = torch.ones(len(grid), dtype=torch.float64)
    c = num_classes
    for k, r in enumerate(rho):
        aligned = grid[:, 1 + k] == grid[:, 0]
        if name == "nominal_rho":
            # P_test / P_train of this attribute; rho = 1 has no conflicting samples, weight 0 avoids 1/0.
            conflicting = (c - 1) / (c * (1 - r)) if r < 1 else 0.0
            table *= torch.where(aligned, torch.tensor(1.0 / (c * r)), torch.tensor(conflicting))
        else:
            conflicting = 1.0 / (1 - r) if r < 1 else 0.0
            table *= torch.where(aligned, torch.tensor(1.0 / r), torch.tensor(conflicting))
    return SampleWeights(table.float(), num_bias)
