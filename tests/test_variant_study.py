"""benchmarks/variant_study.py: every protocol and search it declares is a valid configuration, and each
protocol's table compares against the paper's own mask selection for its dataset."""

import importlib.util
import json
from pathlib import Path

import pytest

from bise_cli.run import stages
from bise_cli.run.validate import validate_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variant_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("variant_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("protocol", ["paper", "quickstart", "smoke", "biased_mnist_reduced"])
def test_protocols_compose_and_validate_with_every_search(study, protocol):
    cfg = study.compose([*study.PROTOCOLS[protocol], *study.COMMON, "seed=0"])
    validate_config(cfg)
    for name, options in study.SEARCHES.items():
        settings = stages.pruning_settings({**cfg["pruning"], **study.SELECT, **options})
        for key, value in options.items():
            assert getattr(settings, key) == value, (name, key)
    assert protocol in study.PAPER_MASKS


def test_biased_mnist_reduced_is_the_issues_reduced_setting(study):
    cfg = study.compose([*study.PROTOCOLS["biased_mnist_reduced"], *study.COMMON, "seed=0"])
    assert cfg["dataset"]["name"] == "biased_mnist" and cfg["rho"] == 0.9
    assert cfg["dataset"]["max_samples"] == 10_000 and cfg["backbone"]["name"] == "simple_convnet"
    assert stages.pruning_settings({**cfg["pruning"]}).num_epochs == 10  # tau 1 -> 0.04, halving every 2 epochs


def test_table_reference_row_follows_the_datasets_selection(study, tmp_path):
    rows = []
    for protocol in ("quickstart", "biased_mnist_reduced"):
        for seed, (last, val) in enumerate([(0.50, 0.60), (0.52, 0.61)]):
            base = {"protocol": protocol, "seed": seed, "stage": "bise", "val_acc_unbiased": val}
            rows += [{**base, "method": "paper masks:last", "acc_unbiased": last},
                     {**base, "method": "paper masks:val", "acc_unbiased": val}]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study.table(tmp_path / "records", tmp_path / "out")
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    quick = lines.index("## quickstart")
    bm = lines.index("## biased_mnist_reduced")
    section = {name: lines[start:start + 6] for name, start in (("quickstart", quick), ("bm", bm))}
    # Multi-Color MNIST: the last masks are the reference, the val masks are +9.5 points above them.
    assert any("paper masks:last" in line and "(reference)" in line for line in section["quickstart"])
    assert any("paper masks:val" in line and "+9.5" in line for line in section["quickstart"])
    # BiasedMNIST: the best-validation masks are the reference, the last masks -9.5 below them.
    assert any("paper masks:val" in line and "(reference)" in line for line in section["bm"])
    assert any("paper masks:last" in line and "-9.5" in line for line in section["bm"])


def test_table_pairs_bise_with_vanilla_and_bise_ft_with_the_control_of_the_same_selection(study, tmp_path):
    rows = []
    for seed, shift in enumerate([0.0, 0.01, 0.03]):
        base = {"protocol": "paper", "seed": seed, "val_acc_unbiased": 0.5}
        rows += [{**base, "stage": "vanilla", "method": "vanilla", "acc_unbiased": 0.50 + shift},
                 {**base, "stage": "bise", "method": "paper masks:last", "acc_unbiased": 0.52 + 2 * shift},
                 {**base, "stage": "reweighted_ft", "method": "rwft adam_1e-3 ft:last", "acc_unbiased": 0.60},
                 {**base, "stage": "reweighted_ft", "method": "rwft adam_1e-3 ft:val", "acc_unbiased": 0.70},
                 {**base, "stage": "bise_ft", "method": "paper masks:last adam_1e-3 ft:val",
                  "acc_unbiased": 0.71 + shift}]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study.table(tmp_path / "records", tmp_path / "out")
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    paired = lines[next(i for i, line in enumerate(lines) if line.startswith("Paired by seed")):]
    # BISE - vanilla = 2 + 100 * shift points per seed: mean 2 + 4/3 = +3.3; BISE+FT - control(ft:val) = +1 + shift
    assert any(line.startswith("| bise | paper masks:last | vanilla | 3 | +3.3 [") for line in paired)
    assert any(line.startswith("| bise_ft | paper masks:last adam_1e-3 ft:val | rwft adam_1e-3 ft:val | 3 | +2.3 [")
               for line in paired)
