"""`report.md`, a run's one human-readable account: the model card's Markdown exactly as card.py renders it
(the same text as MODEL_CARD.md: data, results of every stage, bootstrap intervals, deviations from the paper's
protocol, limitations), followed by what only a run folder has, the plots of the mask search. This module renders
no table of results itself, so the report and the card cannot disagree; card.write_card calls it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bise_cli.core.files import write_text

log = logging.getLogger(__name__)


def write_report(run_dir: str | Path, card_markdown: str) -> Path:
    """Write `report.md` (and its plots) into `run_dir`: `card_markdown` (card.render_markdown's text), then the
    search plots when the run has them; returns the report path."""
    run_dir = Path(run_dir)
    plots = _plot_lines(run_dir)
    return write_text(run_dir / "report.md", card_markdown + ("\n" + "\n".join(plots) if plots else ""))


def _plot_lines(run_dir: Path) -> list[str]:
    """Plot the search curves and kept units when the run has them, and the Markdown that shows them (ends with
    an empty line); plotting problems never fail a run."""
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
    return ["## Plots of the mask search", "", *lines, ""] if lines else []
