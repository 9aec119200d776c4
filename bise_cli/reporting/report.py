"""Per-run Markdown report: data, model, bias before and after, efficiency, and settings that deviate from the
paper's protocol, with the run's plots. Values from the user's config and data (note, dataset source, settings)
are escaped with `bise_cli.core.escape.markdown`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bise_cli.core.defaults import packaged_defaults
from bise_cli.core.escape import markdown
from bise_cli.core.files import write_text
from bise_cli.core.names import METRIC_NAMES, format_value, heading
from bise_cli.run.records import flatten_config

log = logging.getLogger(__name__)

# Settings that say where or how a run ran, not what it computed: never deviations.
NOT_PROTOCOL = ("seed", "dataset.source", "dataset.fallback", "vanilla_checkpoint", "eval_batch_size", "latency",
                "deterministic")


def deviations(cfg: dict) -> list[tuple[str, object, object]]:
    """(key, this run's value, paper value) for every setting that differs from the packaged defaults of its
    dataset, backbone and pruning method (the YAML files in conf/ hold the paper's protocol)."""
    paper = flatten_config(packaged_defaults(cfg["dataset"]["name"], cfg["backbone"]["name"], cfg["pruning"]["name"]))
    run = flatten_config(cfg)
    return [(key, value, paper.get(key)) for key, value in run.items()
            if paper.get(key) != value and not key.startswith(NOT_PROTOCOL)]


def report_metrics(records: list[dict]) -> list[str]:
    """Every metric declared in bise_cli.core.names that a record carries, in declared order; `acc_avg_group` only where
    it differs from `acc_unbiased` (it is the same number unless another group definition is chosen)."""
    present = [m for m in METRIC_NAMES if any(r.get(m) is not None for r in records)]
    if all(r.get("acc_avg_group") == r.get("acc_unbiased") for r in records):
        present = [m for m in present if m != "acc_avg_group"]
    return present


def write_report(run_dir: str | Path, cfg: dict, records: list[dict], note: str = "") -> Path:
    """Write `report.md` (and its plots) into `run_dir`; returns the report path."""
    run_dir = Path(run_dir)
    lines = [f"# bise run: {markdown(cfg['dataset']['name'])} / {markdown(cfg['backbone']['name'])}, "
             f"rho = {markdown(cfg['rho'])}, seed = {markdown(cfg['seed'])}", ""]
    if note:
        lines += [f"**{markdown(note)}**", ""]
    summary_path = run_dir / "data_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        lines += ["## Data", "", f"Source: {markdown(summary['info'].get('source'))}"
                  + (" (SYNTHETIC)" if summary["info"].get("synthetic") else ""), "",
                  "| split | size | aligned fraction |", "|---|---|---|"]
        lines += [f"| {markdown(name)} | {markdown(row['size'])} | {markdown(row['aligned_fraction'])} |"
                  for name, row in summary["splits"].items()]
        lines.append("")
    present = report_metrics(records)
    lines += ["## Results (test split)", "", "| stage | " + " | ".join(heading(k) for k in present) + " |",
              "|---|" + "---|" * len(present)]
    for record in records:
        lines.append(f"| {markdown(record['stage'])} | "
                     + " | ".join(markdown(format_value(k, record.get(k))) for k in present) + " |")
    lines += ["", "Bias before and after: compare `aligned` vs `conflicting` and the bias-probe accuracy of the "
              "vanilla row with the pruned rows.", ""]
    lines += confidence_lines(records)
    changed = deviations(cfg)
    lines += ["## Settings that deviate from the paper", ""]
    lines += [f"- {markdown(key, code=True)} = {markdown(repr(value))} (paper: {markdown(repr(paper))})"
              for key, value, paper in changed] or ["- none"]
    lines.append("")
    lines += _plots(run_dir)
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def confidence_lines(records: list[dict]) -> list[str]:
    """The per-run bootstrap intervals of the accuracy metrics (`<metric>_ci`), when the run computed them."""
    names = [m for m in METRIC_NAMES if any(isinstance(r.get(f"{m}_ci"), list) for r in records)]
    if not names:
        return []
    lines = ["## 95 % bootstrap intervals (test set)", "", "| stage | " + " | ".join(heading(m) for m in names) + " |",
             "|---|" + "---|" * len(names)]
    for record in records:
        cells = []
        for name in names:
            interval = record.get(f"{name}_ci")
            cells.append(f"[{format_value(name, interval[0])}, {format_value(name, interval[1])}]"
                         if isinstance(interval, list) else format_value(name, None))
        lines.append(f"| {markdown(record['stage'])} | " + " | ".join(map(markdown, cells)) + " |")
    return [*lines, ""]


def _plots(run_dir: Path) -> list[str]:
    """Plot the search curves and kept units when the run has them; plotting problems never fail a run."""
    lines = []
    history_path, kept_path = run_dir / "search_history.json", run_dir / "kept_units.json"
    if not (history_path.is_file() or kept_path.is_file()):
        return []  # nothing to plot: matplotlib is not even imported (about 1 s)
    try:
        from bise_cli.reporting.plots import plot_kept_units, plot_search_curves

        if history_path.is_file():
            plot_search_curves(json.loads(history_path.read_text()), run_dir / "search_curves.png")
            lines.append("![mask search curves](search_curves.png)")
        if kept_path.is_file():
            kept = {k: tuple(v) for k, v in json.loads(kept_path.read_text()).items()}
            plot_kept_units(kept, run_dir / "kept_units.png")
            lines.append("![kept units per layer](kept_units.png)")
    except Exception as error:  # a plot is a convenience: log, do not lose the run
        log.warning("plots skipped: %s", error)
    return ["## Plots", "", *lines, ""] if lines else []
