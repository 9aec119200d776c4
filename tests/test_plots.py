"""Plots: each function writes a non-empty PNG; the per-run report lists deviations from the paper."""

from __future__ import annotations

import json

import pandas as pd

from bise_cli.reporting.plots import plot_accuracy_vs_sparsity, plot_kept_units, plot_search_curves, plot_sweep
from bise_cli.reporting.report import deviations, report_metrics, write_report
from bise_cli.reporting.tables import load_records


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_plot_functions_write_pngs(tmp_path):
    history = [{"epoch": e, "tau": 1.0, "val_acc": 0.5 + e / 10, "test_acc": None, "mi": 0.1, "loss_ce": 1.0,
                "sparsity_units": 0.1 * e, "head_acc": 0.9} for e in (1, 2, 3)]
    assert _is_png(plot_search_curves(history, tmp_path / "curves.png"))
    assert _is_png(plot_kept_units({"block0": (3, 4), "block1": (5, 8)}, tmp_path / "kept.png"))
    df = pd.DataFrame([{"stage": s, "sparsity_units": sp, "acc_unbiased": a} for s, sp, a in
                       (("vanilla", 0.0, 0.5), ("bise", 0.3, 0.6), ("bise", 0.35, 0.62), ("random", 0.3, 0.4))])
    assert _is_png(plot_accuracy_vs_sparsity(df, tmp_path / "avs.png"))
    (tmp_path / "sweep" / "a").mkdir(parents=True)
    (tmp_path / "sweep" / "a" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({**row, "keys": []}) for row in df.to_dict("records")))
    paths = plot_sweep(load_records(tmp_path / "sweep"), tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy_vs_sparsity.png", "accuracy_by_stage.png"]
    assert all(_is_png(p) for p in paths)
    # Undeclared stages and a stage without the metric still plot (grey, skipped).
    odd = pd.DataFrame([{"stage": "my_method", "sparsity_units": 0.2, "acc_unbiased": 0.7},
                        {"stage": "lff", "sparsity_units": None, "acc_unbiased": None}])
    assert all(_is_png(p) for p in plot_sweep(odd, tmp_path / "odd"))


def test_report_lists_deviations_and_results(tmp_path):
    from conftest import compose_config

    cfg = compose_config(["backbone.width=0.25", "pruning.gate_init=1.0", "train.epochs=24",
                          "dataset.max_samples=10000", "pruning.gamma=1.0", "seed=3"])
    changed = {key for key, _, _ in deviations(cfg)}
    assert changed == {"backbone.width", "pruning.gate_init", "train.epochs", "dataset.max_samples"}
    assert not deviations(compose_config([]))  # the packaged defaults are the paper's protocol
    records = [{"stage": "vanilla", "acc_unbiased": 0.5, "macs": 2e6}, {"stage": "bise", "acc_unbiased": 0.6}]
    text = write_report(tmp_path, cfg, records, note="DEMO").read_text()
    assert "**DEMO**" in text and "`pruning.gate_init` = 1.0 (paper: 0.0)" in text
    assert "| stage | unbiased (%) | MACs (M) |" in text  # titles and units from bise_cli.core.names
    assert "| vanilla | 50.0 | 2.0 |" in text and "| bise | 60.0 | – |" in text


def test_report_metrics_follow_the_declared_order():
    same = [{"acc": 0.9, "acc_unbiased": 0.8, "acc_avg_group": 0.8, "acc_both_conflicting": 0.4, "leakage": 0.5}]
    assert report_metrics(same) == ["acc", "acc_unbiased", "acc_both_conflicting", "leakage"]
    wilds = [{**same[0], "acc_avg_group": 0.7}]  # another group definition: both are shown
    assert report_metrics(wilds) == ["acc", "acc_unbiased", "acc_avg_group", "acc_both_conflicting", "leakage"]


def test_report_shows_the_bootstrap_intervals(tmp_path):
    from conftest import compose_config

    records = [{"stage": "vanilla", "acc_unbiased": 0.5, "acc_unbiased_ci": [0.45, 0.55]},
               {"stage": "bise", "acc_unbiased": 0.6}]
    text = write_report(tmp_path, compose_config([]), records).read_text()
    assert "## 95 % bootstrap intervals (test set)" in text
    assert "| vanilla | [45.0, 55.0] |" in text and "| bise | – |" in text
