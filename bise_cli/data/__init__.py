"""Dataset factory and a per-split summary (what `bise data` prints).

Each dataset module returns a `DatasetBundle` of (x, y, b) splits; this module only maps a name to a builder.
"""

from __future__ import annotations

import torch

from bise_cli.core.errors import check_choice
from bise_cli.core.metrics import alignment_groups, pattern_name
from bise_cli.data.base import SPLIT_NAMES, DatasetBundle, Split, aligned_mask, bias_columns

DATASETS = ("biased_mnist", "multicolor_mnist", "civilcomments", "cifar10c", "celeba", "table", "waterbirds")


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
    if name == "multicolor_mnist":
        from bise_cli.data.multicolor_mnist import build as build_multicolor_mnist
        return build_multicolor_mnist(source, root, seed, max_samples, **options)
    if name == "cifar10c":
        from bise_cli.data.cifar10c import build as build_cifar10c
        return build_cifar10c(source, root, rho, seed, max_samples, **options)
    if name == "celeba":
        from bise_cli.data.celeba import build as build_celeba
        return build_celeba(source, root, seed, max_samples, **options)
    if name == "table":
        from bise_cli.data.table import build as build_table
        return build_table(source, root, seed, max_samples, **options)
    if name == "waterbirds":
        from bise_cli.data.waterbirds import build as build_waterbirds
        return build_waterbirds(source, root, seed, max_samples, **options)
    from bise_cli.data.civilcomments import load_civilcomments
    return load_civilcomments(root=root, source=source, max_samples=max_samples, seed=seed,
                              synthetic_rho=rho, **options)


def _attribute_summary(y: torch.Tensor, b: torch.Tensor, num_classes: int, num_bias: int) -> dict:
    """Aligned fraction (overall and per class) and value counts of one bias attribute."""
    aligned = b == y
    per_class = [round(float(aligned[y == c].float().mean()), 6) if (y == c).any() else None
                 for c in range(num_classes)]
    return {
        "aligned_fraction": round(float(aligned.float().mean()), 6) if len(y) else None,
        "aligned_fraction_per_class": per_class,
        "bias_counts": torch.bincount(b, minlength=num_bias).tolist(),
    }


def summarize_split(split: Split, num_classes: int, num_bias: int, bias_names: tuple[str, ...] = ("bias",)) -> dict:
    """Size and, per bias attribute, aligned fraction and value counts; with one attribute those are top-level
    keys, with several they sit under `attributes` beside the counts of the alignment-pattern groups."""
    columns = bias_columns(split.b)
    if len(columns) == 1:
        return {"size": len(split), **_attribute_summary(split.y, columns[0], num_classes, num_bias)}
    aligned = aligned_mask(split.y, split.b)
    groups = {pattern_name(bias_names, pattern)[len("acc_"):]: int(mask.sum())
              for pattern, mask in alignment_groups(split.y, split.b)}
    return {
        "size": len(split),
        "aligned_fraction": round(float(aligned.all(1).float().mean()), 6) if len(split) else None,
        "attributes": {name: _attribute_summary(split.y, col, num_classes, num_bias)
                       for name, col in zip(bias_names, columns, strict=True)},
        "groups": groups,
    }


def summarize_bundle(bundle: DatasetBundle) -> dict:
    """`summarize_split` for every split present, keyed by split name, in the canonical order."""
    return {name: summarize_split(bundle[name], bundle.num_classes, bundle.num_bias, bundle.bias_names)
            for name in SPLIT_NAMES if bundle.get(name) is not None}


__all__ = ["DATASETS", "DatasetBundle", "Split", "build_dataset", "summarize_bundle", "summarize_split"]
