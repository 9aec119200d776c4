"""`bise table`: grouping, mean ± sample std, exact Markdown / LaTeX / CSV output, reference column, errors."""

from __future__ import annotations

import json

import pytest

from bise_cli.errors import BiseError
from bise_cli.tables import format_table, group_keys, load_records, summarize, table_command


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


def test_reference_column_shows_paper_value(sweep):
    text = format_table(summarize(load_records(sweep)), "md", reference=True, context={"dataset": "biased_mnist"})
    lines = text.splitlines()
    assert lines[0].endswith("| paper acc_unbiased |")
    assert lines[4] == "| bise | 0.99 | 93.0 ± 4.2 | 25.0 ± 0.0 | 2 | 96.1 |"
    assert lines[2] == "| vanilla | 0.99 | 81.0 ± 1.4 | 0.0 ± 0.0 | 2 | 88.9 |"


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
