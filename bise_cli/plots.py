"""Plots saved per run and per sweep (matplotlib, Agg backend): each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402

STAGE_COLOURS = {"vanilla": "black", "bise": "tab:blue", "bise_ft": "tab:cyan", "reweighted_ft": "tab:purple",
                 "random": "tab:orange", "magnitude": "tab:green", "ffw": "tab:red"}


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_search_curves(history: list[dict], path) -> Path:
    """Validation/test accuracy, CE and MI, and unit sparsity per mask-search epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, label in (("val_acc", "val (selection metric)"), ("test_acc", "test accuracy"), ("head_acc", "bias head")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            axes[0].plot(epochs, [float("nan") if v is None else v for v in values], label=label)
    axes[0].set_title("accuracy")
    axes[0].legend(fontsize=7)
    axes[1].plot(epochs, [row["loss_ce"] for row in history], label="reweighted CE")
    axes[1].plot(epochs, [float("nan") if row.get("mi") is None else row["mi"] for row in history], label="MI")
    axes[1].set_title("loss terms")
    axes[1].legend(fontsize=7)
    axes[2].plot(epochs, [row["sparsity_units"] for row in history])
    axes[2].set_title("units switched off")
    for ax in axes:
        ax.set_xlabel("mask epoch")
    return _save(fig, path)


def plot_kept_units(kept: dict[str, tuple[int, int]], path) -> Path:
    """Kept and total units per gated layer."""
    names = list(kept)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(names)), 3.2))
    ax.bar(names, [total for _, total in kept.values()], color="lightgrey", label="total")
    ax.bar(names, [k for k, _ in kept.values()], color="tab:blue", label="kept")
    ax.set_ylabel("units")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_sparsity(df: pd.DataFrame, path, metric: str = "acc_unbiased") -> Path:
    """Mean ± std over seeds of `metric` against unit sparsity, one colour per stage."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for stage, group in df.groupby("stage", sort=False):
        if metric not in group or "sparsity_units" not in group:
            continue
        x = group["sparsity_units"].fillna(0.0) * 100
        y = group[metric] * 100
        ax.errorbar(x.mean(), y.mean(), xerr=x.std() if len(x) > 1 else None, yerr=y.std() if len(y) > 1 else None,
                    fmt="o", color=STAGE_COLOURS.get(stage, "grey"), label=stage, capsize=3)
    ax.set_xlabel("units switched off (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(root, out_dir=None) -> list[Path]:
    """Accuracy vs sparsity, and unbiased accuracy per stage, over every record under `root`."""
    from bise_cli.tables import load_records

    df = load_records(root)
    out_dir = Path(out_dir or root)
    paths = [plot_accuracy_vs_sparsity(df, out_dir / "accuracy_vs_sparsity.png")]
    if "acc_unbiased" in df:
        means = df.groupby("stage", sort=False)["acc_unbiased"].agg(["mean", "std"]) * 100
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(means.index, means["mean"], yerr=means["std"].fillna(0), capsize=3,
               color=[STAGE_COLOURS.get(s, "grey") for s in means.index])
        ax.set_ylabel("unbiased accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
        paths.append(_save(fig, out_dir / "accuracy_by_stage.png"))
    return paths
