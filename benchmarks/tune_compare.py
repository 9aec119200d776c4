"""Tuned vs default: a default run beside the best trial (by validation) of its Optuna sweeps.

For the default run and each sweep (`bise run -m hydra/sweeper=optuna experiment=tune/...`): per stage, the
validation and test unbiased and worst-group accuracy of the default run and of the sweep's best trial (chosen as
`bise table` chooses it, `bise_cli.run.tuning.best_trials`: by the study's validation objective only), the number
of trials (completed of run), how many completed trials beat the default run on that objective, the best
parameters (the sweep's optimization_results.yaml when present) and one line per trial. Prints Markdown.

    python benchmarks/tune_compare.py DEFAULT_RUN_DIR SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from bise_cli.reporting.tables import load_records
from bise_cli.run.tuning import best_trials, parse_objective

METRICS = ("val_acc_unbiased", "val_acc_worst_group", "acc_unbiased", "acc_worst_group")
HEADINGS = ("val unbiased %", "val worst group %", "test unbiased %", "test worst group %")


def stage_records(run: Path) -> dict[str, dict]:
    """The first record of each stage in a run folder (an `also_select_by` alternative comes later)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["stage"], row)
    return first


def overrides(trial: Path) -> list[str]:
    """The trial's command-line overrides, as Hydra recorded them (the sweeper's choices first)."""
    return yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())


def job_number(trial: Path) -> int:
    """The trial's number in its sweep (Hydra's job number: the order Optuna asked for them)."""
    return int(yaml.safe_load((trial / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"])


def short(value: str) -> str:
    """A sampled value with 4 significant digits (the overrides hold the full float)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def percent(value) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.1f}"


def row(label: str, record: dict | None) -> str:
    return "| " + label + " | " + " | ".join(percent((record or {}).get(m)) for m in METRICS) + " |"


def compare(default_run: Path, sweeps: list[Path]) -> str:
    """The Markdown report (see the module docstring)."""
    default = stage_records(default_run)
    lines = [f"default run: `{default_run.name}`", "",
             "| run | " + " | ".join(HEADINGS) + " |", "|---" * (len(METRICS) + 1) + "|",
             row("vanilla (the user's model)", default.get("vanilla"))]
    details = []
    for sweep in sweeps:
        study = best_trials(load_records(sweep)).iloc[0]
        stage, metric = parse_objective(study["objective"])
        trials = sorted(p.parent for p in sweep.glob("*/metrics.jsonl"))
        values = {t: stage_records(t).get(stage, {}).get(metric) for t in trials}
        done = {t: v for t, v in values.items() if v is not None and math.isfinite(v)}
        reference = default[stage][metric]
        best = stage_records(sweep / study["best_trial"])
        shown = [s for s in ("bise", "bise_ft", "reweighted_ft") if s in best]
        for s in shown:
            lines.append(row(f"{s}, default", default.get(s)))
            lines.append(row(f"{s}, best of {study['completed']} trials by {study['objective']}", best[s]))
        results = sweep / "optimization_results.yaml"
        details += [f"### {sweep.name}", "",
                    f"- objective `{study['objective']}`; trials: {study['completed']} completed of "
                    f"{study['trials']}; {sum(v > reference for v in done.values())} of {len(done)} beat the "
                    f"default run's {100 * reference:.1f} on it (validation)",
                    f"- best trial: `{study['best_trial']}`"]
        if results.is_file():
            best_params = yaml.safe_load(results.read_text())
            details.append(f"- optimization_results.yaml: best_value {best_params['best_value']:.4f}, "
                           f"best_params {best_params['best_params']}")
        numbered = sorted(trials, key=job_number)
        space = [override.partition("=")[0] for override in overrides(numbered[0])
                 if override.startswith(("pruning.", "finetune."))]
        details += ["", "| trial | " + " | ".join(space) + f" | {metric} ({stage}) | test acc_unbiased |",
                    "|---" * (len(space) + 3) + "|"]
        for trial in numbered:
            chosen = dict(override.partition("=")[::2] for override in overrides(trial))
            details.append(f"| {job_number(trial)} | " + " | ".join(short(chosen.get(k, "—")) for k in space)
                           + f" | {percent(values[trial])} | "
                           f"{percent((stage_records(trial).get(stage) or {}).get('acc_unbiased'))} |")
        details.append("")
    return "\n".join(lines + [""] + details)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[-1].strip())
    print(compare(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
