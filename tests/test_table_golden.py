# ruff: noqa: E501  (the expected tables are literal text, as wide as the tables themselves)
"""Golden end-to-end `bise table` (in the style of DomainBed's test_collect_results): a committed sweep of record
lines shaped exactly like the pipeline's, with illustrative numbers (tests/data/golden_sweep: BiasedMNIST, rho in {0.99, 0.997} x seed in {0, 1} x {vanilla, bise,
bise_ft}) and the exact Markdown, LaTeX and CSV text the command writes, the paired comparison included.

Hand check of the comparison (bise vs vanilla, `acc`, rho = 0.99): the seeds give bise 0.950, 0.970 and vanilla
0.880, 0.890, so the paired differences are 7.0 and 8.0 points: mean 7.5, sample sd 0.707, standard error 0.5;
t(0.975, 1 degree of freedom) = 12.706, so the 95 % CI is 7.5 +- 6.35 = [1.1, 13.9]; t = 7.5 / 0.5 = 15 and, with
one degree of freedom (a Cauchy distribution), p = 1 - (2 / pi) atan(15) = 0.042. At rho = 0.997 the differences
are 24.0 and 25.2: mean 24.6, standard error 0.6, CI 24.6 +- 7.62 = [17.0, 32.2], t = 41, p = 0.016. The
worst-group differences at rho = 0.997 are both 52.0 points: zero spread, so the CI collapses and p is n/a.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from bise_cli.core.errors import BiseError
from bise_cli.reporting.tables import table_command

GOLDEN = Path(__file__).parent / "data" / "golden_sweep"

EXPECTED_MD = """\
| stage | rho | acc (%) | acc_unbiased (%) | acc_conflicting (%) | acc_aligned (%) | acc_worst_group (%) | sparsity_units (%) | sparsity_weights (%) | macs (M) | leakage (%) | n |
|---|---|---|---|---|---|---|---|---|---|---|---|
| vanilla | 0.99 | 88.5 ± 0.7 | 88.5 ± 0.7 | 87.2 ± 0.8 | 99.8 ± 0.1 | 55.8 ± 6.5 | 0.0 ± 0.0 | 0.0 ± 0.0 | 415.4 ± 0.0 | 99.4 ± 0.1 | 2 |
| vanilla | 0.997 | 66.2 ± 0.3 | 66.2 ± 0.3 | 62.4 ± 0.3 | 100.0 ± 0.0 | 20.0 ± 2.8 | 0.0 ± 0.0 | 0.0 ± 0.0 | 415.4 ± 0.0 | 99.8 ± 0.1 | 2 |
| bise | 0.99 | 96.0 ± 1.4 | 96.0 ± 1.4 | 95.6 ± 1.5 | 99.2 ± 0.3 | 85.0 ± 4.2 | 33.0 ± 2.8 | 21.0 ± 1.4 | 328.3 ± 2.4 | 60.0 ± 2.8 | 2 |
| bise | 0.997 | 90.8 ± 1.1 | 90.8 ± 1.1 | 90.0 ± 1.3 | 98.3 ± 0.3 | 72.0 ± 2.8 | 44.0 ± 2.8 | 35.0 ± 1.4 | 269.6 ± 0.6 | 42.0 ± 2.8 | 2 |
| bise_ft | 0.99 | 98.1 ± 0.1 | 98.1 ± 0.1 | 98.0 ± 0.2 | 99.1 ± 0.1 | 94.0 ± 1.4 | 33.0 ± 2.8 | 21.0 ± 1.4 | 328.3 ± 2.4 | 56.0 ± 1.4 | 2 |
| bise_ft | 0.997 | 95.8 ± 0.4 | 95.8 ± 0.4 | 95.5 ± 0.4 | 98.2 ± 0.3 | 87.0 ± 1.4 | 44.0 ± 2.8 | 35.0 ± 1.4 | 269.6 ± 0.6 | 40.0 ± 1.4 | 2 |

mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs
"""

EXPECTED_TEX = r"""\begin{tabular}{llrrrrrrrrrr}
\toprule
stage & rho & acc (\%) & acc\_unbiased (\%) & acc\_conflicting (\%) & acc\_aligned (\%) & acc\_worst\_group (\%) & sparsity\_units (\%) & sparsity\_weights (\%) & macs (M) & leakage (\%) & n \\
\midrule
vanilla & 0.99 & 88.5 $\pm$ 0.7 & 88.5 $\pm$ 0.7 & 87.2 $\pm$ 0.8 & 99.8 $\pm$ 0.1 & 55.8 $\pm$ 6.5 & 0.0 $\pm$ 0.0 & 0.0 $\pm$ 0.0 & 415.4 $\pm$ 0.0 & 99.4 $\pm$ 0.1 & 2 \\
vanilla & 0.997 & 66.2 $\pm$ 0.3 & 66.2 $\pm$ 0.3 & 62.4 $\pm$ 0.3 & 100.0 $\pm$ 0.0 & 20.0 $\pm$ 2.8 & 0.0 $\pm$ 0.0 & 0.0 $\pm$ 0.0 & 415.4 $\pm$ 0.0 & 99.8 $\pm$ 0.1 & 2 \\
bise & 0.99 & 96.0 $\pm$ 1.4 & 96.0 $\pm$ 1.4 & 95.6 $\pm$ 1.5 & 99.2 $\pm$ 0.3 & 85.0 $\pm$ 4.2 & 33.0 $\pm$ 2.8 & 21.0 $\pm$ 1.4 & 328.3 $\pm$ 2.4 & 60.0 $\pm$ 2.8 & 2 \\
bise & 0.997 & 90.8 $\pm$ 1.1 & 90.8 $\pm$ 1.1 & 90.0 $\pm$ 1.3 & 98.3 $\pm$ 0.3 & 72.0 $\pm$ 2.8 & 44.0 $\pm$ 2.8 & 35.0 $\pm$ 1.4 & 269.6 $\pm$ 0.6 & 42.0 $\pm$ 2.8 & 2 \\
bise\_ft & 0.99 & 98.1 $\pm$ 0.1 & 98.1 $\pm$ 0.1 & 98.0 $\pm$ 0.2 & 99.1 $\pm$ 0.1 & 94.0 $\pm$ 1.4 & 33.0 $\pm$ 2.8 & 21.0 $\pm$ 1.4 & 328.3 $\pm$ 2.4 & 56.0 $\pm$ 1.4 & 2 \\
bise\_ft & 0.997 & 95.8 $\pm$ 0.4 & 95.8 $\pm$ 0.4 & 95.5 $\pm$ 0.4 & 98.2 $\pm$ 0.3 & 87.0 $\pm$ 1.4 & 44.0 $\pm$ 2.8 & 35.0 $\pm$ 1.4 & 269.6 $\pm$ 0.6 & 40.0 $\pm$ 1.4 & 2 \\
\bottomrule
\end{tabular}
% mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs
"""

EXPECTED_CSV = """\
stage,rho,acc_mean,acc_std,acc_unbiased_mean,acc_unbiased_std,acc_conflicting_mean,acc_conflicting_std,acc_aligned_mean,acc_aligned_std,acc_worst_group_mean,acc_worst_group_std,sparsity_units_mean,sparsity_units_std,sparsity_weights_mean,sparsity_weights_std,macs_mean,macs_std,leakage_mean,leakage_std,n
vanilla,0.99,0.885,0.00707107,0.885,0.00707107,0.872389,0.00777817,0.9985,0.000707107,0.558,0.0650538,0,0,0,0,4.1536e+08,0,0.994,0.00141421,2
vanilla,0.997,0.662,0.00282843,0.662,0.00282843,0.624444,0.0031427,1,0,0.2,0.0282843,0,0,0,0,4.1536e+08,0,0.9985,0.000707107,2
bise,0.99,0.96,0.0141421,0.96,0.0141421,0.956444,0.0153992,0.992,0.00282843,0.85,0.0424264,0.33,0.0282843,0.21,0.0141421,3.283e+08,2.40416e+06,0.6,0.0282843,2
bise,0.997,0.908,0.0113137,0.908,0.0113137,0.899667,0.0128851,0.983,0.00282843,0.72,0.0282843,0.44,0.0282843,0.35,0.0141421,2.696e+08,565685,0.42,0.0282843,2
bise_ft,0.99,0.981,0.00141421,0.981,0.00141421,0.979889,0.00172848,0.991,0.00141421,0.94,0.0141421,0.33,0.0282843,0.21,0.0141421,3.283e+08,2.40416e+06,0.56,0.0141421,2
bise_ft,0.997,0.958,0.00424264,0.958,0.00424264,0.955333,0.00439978,0.982,0.00282843,0.87,0.0141421,0.44,0.0282843,0.35,0.0141421,2.696e+08,565685,0.4,0.0141421,2
"""

# --metrics acc acc_unbiased macs --reference: the paper's BiasedMNIST numbers are `acc`, so they sit beside
# `acc` (never beside `acc_unbiased`); bise_ft has no published MACs.
EXPECTED_REFERENCE_MD = """\
| stage | rho | acc (%) | paper acc | acc_unbiased (%) | macs (M) | paper macs | n |
|---|---|---|---|---|---|---|---|
| vanilla | 0.99 | 88.5 ± 0.7 | 88.9 | 88.5 ± 0.7 | 415.4 ± 0.0 | 415.4 | 2 |
| vanilla | 0.997 | 66.2 ± 0.3 | 66.1 | 66.2 ± 0.3 | 415.4 ± 0.0 | 415.4 | 2 |
| bise | 0.99 | 96.0 ± 1.4 | 96.1 | 96.0 ± 1.4 | 328.3 ± 2.4 | 328.3 | 2 |
| bise | 0.997 | 90.8 ± 1.1 | 90.8 | 90.8 ± 1.1 | 269.6 ± 0.6 | 269.6 | 2 |
| bise_ft | 0.99 | 98.1 ± 0.1 | 98.1 | 98.1 ± 0.1 | 328.3 ± 2.4 |  | 2 |
| bise_ft | 0.997 | 95.8 ± 0.4 | 95.9 | 95.8 ± 0.4 | 269.6 ± 0.6 |  | 2 |

mean ± sample standard deviation (ddof = 1) over seeds; n = number of runs
paper acc (biased_mnist: vanilla, bise, bise_ft): top-1 accuracy on the ρ = 0.1 test set, i.e. `acc`; De Moura Matos et al., CVPR 2026
paper macs (biased_mnist: vanilla, bise): MFLOPs (multiply-accumulates), i.e. `macs`; De Moura Matos et al., CVPR 2026
"""

EXPECTED_REFERENCE_CSV = """\
stage,rho,acc_mean,acc_std,acc_paper,acc_unbiased_mean,acc_unbiased_std,macs_mean,macs_std,macs_paper,n
vanilla,0.99,0.885,0.00707107,0.889,0.885,0.00707107,4.1536e+08,0,4.154e+08,2
vanilla,0.997,0.662,0.00282843,0.661,0.662,0.00282843,4.1536e+08,0,4.154e+08,2
bise,0.99,0.96,0.0141421,0.961,0.96,0.0141421,3.283e+08,2.40416e+06,3.283e+08,2
bise,0.997,0.908,0.0113137,0.908,0.908,0.0113137,2.696e+08,565685,2.696e+08,2
bise_ft,0.99,0.981,0.00141421,0.981,0.981,0.00141421,3.283e+08,2.40416e+06,,2
bise_ft,0.997,0.958,0.00424264,0.959,0.958,0.00424264,2.696e+08,565685,,2
"""

EXPECTED_COMPARE_MD = """\
# bise vs vanilla, paired by seed

| rho | metric | bise | vanilla | bise - vanilla | 95 % CI | p | n |
|---|---|---|---|---|---|---|---|
| 0.99 | acc (%) | 96.0 | 88.5 | +7.5 | [1.1, 13.9] | 0.042 | 2 |
| 0.99 | acc_worst_group (%) | 85.0 | 55.8 | +29.2 | [8.9, 49.5] | 0.035 | 2 |
| 0.997 | acc (%) | 90.8 | 66.2 | +24.6 | [17.0, 32.2] | 0.016 | 2 |
| 0.997 | acc_worst_group (%) | 72.0 | 20.0 | +52.0 | [52.0, 52.0] | n/a | 2 |

A - B over the seeds present in both stages: mean difference, 95 % confidence interval from the t distribution (n - 1 degrees of freedom), two-sided paired t-test p-value; n = number of pairs
p n/a with n >= 2: every paired difference is the same, the t statistic is undefined
"""

EXPECTED_COMPARE_CSV = """\
rho,metric,mean_bise,mean_vanilla,diff,ci_low,ci_high,p_value,n
0.99,acc,0.96,0.885,0.075,0.011469,0.138531,0.0423786,2
0.99,acc_worst_group,0.85,0.558,0.292,0.0887007,0.495299,0.0348484,2
0.997,acc,0.908,0.662,0.246,0.169763,0.322237,0.0155242,2
0.997,acc_worst_group,0.72,0.2,0.52,0.52,0.52,,2
"""

# The same comparison with the vanilla record of rho = 0.99, seed 1 missing (a failed run).
EXPECTED_UNPAIRED_MD = """\
# bise vs vanilla, paired by seed

| rho | metric | bise | vanilla | bise - vanilla | 95 % CI | p | n |
|---|---|---|---|---|---|---|---|
| 0.99 | acc (%) | 95.0 | 88.0 | +7.0 | n/a | n/a | 1 |
| 0.997 | acc (%) | 90.8 | 66.2 | +24.6 | [17.0, 32.2] | 0.016 | 2 |

A - B over the seeds present in both stages: mean difference, 95 % confidence interval from the t distribution (n - 1 degrees of freedom), two-sided paired t-test p-value; n = number of pairs
n/a with n < 2: fewer than two paired seeds, so no confidence interval and no test
unpaired, left out: rho=0.99: seed(s) 1 only in bise
"""

EXPECTED_UNPAIRED_CSV = """\
rho,metric,mean_bise,mean_vanilla,diff,ci_low,ci_high,p_value,n
0.99,acc,0.95,0.88,0.07,,,,1
0.997,acc,0.908,0.662,0.246,0.169763,0.322237,0.0155242,2
"""


def _copy(tmp_path) -> Path:
    return Path(shutil.copytree(GOLDEN, tmp_path / "sweep"))


def test_golden_tables(tmp_path, capsys):
    assert table_command([str(GOLDEN), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() == EXPECTED_MD
    assert (tmp_path / "table.tex").read_text() == EXPECTED_TEX
    assert (tmp_path / "table.csv").read_text() == EXPECTED_CSV
    assert EXPECTED_MD in capsys.readouterr().out  # --format md echoes the Markdown
    assert not list(GOLDEN.rglob("table.*"))  # the committed fixture is never written to


def test_golden_reference_columns(tmp_path):
    assert table_command([str(GOLDEN), "--metrics", "acc", "acc_unbiased", "macs", "--reference",
                          "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() == EXPECTED_REFERENCE_MD
    assert (tmp_path / "table.csv").read_text() == EXPECTED_REFERENCE_CSV
    tex = (tmp_path / "table.tex").read_text()
    assert "acc (\\%) & paper acc & acc\\_unbiased (\\%) & macs (M) & paper macs & n" in tex
    assert "% paper acc (biased_mnist: vanilla, bise, bise_ft): top-1 accuracy on the ρ = 0.1 test set" in tex


def test_golden_reference_absent_metric_is_explained(tmp_path):
    table_command([str(GOLDEN), "--metrics", "acc_unbiased", "--reference", "--out", str(tmp_path)])
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == "| stage | rho | acc_unbiased (%) | n |"
    assert lines[-1] == ("no paper reference for these rows and metrics; published references exist for "
                         "biased_mnist: acc, macs, sparsity_weights (choose them with --metrics)")


def test_golden_compare(tmp_path, capsys):
    assert table_command([str(GOLDEN), "--metrics", "acc", "acc_worst_group", "--compare", "bise", "vanilla",
                          "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare_bise_vs_vanilla.md").read_text() == EXPECTED_COMPARE_MD
    assert (tmp_path / "compare_bise_vs_vanilla.csv").read_text() == EXPECTED_COMPARE_CSV
    assert (tmp_path / "table.md").is_file()  # the comparison comes beside the tables, not instead
    assert EXPECTED_COMPARE_MD in capsys.readouterr().out


def test_golden_compare_with_an_unpaired_seed(tmp_path):
    sweep = _copy(tmp_path)
    records = sweep / "rho=0.99,seed=1" / "metrics.jsonl"
    records.write_text("".join(line + "\n" for line in records.read_text().splitlines()
                               if not line.startswith('{"stage": "vanilla"')))
    table_command([str(sweep), "--metrics", "acc", "--compare", "bise", "vanilla", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "compare_bise_vs_vanilla.md").read_text() == EXPECTED_UNPAIRED_MD
    assert (tmp_path / "out" / "compare_bise_vs_vanilla.csv").read_text() == EXPECTED_UNPAIRED_CSV


def test_compare_errors_are_one_line(tmp_path):
    with pytest.raises(BiseError, match="no records of stage 'ffw'; stages here: vanilla, bise, bise_ft"):
        table_command([str(GOLDEN), "--compare", "ffw", "vanilla", "--out", str(tmp_path)])
    with pytest.raises(BiseError, match="two different stages"):
        table_command([str(GOLDEN), "--compare", "bise", "bise", "--out", str(tmp_path)])
    with pytest.raises(BiseError, match="records of stage 'bise' with seed 0"):  # rho folded: seeds repeat
        table_command([str(GOLDEN), "--by", "stage", "--compare", "bise", "vanilla", "--out", str(tmp_path)])


def test_binary_and_truncated_lines_are_skipped_and_counted(tmp_path, caplog, capsys):
    sweep = _copy(tmp_path)
    with open(sweep / "rho=0.99,seed=0" / "metrics.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe\x00\x89PNG binary garbage\n")
        handle.write(b'{"stage": "bise", "keys": ["dataset", "rho"], "acc": 0.9')  # truncated: no newline either
    (sweep / "broken").mkdir()
    (sweep / "broken" / "metrics.jsonl").write_bytes(b"\x00\x01\x02\n[1, 2]\n")  # binary + not a record
    with caplog.at_level(logging.WARNING, logger="bise_cli.reporting.tables"):
        assert table_command([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "table.md").read_text() == EXPECTED_MD  # the 12 good records, nothing else
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 unreadable record line(s)" in warning
    assert "rho=0.99,seed=0/metrics.jsonl:4 (not UTF-8)" in warning
    assert "rho=0.99,seed=0/metrics.jsonl:5 (truncated or invalid JSON)" in warning
    assert "broken/metrics.jsonl:2 (not a record: no stage)" in warning
    assert "12 records, 4 unreadable line(s) skipped" in capsys.readouterr().out


def test_only_unreadable_lines_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"\xff\xff\n")
    with pytest.raises(BiseError, match=r"no records \(metrics.jsonl\) under .* \(1 unreadable line\(s\) skipped\)"):
        table_command([str(tmp_path)])


def test_through_the_cli_entry_point(tmp_path):
    from bise_cli.cli import main

    with pytest.raises(SystemExit) as done:
        main(["table", str(GOLDEN), "--out", str(tmp_path)])
    assert done.value.code == 0
    assert (tmp_path / "table.md").read_text() == EXPECTED_MD
    assert (tmp_path / "table.csv").read_text() == EXPECTED_CSV
