"""`bise table`: collect run records, group them, and print mean ± std tables (Markdown, LaTeX, CSV).

Records are the lines of every `metrics.jsonl` under a folder. Rows are grouped by `stage` plus the config keys
that vary across the records (the union of each record's `keys`, without `seed`), or by `--by`. Each cell is
the mean ± the sample standard deviation (ddof = 1) over the records of the group, i.e. over seeds; `n` counts
them. Accuracies, sparsities, leakage and disparities print as percentages, MACs and parameters in millions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from bise_cli.errors import BiseError
from bise_cli.paper_reference import reference_value

log = logging.getLogger(__name__)

STAGE_ORDER = ("vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "ffw")
DEFAULT_METRICS = ("acc_unbiased", "acc_conflicting", "acc_aligned", "acc_worst_group", "sparsity_units",
                   "sparsity_weights", "macs", "leakage")
NOT_GROUP_KEYS = ("seed", "run_dir")
FORMATS = ("md", "tex", "csv")
SPREAD_NOTE = "mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs"


def load_records(root: str | Path) -> pd.DataFrame:
    """Every record of every metrics.jsonl under `root`, one row each (corrupt lines are skipped and counted)."""
    root = Path(root)
    if not root.exists():
        raise BiseError(f"no such folder: {root}")
    rows, corrupt = [], 0
    for path in sorted(root.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                corrupt += 1
    if corrupt:
        log.warning("skipped %d corrupt record line(s) under %s", corrupt, root)
    if not rows:
        raise BiseError(f"no records (metrics.jsonl) under {root}")
    return pd.DataFrame(rows)


def group_keys(df: pd.DataFrame) -> list[str]:
    """`stage` plus the config keys whose values differ across records (seed excluded)."""
    keys: list[str] = []
    for row_keys in df.get("keys", pd.Series(dtype=object)).dropna():
        keys += [k for k in row_keys if k not in keys]
    varying = [k for k in keys if k in df and k not in NOT_GROUP_KEYS and df[k].astype(str).nunique() > 1]
    return ["stage", *varying]


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage), "") if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def summarize(df: pd.DataFrame, by: list[str] | None = None, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per group with `<metric>_mean`, `<metric>_std` and `n`, in stage order then key order."""
    by = list(by) if by else group_keys(df)
    missing = [k for k in by if k not in df]
    if missing:
        raise BiseError(f"unknown grouping key(s) {', '.join(missing)}; records have: {', '.join(sorted(df))}")
    if metrics:
        unknown = [m for m in metrics if m not in df]
        if unknown:
            raise BiseError(f"unknown metric(s) {', '.join(unknown)}; records have: "
                            f"{', '.join(sorted(c for c in df if pd.api.types.is_numeric_dtype(df[c])))}")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in df and df[m].notna().any()]
    data = df.copy()
    for key in by:  # group on printable values (lists, None) and keep a stable order
        data[key] = data[key].map(lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    grouped = data.groupby(by, sort=False, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["n"] = grouped.size()
    out = out.reset_index()
    order = sorted(range(len(out)), key=lambda i: (_stage_rank(str(out.loc[i, "stage"])) if "stage" in by else (0, ""),
                                                  *[str(out.loc[i, k]) for k in by if k != "stage"]))
    out = out.loc[order].reset_index(drop=True)
    out.attrs["by"], out.attrs["metrics"] = by, metrics
    return out


def _scale(metric: str) -> tuple[float, str]:
    if metric in ("macs", "macs_dense", "params", "params_dense"):
        return 1e-6, " (M)"
    if metric.startswith("latency") or metric.endswith("seconds") or metric.endswith("epoch"):
        return 1.0, ""
    return 100.0, " (%)"


def _number(value: float, scale: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * scale:.1f}"


def _cell(row: pd.Series, metric: str, plus_minus: str) -> str:
    scale, _ = _scale(metric)
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return _number(mean, scale)
    return f"{_number(mean, scale)}{plus_minus}{_number(std, scale)}"


def _ablation_name(keys: dict) -> str | None:
    """The paper's ablation row for a (reweighting, gamma) pair, when the records vary them."""
    if "pruning.reweighting" not in keys and "pruning.gamma" not in keys:
        return keys.get("ablation")
    ce = keys.get("pruning.reweighting", "nominal_rho") != "none"
    mi = float(keys.get("pruning.gamma", 1.0)) > 0
    return {(True, True): "ce+mi", (True, False): "ce", (False, True): "mi", (False, False): "none"}[(ce, mi)]


def _reference(row: pd.Series, metric: str, keys: dict) -> str:
    value = reference_value(keys.get("dataset"), str(row.get("stage")), keys.get("rho"), metric,
                            _ablation_name(keys))
    return "" if value is None else f"{value:.1f}"


def format_table(summary: pd.DataFrame, fmt: str, reference: bool = False, context: dict | None = None) -> str:
    """Render `summarize`'s output as Markdown (`md`), LaTeX (`tex`) or CSV (`csv`)."""
    if fmt not in ("md", "tex", "csv"):
        raise BiseError(f"unknown --format {fmt!r}; allowed: {', '.join(FORMATS)}")
    by, metrics = summary.attrs["by"], summary.attrs["metrics"]
    if fmt == "csv":
        return summary.to_csv(index=False, float_format="%.6g")
    headers = [*by, *[f"{m}{_scale(m)[1]}" for m in metrics], "n"]
    rows = []
    for _, row in summary.iterrows():
        cells = [str(row[k]) for k in by]
        cells += [_cell(row, m, " ± " if fmt == "md" else " $\\pm$ ") for m in metrics]
        cells.append(str(int(row["n"])))
        if reference:
            keys = {**(context or {}), **{k: row[k] for k in by}}
            cells.append(_reference(row, metrics[0], keys))
        rows.append(cells)
    if reference:
        headers.append(f"paper {metrics[0]}")
    if fmt == "md":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines) + f"\n\n{SPREAD_NOTE}\n"
    escape = lambda text: text.replace("_", "\\_").replace("%", "\\%")  # noqa: E731
    lines = ["\\begin{tabular}{" + "l" * len(by) + "r" * (len(headers) - len(by)) + "}", "\\toprule",
             " & ".join(escape(h) for h in headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(escape(c) if "$" not in c else c for c in cells) + " \\\\" for cells in rows]
    lines += ["\\bottomrule", "\\end{tabular}", f"% {SPREAD_NOTE}"]
    return "\n".join(lines) + "\n"


def _constant_context(df: pd.DataFrame) -> dict:
    """Keys with one value across all records (e.g. dataset, rho) used to look up paper values."""
    context = {}
    for key in ("dataset", "rho", "ablation"):
        if key in df and df[key].astype(str).nunique() == 1:
            context[key] = df[key].iloc[0]
    return context


def print_rich(summary: pd.DataFrame, title: str) -> None:
    by, metrics = summary.attrs["by"], summary.attrs["metrics"]
    table = Table(title=title, caption=SPREAD_NOTE)
    for key in by:
        table.add_column(key)
    for metric in metrics:
        table.add_column(f"{metric}{_scale(metric)[1]}", justify="right")
    table.add_column("n", justify="right")
    for _, row in summary.iterrows():
        table.add_row(*[str(row[k]) for k in by], *[_cell(row, m, " ± ") for m in metrics], str(int(row["n"])))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def table_command(argv: list[str]) -> int:
    """`bise table DIR [--by K ...] [--metrics M ...] [--format md|tex|csv|all] [--reference] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="bise table", description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="folder searched recursively for metrics.jsonl")
    parser.add_argument("--by", nargs="+", help="grouping keys (default: stage + the config keys that vary)")
    parser.add_argument("--metrics", nargs="+", help=f"metrics (default: {', '.join(DEFAULT_METRICS)})")
    parser.add_argument("--format", default="md", help=f"text printed after the table: {', '.join(FORMATS)} "
                        "(all three files are always written)")
    parser.add_argument("--reference", action="store_true", help="add the paper's value of the first metric")
    parser.add_argument("--out", help="where table.md/.tex/.csv are written (default: DIR)")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise BiseError(f"unknown --format {args.format!r}; allowed: {', '.join(FORMATS)}")
    df = load_records(args.dir)
    summary = summarize(df, args.by, args.metrics)
    context = _constant_context(df)
    print_rich(summary, f"{args.dir}: {len(df)} records")
    out = Path(args.out or args.dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every format is written to a file; --format chooses what is echoed as text after the rich table.
    for fmt in ("md", "tex", "csv"):
        text = format_table(summary, fmt, args.reference, context)
        (out / f"table.{fmt}").write_text(text)
        if fmt == args.format:
            print(text)
    print(f"tables written to {out}/table.{{md,tex,csv}}")
    try:  # sweep plots are a convenience: a plotting problem must not cost the tables
        from bise_cli.plots import plot_sweep

        print("plots: " + ", ".join(str(path) for path in plot_sweep(args.dir, out)))
    except Exception as error:  # noqa: BLE001
        log.warning("sweep plots skipped: %s", error)
    return 0
