"""`bise table`: grouping, mean ± sample std, exact Markdown / LaTeX / CSV output, reference columns, paired
comparison, errors; and the names and formats declared once in bise_cli.core.names."""

from __future__ import annotations

import json

import pytest

from bise_cli.core.errors import BiseError
from bise_cli.core.names import METRIC_NAMES, METRICS, format_value, heading, metric
from bise_cli.reporting.paper_reference import REFERENCES, reference, reference_value
from bise_cli.reporting.tables import (
    compare_stages,
    constant_context,
    format_table,
    group_keys,
    load_records,
    summarize,
    table_command,
)
from bise_cli.run.registry import SPECS as STAGES
from bise_cli.run.registry import STAGE_NAMES, stage_rank


def _write(root, rows):
    for i, row in enumerate(rows):
        folder = root / f"run{i}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in row) + "\n")


def _record(stage, rho, seed, acc, sparsity):
    return {"stage": stage, "keys": ["dataset", "backbone", "rho", "seed"], "dataset": "biased_mnist",
            "backbone": "simple_convnet", "rho": rho, "seed": seed, "acc_unbiased": acc, "sparsity_units": sparsity,
            "group_acc": [[1.0]]}


@pytest.fixture
def sweep(tmp_path):
    runs = []
    for rho, accs in ((0.99, ((0.80, 0.90), (0.82, 0.96))), (0.997, ((0.60, 0.70), (0.64, 0.72)))):
        for seed in (0, 1):
            vanilla, bise = accs[seed]
            runs.append([_record("vanilla", rho, seed, vanilla, 0.0), _record("bise", rho, seed, bise, 0.25)])
    _write(tmp_path / "sweep", runs)
    return tmp_path / "sweep"


def test_grouping_uses_varying_keys_without_seed(sweep):
    df = load_records(sweep)
    assert len(df) == 8
    assert group_keys(df) == ["stage", "rho"]


EXPECTED_MD = """\
| stage | rho | acc_unbiased (%) | sparsity_units (%) | n |
|---|---|---|---|---|
| vanilla | 0.99 | 81.0 ± 1.4 | 0.0 ± 0.0 | 2 |
| vanilla | 0.997 | 62.0 ± 2.8 | 0.0 ± 0.0 | 2 |
| bise | 0.99 | 93.0 ± 4.2 | 25.0 ± 0.0 | 2 |
| bise | 0.997 | 71.0 ± 1.4 | 25.0 ± 0.0 | 2 |

mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs
"""

EXPECTED_TEX = r"""\begin{tabular}{llrrr}
\toprule
stage & rho & acc\_unbiased (\%) & sparsity\_units (\%) & n \\
\midrule
vanilla & 0.99 & 81.0 $\pm$ 1.4 & 0.0 $\pm$ 0.0 & 2 \\
vanilla & 0.997 & 62.0 $\pm$ 2.8 & 0.0 $\pm$ 0.0 & 2 \\
bise & 0.99 & 93.0 $\pm$ 4.2 & 25.0 $\pm$ 0.0 & 2 \\
bise & 0.997 & 71.0 $\pm$ 1.4 & 25.0 $\pm$ 0.0 & 2 \\
\bottomrule
\end{tabular}
% mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs
"""

EXPECTED_CSV = """\
stage,rho,acc_unbiased_mean,acc_unbiased_std,sparsity_units_mean,sparsity_units_std,n
vanilla,0.99,0.81,0.0141421,0,0,2
vanilla,0.997,0.62,0.0282843,0,0,2
bise,0.99,0.93,0.0424264,0.25,0,2
bise,0.997,0.71,0.0141421,0.25,0,2
"""


def test_exact_markdown_latex_csv(sweep):
    summary = summarize(load_records(sweep))
    assert format_table(summary, "md") == EXPECTED_MD
    assert format_table(summary, "tex") == EXPECTED_TEX
    assert format_table(summary, "csv") == EXPECTED_CSV


def test_reference_sits_beside_the_metric_it_is(tmp_path):
    # The paper's BiasedMNIST numbers are plain accuracy on the rho = 0.1 test set: beside `acc` only.
    _write(tmp_path, [[{**_record("bise", 0.99, 0, 0.93, 0.25), "acc": 0.95}]])
    summary = summarize(load_records(tmp_path), by=["stage", "rho"], metrics=["acc_unbiased", "acc"])
    lines = format_table(summary, "md", reference=True, context={"dataset": "biased_mnist"}).splitlines()
    assert lines[0] == "| stage | rho | acc_unbiased (%) | acc (%) | paper acc | n |"
    assert lines[2] == "| bise | 0.99 | 93.0 | 95.0 | 96.1 | 1 |"
    assert lines[-1].startswith("paper acc (biased_mnist: bise): top-1 accuracy on the ρ = 0.1 test set")


def test_reference_values_carry_their_metric():
    assert reference_value("biased_mnist", "vanilla", 0.99, "acc") == 88.9
    assert reference_value("biased_mnist", "vanilla", 0.99, "acc_unbiased") is None
    assert reference_value("biased_mnist", "bise", "0.997", "macs") == 269.6
    assert reference_value("biased_mnist", "bise", 0.99, "sparsity_weights", "mi") == 18.7
    mc = {stage: reference_value("multicolor_mnist", stage, 0.99, "acc_unbiased") for stage in STAGE_NAMES}
    assert {k: v for k, v in mc.items() if v is not None} == {"vanilla": 57.4, "bise": 60.3, "bise_ft": 70.6,
                                                              "ffw": 36.37}
    assert reference("multicolor_mnist", "vanilla", None, "acc_unbiased").source.startswith("Nahon et al.")
    celeba = reference("celeba", "bise", None, "acc_unbiased")
    assert celeba.value == 89.7 and "inferred" in celeba.note
    for ref in REFERENCES:  # every reference names a declared stage and metric
        assert ref.stage in STAGE_NAMES and ref.metric in METRIC_NAMES, ref


def test_reference_for_multicolor_mnist_is_acc_unbiased(tmp_path):
    records = [{"stage": stage, "keys": ["dataset", "seed"], "dataset": "multicolor_mnist", "seed": 0,
                "acc_unbiased": value, "acc": value} for stage, value in (("vanilla", 0.5), ("bise", 0.6))]
    _write(tmp_path, [records])
    df = load_records(tmp_path)
    text = format_table(summarize(df, metrics=["acc", "acc_unbiased"]), "md", reference=True,
                        context=constant_context(df))
    lines = text.splitlines()
    assert lines[0] == "| stage | acc (%) | acc_unbiased (%) | paper acc_unbiased | n |"
    assert lines[2:4] == ["| vanilla | 50.0 | 50.0 | 57.4 | 1 |", "| bise | 60.0 | 60.0 | 60.3 | 1 |"]
    assert lines[-2].startswith("paper acc_unbiased (multicolor_mnist: vanilla): mean of the four group")
    assert lines[-2].endswith("Nahon et al., ICCV 2023, Table 3")
    assert lines[-1].endswith("De Moura Matos et al., CVPR 2026")


def test_single_run_has_no_spread_and_explicit_by(tmp_path):
    _write(tmp_path, [[_record("bise", 0.99, 0, 0.5, 0.1)]])
    summary = summarize(load_records(tmp_path), by=["stage", "rho"], metrics=["acc_unbiased"])
    assert format_table(summary, "md").splitlines()[2] == "| bise | 0.99 | 50.0 | 1 |"


def test_corrupt_lines_are_skipped_and_errors_are_clear(tmp_path, sweep):
    with open(sweep / "run0" / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    assert len(load_records(sweep)) == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BiseError, match="no records"):
        load_records(empty)
    with pytest.raises(BiseError, match="no such folder"):
        load_records(tmp_path / "missing")
    with pytest.raises(BiseError, match="unknown metric"):
        summarize(load_records(sweep), metrics=["acc_magic"])
    with pytest.raises(BiseError, match="unknown --format 'html'"):
        table_command([str(sweep), "--format", "html"])


def test_table_command_writes_three_files(sweep, capsys):
    assert table_command([str(sweep), "--out", str(sweep / "tables")]) == 0
    assert (sweep / "tables" / "table.md").read_text() == EXPECTED_MD
    assert (sweep / "tables" / "table.csv").read_text() == EXPECTED_CSV
    assert (sweep / "tables" / "table.tex").is_file()
    assert "93.0 ± 4.2" in capsys.readouterr().out


def test_compare_keys_of_one_stage_split_it_but_never_the_pairing(tmp_path):
    # BISE records carry `selection` (two mask choices per run); vanilla records do not.
    runs = []
    for seed, (vanilla, by_acc, by_worst) in enumerate(((0.80, 0.90, 0.88), (0.82, 0.96, 0.92))):
        base = {"keys": ["dataset", "seed"], "dataset": "civilcomments", "seed": seed}
        runs.append([{**base, "stage": "vanilla", "acc": vanilla},
                     {**base, "keys": [*base["keys"], "selection"], "stage": "bise", "selection": "val_acc",
                      "acc": by_acc},
                     {**base, "keys": [*base["keys"], "selection"], "stage": "bise", "selection": "val_worst",
                      "acc": by_worst}])
    _write(tmp_path, runs)
    result = compare_stages(load_records(tmp_path), "bise", "vanilla", metrics=["acc"])
    assert list(result["selection"]) == ["val_acc", "val_worst"]
    assert list(result["n"]) == [2, 2]
    assert result["diff"].round(6).tolist() == [0.12, 0.09]


def test_names_are_declared_once_in_order():
    assert STAGE_NAMES[:7] == ("vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "ffw")
    assert {"dfr_train", "dfr_val", "lff"} <= set(STAGE_NAMES)
    assert len(set(STAGE_NAMES)) == len(STAGES) and len({s.colour for s in STAGES}) == len(STAGES)
    readme_metrics = ("acc", "acc_unbiased", "acc_avg_group", "acc_weighted_avg_group", "acc_aligned",
                      "acc_conflicting", "acc_worst_group",
                      "dp_diff", "eo_diff", "sparsity_units", "sparsity_weights", "params", "macs",
                      "latency_ms_b1", "latency_ms_b100", "leakage", "leakage_head", "acc_unbiased_cells",
                      "dfr_c", "dfr_subsamples")
    mc_groups = ("acc_both_aligned", "acc_left_aligned_right_conflicting", "acc_left_conflicting_right_aligned",
                 "acc_both_conflicting")
    assert set(readme_metrics + mc_groups) == set(METRIC_NAMES) and len(METRIC_NAMES) == len(METRICS)
    assert all(metric(m).unit == "%" and metric(m).higher_is_better for m in mc_groups)
    assert not metric("leakage").higher_is_better and not metric("macs").higher_is_better
    assert stage_rank("lff") < stage_rank("zzz_new") and stage_rank("vanilla") < stage_rank("bise")


def test_format_value_is_the_one_number_format():
    assert format_value("acc", 0.961) == "96.1" and format_value("acc_both_conflicting", 0.5) == "50.0"
    assert format_value("macs", 328.3e6) == "328.3" and format_value("params", 1_234_567) == "1.23"
    assert format_value("latency_ms_b1", 0.3654) == "0.37"
    assert format_value("val_acc", 0.5) == "50.0" and format_value("macs_dense", 415.36e6) == "415.4"
    assert format_value("best_epoch", 87) == "87" and format_value("train_seconds", 2841.37) == "2841"
    assert format_value("acc", None) == format_value("acc", float("nan")) == "–"
    assert format_value("acc", -1e-6) == "0.0" and format_value("acc", 0.075, sign=True) == "+7.5"
    assert format_value("selection", "val_acc") == "val_acc"
    assert heading("acc") == "accuracy (%)" and heading("macs", "macs") == "macs (M)"
    assert heading("best_epoch") == "best_epoch"


def test_names_module_is_the_bottom_of_the_import_graph():
    import ast
    import inspect

    import bise_cli.core.names
    import bise_cli.reporting.plots

    def imported(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    assert not {m for m in imported(bise_cli.core.names) if m.startswith("bise_cli")}
    assert "bise_cli.reporting.tables" not in imported(bise_cli.reporting.plots)  # no tables <-> plots cycle


def test_ablation_rows_find_their_reference(tmp_path):
    runs = [[{"stage": "bise", "keys": ["dataset", "rho", "seed", "reweighting", "pruning.gamma"],
              "dataset": "biased_mnist", "rho": 0.99, "seed": 0, "reweighting": rw, "pruning.gamma": gamma,
              "acc": 0.9}] for rw in ("nominal_rho", "none") for gamma in (0.0, 1.0)]
    _write(tmp_path, runs)
    df = load_records(tmp_path)
    lines = format_table(summarize(df, metrics=["acc"]), "md", reference=True,
                         context=constant_context(df)).splitlines()
    assert [line.rsplit("|", 3)[1].strip() for line in lines[2:6]] == ["96.0", "96.1", "91.9", "91.1"]


def test_constant_reweighting_and_gamma_in_full_config_records_are_the_main_table(tmp_path):
    """Records carry the whole config: a reweighting and gamma every record shares are not an ablation row."""
    records = [{"stage": stage, "keys": ["dataset", "seed", "reweighting", "pruning.gamma"],
                "dataset": "multicolor_mnist", "seed": 0, "reweighting": "auto", "pruning.gamma": 1.0,
                "acc_unbiased": value} for stage, value in (("vanilla", 0.5), ("bise_ft", 0.6))]
    _write(tmp_path, [records])
    df = load_records(tmp_path)
    lines = format_table(summarize(df, metrics=["acc_unbiased"]), "md", reference=True,
                         context=constant_context(df)).splitlines()
    assert lines[2:4] == ["| vanilla | 50.0 | 57.4 | 1 |", "| bise_ft | 60.0 | 70.6 | 1 |"]


def test_baseline_references_of_the_biased_mnist_table():
    assert [reference_value("biased_mnist", "lff", rho, "acc") for rho in (0.99, 0.995, 0.997)] == [95.1, 90.3, 63.7]
    assert reference_value("biased_mnist", "softcon", 0.997, "acc") == 88.6
    assert reference_value("biased_mnist", "bcon_bbal", 0.99, "acc") == 98.1
    assert reference_value("biased_mnist", "lff", 0.99, "acc_unbiased") is None  # top-1 accuracy, not unbiased
