"""Dataset factory and a per-split summary (what `bise data` prints).

Each dataset module returns a `DatasetBundle` of (x, y, b) splits; the builder of each name is declared in the
dataset registry (bise_cli.data.registry) with the dataset's other facts.
"""

from __future__ import annotations

import torch

from bise_cli.core.metrics import alignment_groups, pattern_name
from bise_cli.data.base import SPLIT_NAMES, DatasetBundle, Split, aligned_mask, bias_columns
from bise_cli.data.registry import DATASETS, spec


def build_dataset(name: str, rho: float, seed: int, source: str, root: str, max_samples: int | None = None,
                  **options) -> DatasetBundle:
    """Build dataset `name` with its registry builder; `options` are the dataset's own keyword arguments (see
    conf/dataset/*.yaml), `rho` goes to the builders whose bias correlation it sets."""
    dataset = spec(name)
    if dataset.uses_rho:
        options["rho"] = rho
    return dataset.function("build")(source=source, root=root, seed=seed, max_samples=max_samples, **options)


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
