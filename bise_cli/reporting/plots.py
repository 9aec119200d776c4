"""Plots saved per run and per sweep (matplotlib, Agg backend): each function writes one PNG and returns its path.

Stage colours, titles and metric units come from `bise_cli.core.names`; this module never reads records itself
(`bise table` hands `plot_sweep` the records it loaded), so it depends on nothing above `names`. pandas is
imported only by the sweep plots (whose callers hold a DataFrame already): a run's own plots do without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from bise_cli.core.names import heading  # noqa: E402
from bise_cli.core.names import metric as declared_metric  # noqa: E402
from bise_cli.run.registry import spec as stage  # noqa: E402
from bise_cli.run.registry import stage_rank  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


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


def _by_stage(df: pd.DataFrame):
    """(stage name, its records) in the declared stage order."""
    groups = dict(list(df.groupby("stage", sort=False)))
    return [(name, groups[name]) for name in sorted(groups, key=stage_rank)]


def plot_accuracy_vs_sparsity(df: pd.DataFrame, path, metric: str = "acc_unbiased") -> Path:
    """Mean ± std over seeds of `metric` against unit sparsity, one colour per stage."""
    import pandas as pd

    x_metric, y_metric = declared_metric("sparsity_units"), declared_metric(metric)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, group in _by_stage(df):
        if metric not in group or "sparsity_units" not in group:
            continue
        x = pd.to_numeric(group["sparsity_units"], errors="coerce").fillna(0.0) * x_metric.scale
        y = pd.to_numeric(group[metric], errors="coerce") * y_metric.scale
        ax.errorbar(x.mean(), y.mean(), xerr=x.std() if len(x) > 1 else None, yerr=y.std() if len(y) > 1 else None,
                    fmt="o", color=stage(name).colour, label=stage(name).title, capsize=3)
    ax.set_xlabel(heading(x_metric))
    ax.set_ylabel(heading(y_metric))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(records: pd.DataFrame, out_dir) -> list[Path]:
    """Accuracy vs sparsity, and unbiased accuracy per stage, over the records of a sweep (one row per record,
    as `bise_cli.reporting.tables.load_records` returns them); the PNGs go into `out_dir`."""
    import pandas as pd

    out_dir = Path(out_dir)
    paths = [plot_accuracy_vs_sparsity(records, out_dir / "accuracy_vs_sparsity.png")]
    if "acc_unbiased" in records:
        shown = declared_metric("acc_unbiased")
        stages = _by_stage(records)
        values = [pd.to_numeric(group["acc_unbiased"], errors="coerce") * shown.scale for _, group in stages]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar([stage(name).title for name, _ in stages], [v.mean() for v in values],
               yerr=[0.0 if len(v) < 2 else v.std() for v in values], capsize=3,
               color=[stage(name).colour for name, _ in stages])
        ax.set_ylabel(heading(shown))
        ax.tick_params(axis="x", rotation=30)
        paths.append(_save(fig, out_dir / "accuracy_by_stage.png"))
    return paths
