"""Tuning through Hydra's Optuna sweeper (issue 22, part 2): `bise run -m hydra/sweeper=optuna
experiment=tune/<preset>` end to end at smoke size, the objective (validation only), failed trials, and the best
trial of each study in `bise table`."""

from __future__ import annotations

import csv
import math

import pytest
import yaml

from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.run.tuning import objective_value, parse_objective
from bise_cli.run.validate import validate_config

from conftest import compose_config, run_bise

# Smoke-size settings for the Multi-Color MNIST tuning preset; the keys fixed here leave the sweeper's space
# (a fixed override removes its key from the space), the rest (mask_lr, gamma, gate_init, finetune.lr) is searched.
TINY_TUNE = ["dataset.source=embedded", "dataset.max_samples=400", "dataset.val_holdout=100", "train.epochs=1",
             "pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.head_pretrain_epochs=1",
             "pruning.head_refine_epochs=1", "finetune.epochs=1", "leakage_probe.epochs=1", "latency.repeats=1",
             "latency.warmup=0", "bootstrap.n=0"]


def test_two_trial_optuna_sweep_end_to_end(tmp_path):
    result = run_bise("run", "-m", "hydra/sweeper=optuna", "experiment=tune/multicolor_mnist",
                      "hydra.sweeper.n_trials=2", *TINY_TUNE, "output_root=out", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "out" / "sweeps" / "tune_multicolor_mnist"
    trials = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(trials) == 2
    records = {trial: read_jsonl(trial / "metrics.jsonl") for trial in trials}
    assert all([r["stage"] for r in rs] == ["vanilla", "bise", "bise_ft"] for rs in records.values())
    # The sweeper varied the declared space (two different trials) ...
    assert len({(rs[1]["pruning.mask_lr"], rs[2]["finetune.lr"]) for rs in records.values()}) == 2
    # ... maximised the objective, the validation metric each run returned ...
    values = [next(r for r in rs if r["stage"] == "bise_ft")["val_acc_unbiased"] for rs in records.values()]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values), rel=1e-12)
    assert set(best["best_params"]) == {"pruning.mask_lr", "pruning.gamma", "pruning.gate_init", "finetune.lr"}
    # ... and the vanilla model was trained by one trial and read from the stage cache by the other.
    logs = [(trial / "run.log").read_text() for trial in trials]
    assert sorted("vanilla from cache" in log for log in logs) == [False, True]
    # `bise table` shows the study's best trial by validation, its test metrics and the number of trials.
    table = run_bise("table", str(sweep), cwd=tmp_path, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "2 of 2" in table.stdout and "bise_ft.val_acc_unbiased" in table.stdout
    [row] = list(csv.DictReader((sweep / "tuning.csv").open()))
    assert float(row["best_val"]) == pytest.approx(max(values), rel=1e-12) and row["trials"] == "2"
    winner = records[sweep / row["best_trial"]]
    assert float(row["acc_unbiased"]) == next(r for r in winner if r["stage"] == "bise_ft")["acc_unbiased"]


def test_a_failed_trial_is_reported_to_optuna_as_failed_not_as_a_number(tmp_path):
    # pruning.round_to in {1, 0}, seeded random sampler: the first trial draws 0 and fails (a one-line BiseError
    # in the run), the second draws 1 and completes; the sweep goes on and the study's best is the completed trial.
    # (Not the grid sampler: with optuna 2.10 a failed last grid trial stops the study with a traceback.)
    result = run_bise("run", "-m", "experiment=smoke", "stages=[vanilla]", "hydra/sweeper=optuna",
                      "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                      "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2",
                      "tune.objective=vanilla.val_acc_unbiased", "pruning.round_to=choice(1,0)",
                      "leakage_probe.epochs=1", "bootstrap.n=0", "latency.repeats=1", "output_root=out", "name=fail",
                      cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert output.count("Failed experiment") == 1 and "pruning.round_to must be an integer >= 1" in output
    sweep = tmp_path / "out" / "sweeps" / "fail"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    [done] = [p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()]
    assert best["best_params"] == {"pruning.round_to": 1}
    assert best["best_value"] == read_jsonl(done / "metrics.jsonl")[0]["val_acc_unbiased"]


class _Spy(dict):
    """A record that remembers which keys were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_the_objective_reads_one_validation_metric_and_no_test_metric():
    records = [_Spy(stage="vanilla", acc_unbiased=0.5, val_acc_unbiased=0.4),
               _Spy(stage="bise_ft", acc_unbiased=0.9, acc_worst_group=0.8, val_acc_unbiased=0.6,
                    val_acc_worst_group=0.3)]
    assert objective_value(records, "bise_ft.val_acc_worst_group") == 0.3
    assert records[1].read == {"stage", "val_acc_worst_group"} and records[0].read <= {"stage"}


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_a_missing_or_non_finite_objective_fails_the_trial(value):
    with pytest.raises(BiseError, match="reported as failed"):
        objective_value([{"stage": "bise", "val_acc": value}], "bise.val_acc")
    with pytest.raises(BiseError, match="no bise_ft record"):
        objective_value([{"stage": "bise", "val_acc": 0.5}], "bise_ft.val_acc")


@pytest.mark.parametrize("objective, message", [
    ("bise_ft.acc_unbiased", "validation metric"), ("bise_ft.test_acc", "validation metric"),
    ("val_acc", "<stage>.<validation metric>"), ("lff.val_acc", "not in stages"),
])
def test_only_a_validation_metric_of_a_run_stage_can_be_the_objective(objective, message):
    with pytest.raises(BiseError, match=message) as error:
        parse_objective(objective, ["vanilla", "bise", "bise_ft"])
    assert "\n" not in str(error.value)


def _with_hydra(overrides: list[str]) -> dict:
    """The composed config with its `hydra` node (the sweeper's settings), as `bise run -m` builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import bise_cli.cli as cli

    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides, return_hydra_config=True))


def test_tuning_presets_compose_and_are_checked_before_running():
    for preset in ("multicolor_mnist", "own_model", "table"):
        bise_cfg = _with_hydra([f"experiment=tune/{preset}"])
        control = _with_hydra([f"experiment=tune/{preset}_control"])
        # Same number of trials for BISE and its control; the control searches only its own (fine-tuning) settings.
        assert bise_cfg["tune"]["objective"].startswith("bise_ft.val_")
        assert control["tune"]["objective"].startswith("reweighted_ft.val_")
        assert control["stages"] == ["vanilla", "reweighted_ft"]
        assert {k.split(".")[0] for k in control["hydra"]["sweeper"]["params"]} == {"finetune"}
        assert bise_cfg["hydra"]["sweeper"]["n_trials"] == control["hydra"]["sweeper"]["n_trials"]
        assert bise_cfg["hydra"]["sweeper"]["direction"] == "maximize"
        assert bise_cfg["hydra"]["sweeper"]["_target_"].endswith("OptunaSweeper")
    cfg = compose_config(["experiment=tune/multicolor_mnist", "tune.objective=bise_ft.acc_unbiased"])
    with pytest.raises(BiseError, match="test metrics are never read"):
        validate_config(cfg)


def test_best_trial_of_each_study_by_validation_with_failed_trials_counted():
    import pandas as pd

    from bise_cli.run.tuning import best_trials

    def trial(study, name, objective, stage, val, test):
        run = f"out/sweeps/{study}/{name}"
        return [{"stage": "vanilla", "run_dir": run, "tune.objective": objective, "acc_unbiased": 0.5},
                *([{"stage": stage, "run_dir": run, "tune.objective": objective, "val_acc_unbiased": val,
                    "acc_unbiased": test}] if val is not None else [])]

    df = pd.DataFrame([*trial("t", "a", "bise_ft.val_acc_unbiased", "bise_ft", 0.61, 0.70),
                       *trial("t", "b", "bise_ft.val_acc_unbiased", "bise_ft", 0.64, 0.60),  # best by val
                       *trial("t", "c", "bise_ft.val_acc_unbiased", "bise_ft", None, None),  # failed trial
                       *trial("c", "a", "reweighted_ft.val_acc_unbiased", "reweighted_ft", 0.63, 0.66),
                       {"stage": "vanilla", "run_dir": "out/runs/x", "tune.objective": None}])  # not tuning
    studies = best_trials(df).set_index("study")
    assert studies.loc["t", "trials"] == 3 and studies.loc["t", "completed"] == 2
    # The best trial is chosen by validation (0.64), not by its test value (0.60 < 0.70).
    assert studies.loc["t", "best_trial"] == "b" and studies.loc["t", "acc_unbiased"] == 0.60
    assert studies.loc["c", "best_val"] == 0.63 and len(studies) == 2
