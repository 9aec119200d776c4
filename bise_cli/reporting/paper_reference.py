"""Published numbers for the reference columns of `bise table --reference`.

Every value is stored with the metric it is (a record key declared in `bise_cli.core.names`), so a reference only
ever sits beside the column of that metric. Values are in the units the tables print (%, M).

- BiasedMNIST (De Moura Matos et al., CVPR 2026, main table, ablation and efficiency figures): top-1 accuracy on
  the ρ = 0.1 test set, i.e. our `acc` (not the group-averaged `acc_unbiased`); weight sparsity S (%) is our
  `sparsity_weights`, MFLOPs (multiply-accumulates) our `macs`. The table's baselines are LfF (Nam et al.,
  NeurIPS 2020) and SoftCon and BCon+BBal (Hong & Yang, NeurIPS 2021); their numbers are probably copied from
  Barbano et al.'s table ("Unbiased Supervised Contrastive Learning", ICLR 2023). Each such reference says so
  in its note, which the table footer prints.
- Multi-Color MNIST (same paper): the unweighted mean of the four (left, right) aligned/conflicting group
  accuracies, our `acc_unbiased`. The vanilla value is the one reported by Nahon et al. (ICCV 2023, Table 3).
- CelebA Blond_Hair / Male (same paper): which accuracy the headline numbers are is not stated; the balanced
  ("unbiased") test accuracy is inferred, so these references are flagged as inferred.
- CivilComments: the paper's numbers are not in this table yet.

`rho=None` means the dataset's single published setting, shown whatever ρ the records have; `ablation` is None
for the main tables or one of "none", "ce", "mi", "ce+mi" for the ablation rows (reweighted CE and/or MI term on).
"""

from __future__ import annotations

from dataclasses import dataclass

BISE_PAPER = "De Moura Matos et al., CVPR 2026"
NAHON = "Nahon et al., ICCV 2023, Table 3"
# The BiasedMNIST baseline numbers of the BISE paper: the methods' own papers, and the table they were probably
# copied from (Barbano et al., "Unbiased Supervised Contrastive Learning", ICLR 2023; not checked against it).
HONG_YANG = ("method: Hong & Yang, \"Unbiased Classification Through Bias-Contrastive and Bias-Balanced "
             "Learning\", NeurIPS 2021; number probably from Barbano et al.'s table (ICLR 2023)")
NAM = ("method: Nam et al., \"Learning from Failure\", NeurIPS 2020; number probably from Barbano et al.'s "
       "table (ICLR 2023)")


@dataclass(frozen=True)
class Reference:
    dataset: str
    stage: str
    metric: str
    value: float
    rho: float | None = None
    ablation: str | None = None
    source: str = BISE_PAPER
    note: str = ""  # e.g. "metric inferred"


def _bmnist(stage: str, rho: float, ablation: str | None = None, note: str = "", **values: float) -> list[Reference]:
    return [Reference("biased_mnist", stage, metric, value, rho, ablation, note=note)
            for metric, value in values.items()]


INFERRED = "metric inferred: the paper does not say which accuracy"

REFERENCES: tuple[Reference, ...] = (
    *_bmnist("vanilla", 0.99, acc=88.9, macs=415.4),
    *_bmnist("vanilla", 0.995, acc=75.1, macs=415.4),
    *_bmnist("vanilla", 0.997, acc=66.1, macs=415.4),
    *_bmnist("bise", 0.99, acc=96.1, sparsity_weights=20.9, macs=328.3),
    *_bmnist("bise", 0.995, acc=92.2),
    *_bmnist("bise", 0.997, acc=90.8, sparsity_weights=35.0, macs=269.6),
    *_bmnist("bise_ft", 0.99, acc=98.1),
    *_bmnist("bise_ft", 0.995, acc=96.3),
    *_bmnist("bise_ft", 0.997, acc=95.9),
    *_bmnist("bise", 0.99, "none", acc=91.9, sparsity_weights=5.8, macs=390.9),
    *_bmnist("bise", 0.99, "ce", acc=96.0, sparsity_weights=18.5, macs=338.2),
    *_bmnist("bise", 0.99, "mi", acc=91.1, sparsity_weights=18.7, macs=337.3),
    *_bmnist("bise", 0.99, "ce+mi", acc=96.1, sparsity_weights=20.9, macs=328.3),
    # Baselines in the paper's BiasedMNIST table, each a stage here: LfF (Nam et al.), SoftCon and BCon+BBal (Hong &
    # Yang, stages softcon and bcon_bbal). The values are probably copied from Barbano et al.'s table (ICLR 2023).
    *_bmnist("lff", 0.99, note=NAM, acc=95.1), *_bmnist("lff", 0.995, note=NAM, acc=90.3),
    *_bmnist("lff", 0.997, note=NAM, acc=63.7),
    *_bmnist("softcon", 0.99, note=HONG_YANG, acc=95.2), *_bmnist("softcon", 0.995, note=HONG_YANG, acc=93.1),
    *_bmnist("softcon", 0.997, note=HONG_YANG, acc=88.6),
    *_bmnist("bcon_bbal", 0.99, note=HONG_YANG, acc=98.1), *_bmnist("bcon_bbal", 0.995, note=HONG_YANG, acc=97.7),
    *_bmnist("bcon_bbal", 0.997, note=HONG_YANG, acc=97.3),
    Reference("multicolor_mnist", "vanilla", "acc_unbiased", 57.4, source=NAHON),
    Reference("multicolor_mnist", "bise", "acc_unbiased", 60.3),
    Reference("multicolor_mnist", "bise_ft", "acc_unbiased", 70.6),
    Reference("multicolor_mnist", "ffw", "acc_unbiased", 36.37),
    Reference("celeba", "vanilla", "acc_unbiased", 76.5, note=INFERRED),
    Reference("celeba", "bise", "acc_unbiased", 89.7, note=INFERRED),
    Reference("celeba", "bise_ft", "acc_unbiased", 91.8, note=INFERRED),
)

# What each referenced metric is in the paper's words, for table footers.
PAPER_METRIC_MEANING = {
    ("biased_mnist", "acc"): "top-1 accuracy on the ρ = 0.1 test set",
    ("biased_mnist", "sparsity_weights"): "weight sparsity S",
    ("biased_mnist", "macs"): "MFLOPs (multiply-accumulates)",
    ("multicolor_mnist", "acc_unbiased"): "mean of the four group accuracies",
    ("celeba", "acc_unbiased"): "accuracy on the balanced test set",
}


def _rho(rho) -> float | None:
    try:
        return round(float(rho), 6)
    except (TypeError, ValueError):
        return None


def reference(dataset, stage: str, rho, metric: str, ablation=None) -> Reference | None:
    """The published reference for this table cell (dataset, stage, ρ, metric, ablation row), or None."""
    for ref in REFERENCES:
        if (ref.dataset, ref.stage, ref.metric, ref.ablation) != (dataset, stage, metric, ablation):
            continue
        if ref.rho is None or ref.rho == _rho(rho):
            return ref
    return None


def reference_value(dataset, stage: str, rho, metric: str, ablation=None) -> float | None:
    """The published value for this table cell, or None when there is none."""
    ref = reference(dataset, stage, rho, metric, ablation)
    return None if ref is None else ref.value


def reference_metrics(dataset) -> list[str]:
    """The metrics with at least one reference for `dataset`, in first-declared order."""
    return list(dict.fromkeys(ref.metric for ref in REFERENCES if ref.dataset == dataset))
