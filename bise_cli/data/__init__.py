"""Dataset factory and a per-split summary (what `bise data` prints).

Each dataset module returns a `DatasetBundle` of (x, y, b) splits; this module only maps a name to a builder.
"""

from __future__ import annotations

import torch

from bise_cli.data.base import SPLIT_NAMES, DatasetBundle, Split
from bise_cli.errors import check_choice

DATASETS = ("biased_mnist", "civilcomments")


def build_dataset(name: str, rho: float, seed: int, source: str, root: str, max_samples: int | None = None,
                  **options) -> DatasetBundle:
    """Build dataset `name`; `options` are the dataset's own keyword arguments (see conf/dataset/*.yaml)."""
    check_choice("dataset", name, DATASETS)
    if name == "biased_mnist":
        from bise_cli.data.biased_mnist import build_biased_mnist, check_rho
        from bise_cli.data.mnist_source import load_digits
        check_rho(rho)  # fail on a bad rho before reading any file
        digits = load_digits(source, root, fallback=options.pop("fallback", "none"))
        return build_biased_mnist(digits, rho, seed=seed, max_samples=max_samples, **options)
    from bise_cli.data.civilcomments import load_civilcomments
    return load_civilcomments(root=root, source=source, max_samples=max_samples, seed=seed,
                              synthetic_rho=rho, **options)


def summarize_split(split: Split, num_classes: int, num_bias: int) -> dict:
    """Size, aligned fraction (overall and per class) and bias-value counts of one split."""
    aligned = split.b == split.y
    per_class = []
    for c in range(num_classes):
        in_class = split.y == c
        per_class.append(round(float(aligned[in_class].float().mean()), 6) if in_class.any() else None)
    return {
        "size": len(split),
        "aligned_fraction": round(float(aligned.float().mean()), 6) if len(split) else None,
        "aligned_fraction_per_class": per_class,
        "bias_counts": torch.bincount(split.b, minlength=num_bias).tolist(),
    }


def summarize_bundle(bundle: DatasetBundle) -> dict:
    """`summarize_split` for every split present, keyed by split name, in the canonical order."""
    return {name: summarize_split(bundle[name], bundle.num_classes, bundle.num_bias)
            for name in SPLIT_NAMES if bundle.get(name) is not None}


__all__ = ["DATASETS", "DatasetBundle", "Split", "build_dataset", "summarize_bundle", "summarize_split"]
