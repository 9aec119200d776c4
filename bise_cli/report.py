"""Per-run Markdown report: data, model, bias before and after, efficiency, and settings that deviate from the
paper's protocol, with the run's plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bise_cli.names import METRIC_NAMES, format_value, heading
from bise_cli.records import write_text

log = logging.getLogger(__name__)

# Paper defaults that a run may change; the report lists every difference.
PAPER_DEFAULTS = {
    "biased_mnist": {
        "backbone.name": "simple_convnet", "backbone.width": 1.0, "dataset.max_samples": None,
        "dataset.clean_split": False, "train.epochs": 80, "train.lr": 0.1, "train.batch_size": 100,
        "pruning.gate_init": 0.0, "pruning.tau_factor": 0.5, "pruning.tau_period": 10, "pruning.tau_min": 0.001,
        "pruning.mask_lr": 0.01, "pruning.gamma": 1.0, "pruning.alpha": 1.0, "pruning.head_pretrain_epochs": 50,
        "pruning.head_refine_epochs": 50, "pruning.reweighting": "nominal_rho", "pruning.mi_subset": "conflicting",
        "pruning.selection": "best_val", "bias_labels": "ground_truth",
    },
    "civilcomments": {
        "backbone.pretrained": "bert-base-uncased", "dataset.max_length": 220, "dataset.max_samples": None,
        "train.epochs": 10, "train.lr": 1e-5, "train.batch_size": 16, "pruning.gate_init": 0.0,
        "pruning.tau_period": 10, "pruning.tau_min": 0.001, "pruning.gamma": 1.0, "pruning.batch_size": 16,
        "pruning.reweighting": "group_inverse_freq", "pruning.head_pretrain_epochs": 50,
        "pruning.head_refine_epochs": 50, "bias_labels": "ground_truth",
    },
}
def _lookup(cfg: dict, dotted: str):
    value = cfg
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def deviations(cfg: dict) -> list[tuple[str, object, object]]:
    """(key, this run's value, paper value) for every protocol setting that differs from the paper."""
    defaults = PAPER_DEFAULTS.get(cfg["dataset"]["name"], {})
    return [(key, _lookup(cfg, key), paper) for key, paper in defaults.items() if _lookup(cfg, key) != paper]


def report_metrics(records: list[dict]) -> list[str]:
    """Every metric declared in bise_cli.names that a record carries, in declared order; `acc_avg_group` only where
    it differs from `acc_unbiased` (it is the same number unless another group definition is chosen)."""
    present = [m for m in METRIC_NAMES if any(r.get(m) is not None for r in records)]
    if all(r.get("acc_avg_group") == r.get("acc_unbiased") for r in records):
        present = [m for m in present if m != "acc_avg_group"]
    return present


def write_report(run_dir: str | Path, cfg: dict, records: list[dict], note: str = "") -> Path:
    """Write `report.md` (and its plots) into `run_dir`; returns the report path."""
    run_dir = Path(run_dir)
    lines = [f"# bise run: {cfg['dataset']['name']} / {cfg['backbone']['name']}, rho = {cfg['rho']}, "
             f"seed = {cfg['seed']}", ""]
    if note:
        lines += [f"**{note}**", ""]
    summary_path = run_dir / "data_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        lines += ["## Data", "", f"Source: {summary['info'].get('source')}"
                  + (" (SYNTHETIC)" if summary["info"].get("synthetic") else ""), "",
                  "| split | size | aligned fraction |", "|---|---|---|"]
        lines += [f"| {name} | {row['size']} | {row['aligned_fraction']} |" for name, row in summary["splits"].items()]
        lines.append("")
    present = report_metrics(records)
    lines += ["## Results (test split)", "", "| stage | " + " | ".join(heading(k) for k in present) + " |",
              "|---|" + "---|" * len(present)]
    for record in records:
        lines.append(f"| {record['stage']} | " + " | ".join(format_value(k, record.get(k)) for k in present) + " |")
    lines += ["", "Bias before and after: compare `aligned` vs `conflicting` and the bias-probe accuracy of the "
              "vanilla row with the pruned rows.", ""]
    changed = deviations(cfg)
    lines += ["## Settings that deviate from the paper", ""]
    lines += [f"- `{key}` = {value!r} (paper: {paper!r})" for key, value, paper in changed] or ["- none"]
    lines.append("")
    lines += _plots(run_dir)
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def _plots(run_dir: Path) -> list[str]:
    """Plot the search curves and kept units when the run has them; plotting problems never fail a run."""
    lines = []
    try:
        from bise_cli.plots import plot_kept_units, plot_search_curves

        history_path, kept_path = run_dir / "search_history.json", run_dir / "kept_units.json"
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
