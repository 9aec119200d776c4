"""`bise table`: collect run records, group them, and print mean ± std tables (Markdown, LaTeX, CSV).

Records are the lines of every `metrics.jsonl` under a folder; unreadable lines (not UTF-8, truncated or invalid
JSON, not a record) are skipped, counted and reported, never fatal. Rows are grouped by `stage` plus the config
keys that vary across the records (the union of each record's `keys`, without `seed`), or by `--by`. Each cell is
the mean ± the sample standard deviation (ddof = 1) over the records of the group, i.e. over seeds; `n` counts
them. Units and precision come from `bise_cli.core.names` (accuracies, sparsities, leakage and disparities in %, MACs
and parameters in millions, latency in ms).

`--compare A B` pairs the records of stages A and B by seed within each group and reports, per metric, the mean
difference A − B, its 95 % confidence interval (t distribution) and the paired t-test p-value.
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

from bise_cli.core import escape
from bise_cli.core.errors import BiseError
from bise_cli.core.names import MISSING, format_value, heading, is_missing
from bise_cli.core.names import metric as declared_metric
from bise_cli.reporting.paired import format_p, paired_difference
from bise_cli.reporting.paper_reference import PAPER_METRIC_MEANING, Reference, reference, reference_metrics
from bise_cli.run.registry import stage_rank

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("acc", "acc_unbiased", "acc_conflicting", "acc_aligned", "acc_worst_group", "sparsity_units",
                   "sparsity_weights", "macs", "leakage")
NOT_GROUP_KEYS = ("seed", "run_dir")
FORMATS = ("md", "tex", "csv")
SPREAD_NOTE = "mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs"
COMPARE_NOTE = ("A - B over the seeds present in both stages: mean difference, 95 % confidence interval from the t "
                "distribution (n - 1 degrees of freedom), two-sided paired t-test p-value; n = number of pairs")
CONTEXT_KEYS = ("dataset", "rho", "ablation", "reweighting", "pruning.reweighting", "pruning.gamma")
MAX_LISTED = 5


# ------------------------------------------------------------------------------------------------- loading
def load_records(root: str | Path) -> pd.DataFrame:
    """Every record of every metrics.jsonl under `root`, one row each. Unreadable lines are skipped and counted
    (`df.attrs["skipped"]`) with a warning naming them."""
    root = Path(root)
    if not root.exists():
        raise BiseError(f"no such folder: {root}")
    rows, skipped = [], []
    for path in sorted(root.rglob("metrics.jsonl")):
        try:
            lines = path.read_bytes().splitlines()
        except OSError as error:
            skipped.append(f"{path} (unreadable file: {error.strerror or error})")
            continue
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(f"{path}:{number} (not UTF-8)")
                continue
            except json.JSONDecodeError:
                skipped.append(f"{path}:{number} (truncated or invalid JSON)")
                continue
            if not isinstance(record, dict) or "stage" not in record:
                skipped.append(f"{path}:{number} (not a record: no stage)")
                continue
            record.setdefault("run_dir", str(path.parent))  # which run (a tuning study's trials are runs)
            rows.append(record)
    if skipped:
        listed = ", ".join(skipped[:MAX_LISTED]) + (f", and {len(skipped) - MAX_LISTED} more"
                                                     if len(skipped) > MAX_LISTED else "")
        log.warning("skipped %d unreadable record line(s) under %s: %s", len(skipped), root, listed)
    if not rows:
        raise BiseError(f"no records (metrics.jsonl) under {root}"
                        + (f" ({len(skipped)} unreadable line(s) skipped)" if skipped else ""))
    df = pd.DataFrame(rows)
    df.attrs["skipped"] = len(skipped)
    return df


# ---------------------------------------------------------------------------------------------- grouping
def group_keys(df: pd.DataFrame) -> list[str]:
    """`stage` plus the config keys whose values differ across records (seed excluded)."""
    keys: list[str] = []
    for row_keys in df.get("keys", pd.Series(dtype=object)).dropna():
        if isinstance(row_keys, list):
            keys += [k for k in row_keys if k not in keys]
    varying = [k for k in keys if k in df and k not in NOT_GROUP_KEYS and df[k].astype(str).nunique() > 1]
    return ["stage", *varying]


def _printable(value):
    """Group on printable values: lists become strings, None and NaN become "–"."""
    if is_missing(value):
        return MISSING
    return str(value) if isinstance(value, (list, dict)) else value


def _check_metrics(df: pd.DataFrame, metrics: list[str] | None) -> list[str]:
    if metrics:
        unknown = [m for m in metrics if m not in df]
        if unknown:
            raise BiseError(f"unknown metric(s) {', '.join(unknown)}; records have: "
                            f"{', '.join(sorted(c for c in df if pd.api.types.is_numeric_dtype(df[c])))}")
        return list(metrics)
    return [m for m in DEFAULT_METRICS if m in df and pd.to_numeric(df[m], errors="coerce").notna().any()]


def _prepared(df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    missing = [k for k in by if k not in df]
    if missing:
        raise BiseError(f"unknown grouping key(s) {', '.join(missing)}; records have: {', '.join(sorted(df))}")
    data = df.copy()
    for key in by:
        data[key] = data[key].map(_printable)
    for m in metrics:  # lists or strings in a metric column count as missing, never as an error
        data[m] = pd.to_numeric(data[m], errors="coerce")
    return data


def data_split(df: pd.DataFrame, by: list[str]) -> str | None:
    """Why `by` must also split by `data_sha256`, or None: some group holds two records of the same stage and seed
    computed on different data (a run re-done after its data changed, or two copies of a dataset), which are not
    two seeds and must not be averaged as such."""
    if not {"seed", "data_sha256"} <= set(df) or "data_sha256" in by:
        return None
    keys = [*dict.fromkeys([*by, "stage", "seed"])]
    data = _prepared(df, keys, [])
    counts = data.groupby(keys, sort=False, dropna=False)["data_sha256"].nunique()
    if not (counts > 1).any():
        return None
    where = dict(zip(keys, counts.index[counts > 1][0], strict=True))
    return (f"{int((counts > 1).sum())} group(s) hold records of the same seed on different data (e.g. stage "
            f"{where['stage']}, seed {where['seed']}): split by data_sha256 rather than averaged as seeds")


def summarize(df: pd.DataFrame, by: list[str] | None = None, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per group with `<metric>_mean`, `<metric>_std` and `n`, in stage order then key order. Records of
    the same seed on different data are never averaged: the groups are then split by `data_sha256` (its first
    12 hex digits), and `attrs["notes"]` says why."""
    by = list(by) if by else group_keys(df)
    metrics = _check_metrics(df, metrics)
    split = data_split(df, by)
    if split:
        log.warning(split)
        by.append("data_sha256")
    data = _prepared(df, by, metrics)
    if split:
        data["data_sha256"] = data["data_sha256"].map(lambda v: v if v == MISSING else str(v)[:12])
    grouped = data.groupby(by, sort=False, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["n"] = grouped.size()
    out = out.reset_index()
    order = sorted(range(len(out)), key=lambda i: (stage_rank(str(out.loc[i, "stage"])) if "stage" in by else (0, ""),
                                                  *[str(out.loc[i, k]) for k in by if k != "stage"]))
    out = out.loc[order].reset_index(drop=True)
    out.attrs["by"], out.attrs["metrics"], out.attrs["notes"] = by, metrics, [split] if split else []
    return out


# --------------------------------------------------------------------------------------------- rendering
def _cell(row: pd.Series, metric: str, plus_minus: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if is_missing(mean):
        return MISSING
    if is_missing(std):
        return format_value(metric, mean)
    return f"{format_value(metric, mean)}{plus_minus}{format_value(metric, std)}"


def _ablation_name(keys: dict) -> str | None:
    """The paper's ablation row for a (reweighting, gamma) pair, when the records set them."""
    reweighting = keys.get("reweighting", keys.get("pruning.reweighting"))  # top-level key or its older home
    if reweighting is None and "pruning.gamma" not in keys:
        return keys.get("ablation")
    ce = reweighting != "none"
    mi = float(keys.get("pruning.gamma", 1.0)) > 0
    return {(True, True): "ce+mi", (True, False): "ce", (False, True): "mi", (False, False): "none"}[(ce, mi)]


def _stored(ref: Reference) -> float:
    """A reference (published in displayed units, e.g. %) in the records' stored units (e.g. a fraction)."""
    return ref.value / declared_metric(ref.metric).scale


def _references(summary: pd.DataFrame, context: dict | None) -> dict[str, list[Reference | None]]:
    """{metric: the reference of each row} for the metric columns that have at least one reference."""
    by, metrics = summary.attrs["by"], summary.attrs["metrics"]
    found = {}
    for metric in metrics:
        refs = []
        for _, row in summary.iterrows():
            varying = {k: row[k] for k in by}
            keys = {**(context or {}), **varying}
            # An ablation row only where the records vary the ablated settings: every record now carries the
            # whole config, so a constant reweighting/gamma is the main table, not an ablation.
            refs.append(reference(keys.get("dataset"), str(keys.get("stage")), keys.get("rho"), metric,
                                  _ablation_name(varying)) if "stage" in by else None)
        if any(refs):
            found[metric] = refs
    return found


def _reference_footer(summary: pd.DataFrame, found: dict, context: dict | None) -> list[str]:
    """Which metric, dataset, stages and source each reference column holds (or why there is none)."""
    lines = []
    for metric, refs in found.items():
        groups: dict[tuple, list[str]] = {}
        for ref in refs:
            if ref is not None:
                stages = groups.setdefault((ref.dataset, ref.source, ref.note), [])
                if ref.stage not in stages:
                    stages.append(ref.stage)
        for (dataset, source, note), stages in groups.items():
            meaning = PAPER_METRIC_MEANING.get((dataset, metric), metric)
            lines.append(f"paper {metric} ({dataset}: {', '.join(stages)}): {meaning}, i.e. `{metric}`; {source}"
                         + (f"; {note}" if note else ""))
    if not found:
        datasets = set(summary["dataset"]) if "dataset" in summary else {(context or {}).get("dataset")}
        offers = [f"{d}: {', '.join(reference_metrics(d))}" for d in sorted(map(str, datasets))
                  if reference_metrics(d)]
        lines.append("no paper reference for these rows and metrics"
                     + (f"; published references exist for {'; '.join(offers)} (choose them with --metrics)"
                        if offers else ""))
    return lines


def _rendered(summary: pd.DataFrame, plus_minus: str, reference: bool, context: dict | None, escaped=escape.one_line):
    """Headers, rows of cells and footer lines shared by the Markdown, LaTeX and terminal tables. Group keys and
    their values come from the records (record_keys, config values, the user's names): headers and key cells pass
    through `escaped`, the format's helper from `bise_cli.core.escape`."""
    by, metrics = summary.attrs["by"], summary.attrs["metrics"]
    found = _references(summary, context) if reference else {}
    headers = [escaped(k) for k in by]
    for metric in metrics:
        headers.append(escaped(heading(metric, metric)))
        if metric in found:
            headers.append(escaped(f"paper {metric}"))
    headers.append("n")
    rows = []
    for i, (_, row) in enumerate(summary.iterrows()):
        cells = [escaped(row[k]) for k in by]
        for metric in metrics:
            cells.append(_cell(row, metric, plus_minus))
            if metric in found:
                ref = found[metric][i]
                cells.append("" if ref is None else format_value(metric, _stored(ref)))
        cells.append(str(int(row["n"])))
        rows.append(cells)
    footer = [SPREAD_NOTE, *summary.attrs.get("notes", []),
              *(_reference_footer(summary, found, context) if reference else [])]
    return headers, rows, footer


def format_table(summary: pd.DataFrame, fmt: str, reference: bool = False, context: dict | None = None) -> str:
    """Render `summarize`'s output as Markdown (`md`), LaTeX (`tex`) or CSV (`csv`). With `reference`, a column
    of published values sits beside each metric column that has one, and the footer says what they are."""
    if fmt not in FORMATS:
        raise BiseError(f"unknown --format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "csv":
        table = summary.copy()
        if reference:
            for metric, refs in _references(summary, context).items():
                table.insert(table.columns.get_loc(f"{metric}_std") + 1, f"{metric}_paper",
                             [None if ref is None else _stored(ref) for ref in refs])
        return table.to_csv(index=False, float_format="%.6g")
    headers, rows, footer = _rendered(summary, " ± " if fmt == "md" else " $\\pm$ ", reference, context,
                                      escape.markdown if fmt == "md" else escape.latex)
    if fmt == "md":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines) + "\n\n" + "\n".join(footer) + "\n"
    by = summary.attrs["by"]
    lines = ["\\begin{tabular}{" + "l" * len(by) + "r" * (len(headers) - len(by)) + "}", "\\toprule",
             " & ".join(headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(cells) + " \\\\" for cells in rows]
    lines += ["\\bottomrule", "\\end{tabular}", *[f"% {escape.one_line(line)}" for line in footer]]
    return "\n".join(lines) + "\n"


def constant_context(df: pd.DataFrame) -> dict:
    """Keys with one value across all records (e.g. dataset, rho) used to look up paper values."""
    context = {}
    for key in CONTEXT_KEYS:
        if key in df and df[key].astype(str).nunique() == 1:
            context[key] = df[key].iloc[0]
    return context


def print_rich(summary: pd.DataFrame, title: str, reference: bool = False, context: dict | None = None) -> None:
    headers, rows, footer = _rendered(summary, " ± ", reference, context, escape.console)
    n_by = len(summary.attrs["by"])
    table = Table(title=escape.console(title), caption=escape.console("\n".join(footer)))
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < n_by else "right")
    for cells in rows:
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


# ------------------------------------------------------------------------------------------- significance
def _defined(data: pd.DataFrame, key: str) -> bool:
    return bool((data[key] != MISSING).any())


def compare_stages(df: pd.DataFrame, stage_a: str, stage_b: str, by: list[str] | None = None,
                   metrics: list[str] | None = None) -> pd.DataFrame:
    """Paired comparison of two stages: per group (the grouping keys without stage) and metric, the records of A
    and B are paired by seed (seeds present in both only) and the differences A - B summarised: `mean_a`,
    `mean_b`, `diff`, `ci_low`, `ci_high` (95 %, t distribution), `p_value` (paired t-test) and `n`. Keys that
    only one of the stages carries (e.g. BISE's `selection`) split that stage's records but never the pairing.
    Values stay in stored units; `attrs["notes"]` lists the unpaired seeds."""
    import numpy as np

    if stage_a == stage_b:
        raise BiseError(f"--compare needs two different stages, got {stage_a!r} twice")
    present = sorted(set(df["stage"].astype(str)), key=stage_rank)
    for stage in (stage_a, stage_b):
        if stage not in present:
            raise BiseError(f"no records of stage {stage!r}; stages here: {', '.join(present)}")
    if "seed" not in df:
        raise BiseError("records carry no seed; --compare pairs records by seed")
    sub = df[df["stage"].isin([stage_a, stage_b])]
    keys = [k for k in (by or group_keys(sub)) if k not in ("stage", "seed")]
    metrics = _check_metrics(sub, metrics)
    data = _prepared(sub, [*keys, "seed"], metrics)
    side = {stage: data[data["stage"] == stage] for stage in (stage_a, stage_b)}
    shared = [k for k in keys if _defined(side[stage_a], k) and _defined(side[stage_b], k)]
    own = {stage: [k for k in keys if k not in shared and _defined(side[stage], k)] for stage in side}

    def groups(stage):
        cols = shared + own[stage]
        if not cols:
            return [({}, side[stage])]
        return [(dict(zip(cols, values if isinstance(values, tuple) else (values,), strict=True)), frame)
                for values, frame in side[stage].groupby(cols, sort=False)]

    def by_seed(stage, label, frame) -> dict:
        counts = frame["seed"].value_counts()
        if (counts > 1).any():
            where = ", ".join(f"{k}={v}" for k, v in label.items()) or "all records"
            same = frame[frame["seed"] == counts.idxmax()]
            data = "data_sha256" in same and same["data_sha256"].astype(str).nunique() > 1
            raise BiseError(f"{int(counts.max())} records of stage {stage!r} with seed {counts.idxmax()} ({where})"
                            + ("; they were computed on different data: separate them with --by ... data_sha256"
                               if data else "; separate them with --by KEY ..."))
        return {seed: row for seed, (_, row) in zip(frame["seed"], frame.iterrows(), strict=True)}

    rows, notes = [], []
    for label_a, frame_a in groups(stage_a):
        for label_b, frame_b in groups(stage_b):
            if any(label_a[k] != label_b[k] for k in shared):
                continue
            label = {k: label_a.get(k, label_b.get(k, MISSING)) for k in keys}
            a, b = by_seed(stage_a, label, frame_a), by_seed(stage_b, label, frame_b)
            where = ", ".join(f"{k}={v}" for k, v in label.items())
            for stage, only in ((stage_a, sorted(set(a) - set(b))), (stage_b, sorted(set(b) - set(a)))):
                if only:
                    notes.append(f"unpaired, left out: {where + ': ' if where else ''}seed(s) "
                                 f"{', '.join(map(str, only))} only in {stage}")
            seeds = sorted(set(a) & set(b))
            for metric in metrics:
                pairs = [(a[s][metric], b[s][metric]) for s in seeds
                         if not is_missing(a[s][metric]) and not is_missing(b[s][metric])]
                xa = np.array([p[0] for p in pairs], dtype=float)
                xb = np.array([p[1] for p in pairs], dtype=float)
                n = len(pairs)
                mean, low, high, p_value, _ = paired_difference(xa, xb)
                rows.append({**label, "metric": metric, "mean_a": float(xa.mean()) if n else math.nan,
                             "mean_b": float(xb.mean()) if n else math.nan, "diff": mean, "ci_low": low,
                             "ci_high": high, "p_value": p_value, "n": n})
    out = pd.DataFrame(rows, columns=[*keys, "metric", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value",
                                      "n"])
    out.attrs.update(keys=keys, stage_a=stage_a, stage_b=stage_b, notes=notes)
    return out


def _p(value: float) -> str:
    return "n/a" if is_missing(value) else format_p(value)


def format_compare(result: pd.DataFrame, fmt: str) -> str:
    """Render `compare_stages`' output as Markdown (`md`) or CSV (`csv`, stored units)."""
    keys, a, b = result.attrs["keys"], result.attrs["stage_a"], result.attrs["stage_b"]
    if fmt == "csv":
        table = result.rename(columns={"mean_a": f"mean_{a}", "mean_b": f"mean_{b}"})
        return table.to_csv(index=False, float_format="%.6g")
    if fmt != "md":
        raise BiseError(f"unknown comparison format {fmt!r}; allowed: md, csv")
    headers = [escape.markdown(h) for h in (*keys, "metric", a, b, f"{a} - {b}", "95 % CI", "p", "n")]
    lines = [f"# {escape.markdown(a)} vs {escape.markdown(b)}, paired by seed", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    notes = [COMPARE_NOTE]
    for _, row in result.iterrows():
        metric, n = row["metric"], int(row["n"])
        if n >= 2:
            ci = f"[{format_value(metric, row['ci_low'])}, {format_value(metric, row['ci_high'])}]"
        else:
            ci = "n/a"
        cells = [*[escape.markdown(row[k]) for k in keys], escape.markdown(heading(metric, metric)),
                 format_value(metric, row["mean_a"]),
                 format_value(metric, row["mean_b"]), format_value(metric, row["diff"], sign=True), ci,
                 _p(row["p_value"]), str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    if (result["n"] < 2).any():
        notes.append("n/a with n < 2: fewer than two paired seeds, so no confidence interval and no test")
    if ((result["n"] >= 2) & result["p_value"].isna()).any():
        notes.append("p n/a with n >= 2: every paired difference is the same, the t statistic is undefined")
    notes += result.attrs["notes"]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# ------------------------------------------------------------------------------------------------ command
def _write(path: Path, text: str) -> None:
    """Write a table file atomically; a file-system error is one line (a full disk, a folder made read-only)."""
    from bise_cli.core.files import write_text  # lazy: records imports torch, which `bise table` does not need

    try:
        write_text(path, text)
    except OSError as error:
        raise BiseError(f"cannot write {path}: {error.strerror or error}") from None


def _tuning_table(df: pd.DataFrame, out: Path) -> None:
    """Tuning studies among the records (experiment=tune/*): the best trial of each by validation, with its test
    metrics and the number of trials; printed and written to tuning.md / tuning.csv."""
    from bise_cli.run.tuning import BEST_TRIAL_METRICS, best_trials

    studies = best_trials(df)
    if studies is None:
        return
    columns = ["study", "objective", "trials", "best val (%)", *[heading(m) for m in BEST_TRIAL_METRICS],
               "best trial"]
    rows = []
    for _, row in studies.iterrows():
        found = not is_missing(row.get("best_val"))
        rows.append([str(row["study"]), str(row["objective"]), f"{row['completed']} of {row['trials']}",
                     format_value("acc", row.get("best_val")) if found else MISSING,
                     *[format_value(m, row.get(m)) if found else MISSING for m in BEST_TRIAL_METRICS],
                     str(row.get("best_trial")) if found else MISSING])
    table = Table(title="tuning: the best trial of each study by its validation objective; test metrics of that "
                        "trial (trials: completed of run)")
    for column in columns[:-1]:  # the trial folder names are long: listed below the table
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[escape.console(cell) for cell in row[:-1]])
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # as print_rich
    for row in rows:
        print(f"best trial of {row[0]}: {row[-1]}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
             *["| " + " | ".join(escape.markdown(cell) for cell in row) + " |" for row in rows]]
    _write(out / "tuning.md", "\n".join(lines) + "\n")
    _write(out / "tuning.csv", studies.to_csv(index=False))
    print(f"tuning studies written to {out}/tuning.{{md,csv}}")


def table_command(argv: list[str]) -> int:
    """`bise table DIR [--by K ...] [--metrics M ...] [--format md|tex|csv] [--reference] [--compare A B]
    [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="bise table", description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="folder searched recursively for metrics.jsonl")
    parser.add_argument("--by", nargs="+", help="grouping keys (default: stage + the config keys that vary)")
    parser.add_argument("--metrics", nargs="+", help=f"metrics (default: {', '.join(DEFAULT_METRICS)})")
    parser.add_argument("--format", default="md", help=f"text printed after the table: {', '.join(FORMATS)} "
                        "(all three files are always written)")
    parser.add_argument("--reference", action="store_true",
                        help="add the published value beside each metric column that has one")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="paired comparison of stages A and B by seed: mean difference A - B, 95 %% CI, "
                        "paired t-test p; written to compare_A_vs_B.md/.csv")
    parser.add_argument("--out", help="where table.md/.tex/.csv are written (default: DIR)")
    args = parser.parse_args(argv)
    if args.format not in FORMATS:
        raise BiseError(f"unknown --format {args.format!r}; allowed: {', '.join(FORMATS)}")
    df = load_records(args.dir)
    out = Path(args.out or args.dir)
    from bise_cli.run.validate import check_writable
    check_writable(out)   # a read-only folder: one line before any work
    summary = summarize(df, args.by, args.metrics)
    comparison = compare_stages(df, *args.compare, by=args.by, metrics=args.metrics) if args.compare else None
    context = constant_context(df)
    skipped = df.attrs.get("skipped", 0)
    print_rich(summary, f"{args.dir}: {len(df)} records" + (f", {skipped} unreadable line(s) skipped"
                                                             if skipped else ""), args.reference, context)
    # Every format is written to a file; --format chooses what is echoed as text after the rich table.
    for fmt in FORMATS:
        text = format_table(summary, fmt, args.reference, context)
        _write(out / f"table.{fmt}", text)
        if fmt == args.format:
            print(text)
    print(f"tables written to {out}/table.{{md,tex,csv}}")
    if comparison is not None:
        stem = f"compare_{args.compare[0]}_vs_{args.compare[1]}"
        for fmt in ("md", "csv"):
            text = format_compare(comparison, fmt)
            _write(out / f"{stem}.{fmt}", text)
            if fmt == "md":
                print(text)
        print(f"comparison written to {out}/{stem}.{{md,csv}}")
    _tuning_table(df, out)
    try:  # sweep plots are a convenience: a plotting problem must not cost the tables
        from bise_cli.reporting.plots import plot_sweep

        print("plots: " + ", ".join(str(path) for path in plot_sweep(df, out)))
    except Exception as error:  # noqa: BLE001
        log.warning("sweep plots skipped: %s", error)
    return 0
