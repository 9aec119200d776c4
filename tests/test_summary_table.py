"""The terminal table a newcomer sees at the end of `bise run`: the headline columns with their full names, every
stage by its full title, within a 120-column terminal or a pipe (issue 22, part 3)."""

from __future__ import annotations

import io

from rich.console import Console

from bise_cli.core.names import heading
from bise_cli.reporting import summary
from bise_cli.run.registry import spec as stage


def _records() -> list[dict]:
    base = {"acc": 0.612, "acc_unbiased": 0.583, "acc_worst_group": 0.1, "acc_conflicting": 0.55, "acc_aligned": 1.0,
            "acc_both_aligned": 0.99, "acc_left_aligned_right_conflicting": 0.6, "sparsity_units": 0.197,
            "sparsity_weights": 0.3, "macs": 214_000.0, "latency_ms_b1": 0.14, "leakage": 0.873,
            "leakage_head": 0.5, "data_source": "files: datasets/mnist", "dataset": "multicolor_mnist",
            "data_train_size": 60000}
    names = ("vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "dfr_train", "dfr_val", "lff")
    records = [{**base, "stage": name} for name in names]
    # A second selection of the same search (pruning.also_select_by): the longest label a run prints.
    records.insert(2, {**base, "stage": "bise", "selection": "acc_weighted_avg_group"})
    return records


def _render(width: int) -> str:
    buffer = io.StringIO()
    summary.print_run_summary(_records(), note="REDUCED-SCALE DEMO (Multi-Color MNIST, 30 vanilla epochs, 20 mask "
                              "epochs): not the paper's numbers", out_dir="outputs/runs/x",
                              out=Console(file=buffer, width=width))
    return buffer.getvalue()


def test_headline_table_fits_120_columns_with_full_names():
    text = _render(120)
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "…" not in text  # nothing truncated
    for name in summary.HEADLINE_METRICS:
        assert heading(name) in text  # "unbiased (%)", "worst group (%)", "MACs (M)", "bias probe (%)", ...
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    # BISE+FT is told apart from BISE, and every stage reads by its full title.
    assert "BISE+FT" in rows and "BISE" in rows
    for name in ("vanilla", "reweighted_ft", "random", "magnitude", "dfr_train", "dfr_val", "lff"):
        assert stage(name).title in rows
    assert "58.3" in text and "19.7" in text and "87.3" in text and "0.2" in text  # values as declared (%, M)
    # The other metrics are in the report, the card and `bise table`, not in this table.
    assert heading("acc_both_aligned") not in text and heading("latency_ms_b1") not in text
    assert "report.md" in text


def test_piped_output_gets_120_columns():
    assert summary.TABLE_WIDTH == 120
    # pytest captures stdout: the module's console is the one a pipe gets.
    assert summary.console.width == 120
