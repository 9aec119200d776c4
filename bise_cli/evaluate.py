"""Evaluate one model on a dataset bundle: accuracy metrics on test (and val), disparity for binary tasks,
WILDS overlapping-group metrics when the split carries identity columns, and bias leakage.
"""

from __future__ import annotations

import torch
from torch import nn

from bise_cli.bootstrap import bootstrap_ci
from bise_cli.data.base import DatasetBundle
from bise_cli.metrics import accuracy_metrics, disparity_metrics, group_proportions, overlapping_group_metrics
from bise_cli.probe import fresh_probe_leakage, mean_over_attributes
from bise_cli.train import predict


def train_group_weights(bundle: DatasetBundle) -> torch.Tensor | None:
    """The training split's (y, b) proportions (one bias attribute only): weights of acc_weighted_avg_group."""
    train = bundle.get("train")
    if train is None or bundle.num_attributes > 1:
        return None
    return group_proportions(train.y, train.b, bundle.num_classes, bundle.num_bias)


def split_metrics(model: nn.Module, bundle: DatasetBundle, split_name: str, batch_size: int, device,
                  bootstrap: dict | None = None, seed: int = 0) -> dict:
    """Every metric of `split_name` (accuracy family, disparity when binary, WILDS groups when available), and
    with `bootstrap.n` > 0 a percentile confidence interval `<metric>_ci` = [low, high] of each accuracy metric
    from that many seeded resamples of the per-sample table."""
    split = bundle[split_name]
    out = predict(model, split, batch_size, device)
    metrics = accuracy_metrics(out["y"], out["b"], out["pred"], bundle.num_classes, bundle.num_bias,
                               bundle.bias_names, train_group_weights(bundle))
    if bootstrap and bootstrap.get("n", 0) > 0:
        intervals = bootstrap_ci(out["y"], out["b"], out["pred"], n=bootstrap["n"], seed=seed,
                                 alpha=bootstrap["alpha"], num_bias=bundle.num_bias)
        metrics.update({f"{name}_ci": [low, high] for name, (low, high) in intervals.items()})
    if bundle.num_classes == 2 and bundle.num_bias == 2 and bundle.num_attributes == 1:
        metrics.update(disparity_metrics(out["y"], out["b"], out["pred"]))
    identities = split.meta.get("identities")
    if identities is not None:
        wilds = overlapping_group_metrics(out["y"], out["pred"], identities, bundle.info["identity_names"])
        metrics["wilds_acc_avg_group"] = wilds["acc_avg_group"]
        metrics["wilds_acc_worst_group"] = wilds["acc_worst_group"]
        metrics["wilds_groups"] = wilds["groups"]
        if bundle.info.get("groups") == "wilds":
            # The user chose WILDS' 16 groups as *the* group definition: headline names follow it.
            metrics["coarse_acc_worst_group"] = metrics["acc_worst_group"]
            metrics["acc_worst_group"] = wilds["acc_worst_group"]
            metrics["acc_avg_group"] = wilds["acc_avg_group"]
    return metrics


def evaluate_model(model: nn.Module, bundle: DatasetBundle, *, batch_size: int, device, probe: dict | None,
                   seed: int, bootstrap: dict | None = None) -> dict:
    """Test metrics at the top level, validation metrics prefixed `val_`, and the fresh-probe `leakage` (the
    mean over bias attributes; `leakage_<attribute>` each when there are several)."""
    model.eval()
    metrics = split_metrics(model, bundle, "test", batch_size, device, bootstrap, seed)
    # Extra evaluation splits (CelebA's conflicting test set) and validation, prefixed with their name.
    for name in ("val", "test_conflicting"):
        if bundle.get(name) is not None:
            extra = split_metrics(model, bundle, name, batch_size, device)
            metrics.update({f"{name}_{k}": v for k, v in extra.items() if isinstance(v, float)})
    if probe:
        with torch.random.fork_rng(devices=[]):
            leakage = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, seed=seed,
                                          device=device, **probe)
        metrics["leakage"] = mean_over_attributes(leakage)
        if len(leakage) > 1:
            metrics.update({f"leakage_{name}": value for name, value in zip(bundle.bias_names, leakage, strict=True)})
    return metrics
