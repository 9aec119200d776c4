"""Plots: each function writes a non-empty PNG; the per-run report is the model card (deviations from the paper,
every stage, bootstrap intervals) followed by the search plots."""

from __future__ import annotations

import json

import pandas as pd

from bise_cli.reporting.card import write_run_card
from bise_cli.reporting.deviations import deviations
from bise_cli.reporting.plots import plot_accuracy_vs_sparsity, plot_kept_units, plot_search_curves, plot_sweep
from bise_cli.reporting.report import write_report
from bise_cli.reporting.tables import load_records
from bise_cli.run.registry import spec


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


def _documents(run_dir, cfg, records) -> tuple[str, str]:
    """(MODEL_CARD.md, report.md) as a run writes them from `records`."""
    write_run_card(run_dir, cfg, records)
    return (run_dir / "MODEL_CARD.md").read_text(), (run_dir / "report.md").read_text()


def test_report_lists_deviations_and_results(tmp_path):
    from conftest import compose_config

    cfg = compose_config(["backbone.width=0.25", "pruning.gate_init=1.0", "train.epochs=24",
                          "dataset.max_samples=10000", "pruning.gamma=1.0", "seed=3", "note=DEMO"])
    changed = {key for key, _, _ in deviations(cfg)}
    assert changed == {"backbone.width", "pruning.gate_init", "train.epochs", "dataset.max_samples"}
    assert not deviations(compose_config([]))  # the packaged defaults are the paper's protocol
    records = [{"stage": "vanilla", "acc_unbiased": 0.5, "macs": 2e6}, {"stage": "bise", "acc_unbiased": 0.6}]
    _, text = _documents(tmp_path, cfg, records)
    assert "**DEMO**" in text and "`pruning.gate_init` = 1.0 (default: 0.0)" in text
    # Titles and units from bise_cli.core.names, the stages by their declared titles.
    assert "| metric | Vanilla | BISE | BISE - vanilla |" in text
    assert "| unbiased (%) | 50.0 | 60.0 | +10.0 |" in text and "| MACs (M) | 2.0 | – |" in text


def test_other_stages_show_every_declared_metric_in_declared_order(tmp_path):
    from conftest import compose_config

    same = {"leakage": 0.5, "acc_both_conflicting": 0.4, "acc_unbiased": 0.8, "acc_avg_group": 0.8, "acc": 0.9}
    records = [{"stage": "vanilla", "acc": 0.7}, {"stage": "random", **same},
               {"stage": "bise", "acc": 0.8}, {"stage": "bise", "selection": "acc_worst_group", "acc": 0.75}]
    card, _ = _documents(tmp_path, compose_config([]), records)
    # acc_avg_group is acc_unbiased under another name unless the groups are redefined: shown only then.
    assert "| stage | accuracy (%) | unbiased (%) | both conflicting (%) | bias probe (%) |" in card
    assert f"| {spec('random').title} | 90.0 | 80.0 | 40.0 | 50.0 |" in card
    assert "| BISE, val worst group | 75.0 | – | – | – |" in card  # an alternative selection of the search
    wilds = [records[0], {"stage": "random", **same, "acc_avg_group": 0.7}]
    card, _ = _documents(tmp_path, compose_config([]), wilds)
    assert "| stage | accuracy (%) | unbiased (%) | avg group (%) | both conflicting (%) | bias probe (%) |" in card


def test_report_shows_the_bootstrap_intervals(tmp_path):
    from conftest import compose_config

    records = [{"stage": "vanilla", "acc_unbiased": 0.5, "acc_unbiased_ci": [0.45, 0.55]},
               {"stage": "bise", "acc_unbiased": 0.6}, {"stage": "lff", "acc": 0.4, "acc_ci": [0.3, 0.5]}]
    _, text = _documents(tmp_path, compose_config([]), records)
    assert "| unbiased (%) | 50.0 [45.0, 55.0] | 60.0 | +10.0 |" in text
    assert f"| {spec('lff').title} | 40.0 [30.0, 50.0] |" in text  # a baseline's intervals too


def test_report_is_the_card_and_the_plots_only(tmp_path):
    """report.md and MODEL_CARD.md cannot drift: the report is the card's text, byte for byte, followed by the search
    plots; report.py renders no results table of its own."""
    from conftest import compose_config

    records = [{"stage": "vanilla", "acc_unbiased": 0.5, "acc_unbiased_ci": [0.45, 0.55], "macs": 2e6},
               {"stage": "bise", "acc_unbiased": 0.6}, {"stage": "random", "acc_unbiased": 0.4}]
    cfg = compose_config(["pruning.gate_init=1.0", "note=DEMO"])
    card, report = _documents(tmp_path, cfg, records)
    assert report == card  # no search files: nothing but the card
    (tmp_path / "search_history.json").write_text(json.dumps([{"epoch": 1, "tau": 1.0, "val_acc": 0.5, "mi": 0.1,
                                                                "loss_ce": 1.0, "sparsity_units": 0.1}]))
    (tmp_path / "kept_units.json").write_text(json.dumps({"block0": [3, 4]}))
    card, report = _documents(tmp_path, cfg, records)
    assert report.startswith(card)
    extra = report[len(card):]
    assert extra == ("\n## Plots of the mask search\n\n![mask search curves](search_curves.png)\n"
                     "![kept units per layer](kept_units.png)\n")
    assert _is_png(tmp_path / "search_curves.png") and _is_png(tmp_path / "kept_units.png")
    # Whatever the card says is what the report says: report.py adds only the plots to the text it is given.
    assert write_report(tmp_path, "CARD TEXT\n").read_text() == "CARD TEXT\n" + extra
