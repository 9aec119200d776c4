"""Console summaries: the side-by-side stage table at the end of a run, and `bise data`'s dataset summary.

rich reads `[...]` in text as markup: notes, paths, dataset sources and group names (the user's) go through
`bise_cli.core.escape.console`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bise_cli.core.escape import console as escape
from bise_cli.core.files import write_json
from bise_cli.core.names import format_value, heading
from bise_cli.data import summarize_bundle
from bise_cli.data.base import DatasetBundle
from bise_cli.reporting.labels import stage_label

# Logs, pipes and CI capture output without a terminal: 120 columns, the width the headline table is made for.
TABLE_WIDTH = 120
console = Console(width=None if sys.stdout.isatty() else TABLE_WIDTH)

# The terminal table a newcomer reads: the stage by its full title and the headline metrics, each with its full
# declared title (bise_cli.core.names), in at most TABLE_WIDTH columns. Every other metric is in report.md (the
# model card's text and the plots), metrics.jsonl and `bise table`.
HEADLINE_METRICS = ("acc_unbiased", "acc_worst_group", "acc_conflicting", "sparsity_units", "macs", "leakage")


def print_run_summary(records: list[dict], note: str = "", out_dir: str | Path | None = None,
                      out: Console | None = None) -> None:
    """One row per stage with the headline metrics, units as declared in bise_cli.core.names (accuracies and sparsities
    in %, MACs in millions); never truncated in a 120-column terminal or a pipe."""
    out = out or console
    columns = [k for k in HEADLINE_METRICS if any(r.get(k) is not None for r in records)]
    title = "bise run: test metrics" + (f"\n{escape(note)}" if note else "")
    if records and records[0].get("data_source"):
        first = records[0]
        title += (f"\ndata: {escape(first.get('dataset'))} built from {escape(first['data_source'])} "
                  f"({escape(first.get('data_train_size'))} training samples)")
    table = Table(title=title)
    table.add_column("stage")  # the only column that may wrap (a long selection label), never truncated
    for key in columns:
        table.add_column(heading(key), justify="right", no_wrap=True)
    for record in records:
        table.add_row(escape(stage_label(record)), *[escape(format_value(k, record.get(k))) for k in columns])
    out.print(table)
    if out_dir is not None:
        out.print(f"every metric: {escape(Path(out_dir) / 'report.md')} (the model card and the plots) and "
                  "metrics.jsonl there; `bise table DIR` over several runs")


def save_sample_grid(bundle: DatasetBundle, path: str | Path, per_class: int = 8) -> Path | None:
    """A PNG grid with `per_class` samples of every class from each image split (None for non-image data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [name for name in ("train", "test") if bundle.get(name) is not None]
    if not splits or bundle[splits[0]].x.dim() != 4:
        return None
    fig, axes = plt.subplots(len(splits) * bundle.num_classes, per_class,
                             figsize=(per_class * 0.6, len(splits) * bundle.num_classes * 0.6))
    for s, name in enumerate(splits):
        split = bundle[name]
        for c in range(bundle.num_classes):
            # A seeded random sample: the first rows of a class can all share one colour (quota filling).
            rows = torch.nonzero(split.y == c).flatten()
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(c))[:per_class]]
            for j in range(per_class):
                ax = axes[s * bundle.num_classes + c, j]
                ax.axis("off")
                if j < len(rows):
                    ax.imshow(split.x[rows[j]].permute(1, 2, 0).numpy())
            axes[s * bundle.num_classes + c, 0].set_title(f"{name} y={c}", fontsize=5, loc="left")
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_data_summary(bundle: DatasetBundle, out_dir: str | Path) -> dict:
    """Write summary.json (and a sample grid for images) into `out_dir` and print a table."""
    out_dir = Path(out_dir)
    summary = summarize_bundle(bundle)
    write_json(out_dir / "summary.json", {**summary, "info": bundle.info})
    grid = save_sample_grid(bundle, out_dir / "samples.png")
    table = Table(title=f"{escape(bundle.name)} ({escape(bundle.info.get('source', '?'))})")
    for column in ("split", "size", "aligned", "bias counts"):
        table.add_column(column)
    for name, row in summary.items():
        fraction = row["aligned_fraction"]
        # Several bias attributes: the alignment-pattern group sizes instead of one attribute's value counts.
        counts = row["bias_counts"] if "bias_counts" in row else [f"{k}={v}" for k, v in row["groups"].items()]
        aligned = "-" if fraction is None else f"{fraction:.4f}"
        table.add_row(escape(name), str(row["size"]), aligned, escape(" ".join(map(str, counts))))
    console.print(table)
    console.print(escape(f"summary: {out_dir / 'summary.json'}" + (f"   samples: {grid}" if grid else "")))
    return summary
