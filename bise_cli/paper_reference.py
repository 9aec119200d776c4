"""The paper's reported numbers (method.md §4.2; mostly from a paper digest, see its confidence tags), for the
reference column of `bise table --reference`. Values are in the units the tables print (%, M).

Keys: (dataset, stage, rho, ablation) where ablation is None for the main tables or one of "none",
"ce", "mi", "ce+mi" for the rows of the ablation table (reweighted CE and/or MI term switched on).
"""

from __future__ import annotations

PAPER = {
    ("biased_mnist", "vanilla", 0.99, None): {"acc_unbiased": 88.9, "macs": 415.4},
    ("biased_mnist", "vanilla", 0.995, None): {"acc_unbiased": 75.1, "macs": 415.4},
    ("biased_mnist", "vanilla", 0.997, None): {"acc_unbiased": 66.1, "macs": 415.4},
    ("biased_mnist", "bise", 0.99, None): {"acc_unbiased": 96.1, "sparsity_weights": 20.9, "macs": 328.3},
    ("biased_mnist", "bise", 0.995, None): {"acc_unbiased": 92.2},
    ("biased_mnist", "bise", 0.997, None): {"acc_unbiased": 90.8, "sparsity_weights": 35.0, "macs": 269.6},
    ("biased_mnist", "bise_ft", 0.99, None): {"acc_unbiased": 98.1},
    ("biased_mnist", "bise_ft", 0.995, None): {"acc_unbiased": 96.3},
    ("biased_mnist", "bise_ft", 0.997, None): {"acc_unbiased": 95.9},
    ("biased_mnist", "bise", 0.99, "none"): {"acc_unbiased": 91.9, "sparsity_weights": 5.8, "macs": 390.9},
    ("biased_mnist", "bise", 0.99, "ce"): {"acc_unbiased": 96.0, "sparsity_weights": 18.5, "macs": 338.2},
    ("biased_mnist", "bise", 0.99, "mi"): {"acc_unbiased": 91.1, "sparsity_weights": 18.7, "macs": 337.3},
    ("biased_mnist", "bise", 0.99, "ce+mi"): {"acc_unbiased": 96.1, "sparsity_weights": 20.9, "macs": 328.3},
}


def reference_value(dataset, stage: str, rho, metric: str, ablation=None) -> float | None:
    """The paper's value for this table cell, or None when the paper reports none."""
    try:
        rho = round(float(rho), 6)
    except (TypeError, ValueError):
        return None
    return PAPER.get((dataset, stage, rho, ablation), {}).get(metric)
