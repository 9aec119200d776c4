"""Tuning through Hydra's Optuna sweeper: the value a run returns to the sweeper, and the best trial of a study.

`bise run -m hydra/sweeper=optuna experiment=tune/<preset> hydra.sweeper.n_trials=N` runs one pipeline per trial
(the vanilla model comes from the stage cache after the first trial); the run's task function returns
`objective_value(records, cfg["tune"]["objective"])`, a validation metric of one stage, which the sweeper
maximises (the presets set `direction: maximize`). Only `val_*` metrics are allowed and only that one is read:
test metrics never reach the sweeper. A run that fails, or whose objective is missing or not finite, raises
`BiseError`; the task function then returns nothing and hydra-optuna-sweeper 1.3.0 tells Optuna the trial
FAILED (it casts the return value with float() and marks any error as a failed trial), never a number.
"""

from __future__ import annotations

import math
from pathlib import Path

from bise_cli.core.errors import BiseError

VALIDATION_PREFIX = "val_"


def parse_objective(objective: str, stages: list[str] | None = None) -> tuple[str, str]:
    """`<stage>.<val_metric>` (e.g. `bise_ft.val_acc_worst_group`) as (stage, metric); one-line errors for
    anything else, for a stage the run does not compute, and for a metric that is not a validation metric."""
    stage, dot, metric = str(objective).partition(".")
    if not dot or not stage or not metric:
        raise BiseError(f"tune.objective must be <stage>.<validation metric>, e.g. bise_ft.val_acc_worst_group "
                        f"(got {objective!r})")
    if not metric.startswith(VALIDATION_PREFIX):
        raise BiseError(f"tune.objective {objective!r}: tuning maximises a validation metric (val_*, e.g. "
                        f"{stage}.val_{metric.removeprefix('test_')}); test metrics are never read while tuning")
    if stages is not None and stage not in stages:
        raise BiseError(f"tune.objective {objective!r}: stage {stage!r} is not in stages {list(stages)}")
    return stage, metric


def objective_value(records: list[dict], objective: str) -> float:
    """The objective's value in the run's `records` (the first record of its stage: the selected masks, not an
    `also_select_by` alternative). Reads the stage name and that one validation metric, nothing else."""
    stage, metric = parse_objective(objective)
    for record in records:
        if record["stage"] != stage:
            continue
        value = record.get(metric)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise BiseError(f"tune.objective {objective!r} is {value!r} in this run (missing or not finite; does "
                            "the dataset have a validation split? Multi-Color MNIST: dataset.val_holdout): "
                            "the trial is reported as failed")
        return float(value)
    raise BiseError(f"tune.objective {objective!r}: the run has no {stage} record: the trial is reported as failed")


# Test metrics shown beside the best trial of a study (read after tuning, never during it).
BEST_TRIAL_METRICS = ("acc_unbiased", "acc_worst_group", "acc_conflicting", "sparsity_units", "leakage")


def best_trials(df):
    """One row per tuning study among the records of `bise table` (a pandas DataFrame with `run_dir`): the study
    (its sweep folder), its objective, the number of trials (run folders with a record), how many of them have a
    finite objective, the best trial by the objective (validation; ties to the first trial folder by name), its
    validation value (`best_val`) and the test metrics of the objective's stage in that trial (BEST_TRIAL_METRICS).
    None without tuning records."""
    import pandas as pd

    if "tune.objective" not in df or "run_dir" not in df or not df["tune.objective"].notna().any():
        return None
    rows = []
    tuned = df[df["tune.objective"].notna()].copy()
    tuned["_study"] = tuned["run_dir"].map(lambda path: str(Path(path).parent))
    for (study, objective), trials in tuned.groupby(["_study", "tune.objective"], sort=True):
        stage, metric = parse_objective(objective)
        # The first record of the stage in each trial (an `also_select_by` alternative carries `selection`).
        scored = trials[trials["stage"] == stage].groupby("run_dir", sort=True).head(1)
        values = pd.to_numeric(scored.get(metric), errors="coerce") if metric in scored else pd.Series(dtype=float)
        finite = scored[values.map(lambda v: not pd.isna(v) and math.isfinite(v)).astype(bool)]
        row = {"study": Path(study).name, "objective": objective, "trials": trials["run_dir"].nunique(),
               "completed": len(finite)}
        if len(finite):
            best = finite.loc[pd.to_numeric(finite[metric]).idxmax()]
            row.update({"best_val": float(best[metric]), "best_trial": Path(best["run_dir"]).name,
                        **{m: best.get(m) for m in BEST_TRIAL_METRICS}})
        rows.append(row)
    return pd.DataFrame(rows)
