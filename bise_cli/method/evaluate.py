"""Evaluate one model on a dataset bundle: accuracy metrics on test (and val), disparity for binary tasks,
WILDS overlapping-group metrics when the split carries identity columns, and bias leakage.

Logits that are not finite (a checkpoint with NaN weights, weights that overflow) still have an argmax (class 0
for a row of NaN), so they would give plausible-looking accuracies; every evaluation therefore checks its
logits and stops with one line naming the first layer whose output is not finite.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.core.metrics import accuracy_metrics, disparity_metrics, group_proportions, overlapping_group_metrics
from bise_cli.core.names import per_attribute
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.method.bootstrap import bootstrap_ci
from bise_cli.method.probe import fresh_probe_leakage, mean_over_attributes
from bise_cli.method.train import predict


def train_group_weights(bundle: DatasetBundle) -> torch.Tensor | None:
    """The training split's (y, b) proportions (one bias attribute only): weights of acc_weighted_avg_group."""
    train = bundle.get("train")
    if train is None or bundle.num_attributes > 1:
        return None
    return group_proportions(train.y, train.b, bundle.num_classes, bundle.num_bias)


@contextlib.contextmanager
def _watch_logits(model: nn.Module):
    """Count the rows of non-finite logits of every forward pass of `model`, on the device (no host sync per batch);
    yields a dict whose "bad" entry holds one count per batch."""
    watch: dict[str, list[torch.Tensor]] = {"bad": []}

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() and output.numel():
            rows = output.detach().reshape(output.shape[0], -1)
            watch["bad"].append((~torch.isfinite(rows)).any(1).sum())

    handle = model.register_forward_hook(hook)
    try:
        yield watch
    finally:
        handle.remove()


def first_non_finite_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Where `model(x)` first stops being finite: the input, else the first module (in execution order) whose
    output holds NaN or inf. Forward hooks on every module, attached only for this one diagnostic pass."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        return "its input (the evaluation data hold NaN or inf values)"
    found: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module, _inputs, output):
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        if not found and any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                             for t in tensors):
            found.append(f"layer '{names[module]}' ({type(module).__name__})" if names[module] else
                         f"the forward of {type(module).__name__} itself (no submodule's output is non-finite)")

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else "no layer on a re-run (the non-finite values are not reproducible)"


def check_finite_logits(model: nn.Module, split: Split, split_name: str, counts: list[torch.Tensor],
                        batch_size: int, device) -> None:
    """BiseError naming the first non-finite layer when any batch's logits (`counts`: non-finite rows per batch,
    from `_watch_logits`) were not finite; costs one host sync when they all were."""
    if not counts:
        return
    per_batch = torch.stack(counts).cpu()
    bad = int(per_batch.sum())
    if not bad:
        return
    first = int(torch.nonzero(per_batch).flatten()[0])
    x = next(batch for i, (batch, _, _) in enumerate(split.batches(batch_size, device=device)) if i == first)
    was_training = model.training
    model.eval()
    try:
        where = first_non_finite_layer(model, x)
    finally:
        model.train(was_training)
    raise BiseError(f"the model's logits on the {split_name} split are not finite (NaN or inf) for {bad} of "
                    f"{len(split)} samples, so its predictions mean nothing; the first non-finite output is at "
                    f"{where}: check the model's weights (a broken or overflowing checkpoint, or training that "
                    "diverged)")


def checked_predict(model: nn.Module, split: Split, split_name: str, batch_size: int, device,
                    features: bool = False) -> dict:
    """`predict` on `split` (with the bottleneck features when asked), stopping with one line when any logits
    are not finite."""
    with _watch_logits(model) as watch:
        out = predict(model, split, batch_size, device, features=features)
    check_finite_logits(model, split, split_name, watch["bad"], batch_size, device)
    return out


def split_metrics(model: nn.Module, bundle: DatasetBundle, split_name: str, batch_size: int, device,
                  bootstrap: dict | None = None, seed: int = 0, out: dict | None = None) -> dict:
    """Every metric of `split_name` (accuracy family, disparity when binary, WILDS groups when available), and
    with `bootstrap.n` > 0 a percentile confidence interval `<metric>_ci` = [low, high] of each accuracy metric
    from that many seeded resamples of the per-sample table. `out`: the split's `checked_predict`, when the
    caller has it already."""
    split = bundle[split_name]
    if out is None:
        out = checked_predict(model, split, split_name, batch_size, device)
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
    # The probe's test features come from this pass (the features a second pass would give), saving a second
    # forward pass over the test split.
    test = checked_predict(model, bundle["test"], "test", batch_size, device, features=bool(probe))
    metrics = split_metrics(model, bundle, "test", batch_size, device, bootstrap, seed, out=test)
    # Extra evaluation splits (CelebA's conflicting test set) and validation, prefixed with their name.
    for name in ("val", "test_conflicting"):
        if bundle.get(name) is not None:
            extra = split_metrics(model, bundle, name, batch_size, device)
            metrics.update({f"{name}_{k}": v for k, v in extra.items() if isinstance(v, float)})
    if probe:
        with torch.random.fork_rng(devices=[]):
            leakage = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, seed=seed,
                                          feature_batch_size=batch_size, device=device, test_features=test["z"],
                                          **probe)
        metrics["leakage"] = mean_over_attributes(leakage)
        if len(leakage) > 1:
            metrics.update({per_attribute("leakage", name): value
                            for name, value in zip(bundle.bias_names, leakage, strict=True)})
    return metrics
