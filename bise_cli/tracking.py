"""Experiment tracking: send a run's config, per-epoch curves and final metrics to TensorBoard or MLflow.

`logger=none|tensorboard|mlflow` (conf/logger/). Trackers receive what the run folder already holds once a
run is done (or found done): the resolved config as parameters, every `<stage>_history.json` curve (losses,
learning rate, validation accuracy, sparsity, temperature, ...) stepped by epoch, and every record's numeric
metrics under `<stage>/<metric>`. Reading the finished folder rather than hooking the training loops means a
resumed or cached run reports exactly the same curves as the run that computed them, and adding
`logger=mlflow` to a finished command sends its results without recomputing anything.

Both backends are optional extras and work offline: TensorBoard writes event files (`tensorboard --logdir
outputs/sweeps/NAME`), MLflow writes to a local file store (`mlflow ui --backend-store-uri outputs/mlruns`) or
to any `logger.tracking_uri` the user names.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from bise_cli.errors import BiseError, check_choice
from bise_cli.records import flatten_config

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "mlflow")
HISTORY_SUFFIX = "_history.json"
SEARCH_HISTORY = "search_history.json"  # the BISE search's curve (stage `bise`)


def _numbers(row: dict) -> dict[str, float]:
    """The finite numeric entries of a record or history row (booleans, text, lists and None are left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def stage_histories(run_dir: Path) -> dict[str, list[dict]]:
    """{stage: per-epoch rows} from the history files of a run folder (unreadable files are skipped with a
    warning: a tracker never fails a finished run)."""
    files = {"bise": run_dir / SEARCH_HISTORY}
    files.update({p.name[:-len(HISTORY_SUFFIX)]: p for p in sorted(run_dir.glob(f"*{HISTORY_SUFFIX}"))})
    histories = {}
    for stage, path in files.items():
        if not path.is_file():
            continue
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.warning("tracking: skipping unreadable %s (%s)", path.name, error)
            continue
        if isinstance(rows, list):
            histories[stage] = [row for row in rows if isinstance(row, dict)]
    return histories


class Tracker:
    """logger=none: accepts everything and keeps nothing. Backends override the three hooks."""

    def log_params(self, params: dict) -> None:
        pass

    def log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def log_run(self, run_dir: Path, cfg: dict, records: list[dict]) -> None:
        """Config as parameters, every stage's curve stepped by epoch, every record's final metrics."""
        self.log_params(flatten_config(cfg))
        for stage, rows in stage_histories(run_dir).items():
            for index, row in enumerate(rows, start=1):
                values = _numbers(row)
                step = int(values.pop("epoch", index))
                self.log_scalars(f"{stage}/epoch", values, step)
        for record in records:
            # Several records of one stage (e.g. BISE's masks selected by different metrics) stay apart.
            stage = record.get("stage", "run") + (f"@{record['selection']}" if record.get("selection") else "")
            settings = {"stage", "keys", *record.get("keys", [])}  # a record also carries the whole config
            self.log_scalars(stage, _numbers({k: v for k, v in record.items() if k not in settings}), 0)


class TensorBoardTracker(Tracker):
    """Event files under `<dir>` (default: the run folder's `tensorboard/`)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise BiseError("logger=tensorboard needs the tensorboard package (pip install tensorboard, or "
                            "pip install -e '.[tracking]')") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))  # indented: Markdown code block
        self.writer.add_text("config", text)

    def log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per bise run, in experiment `experiment`, at `tracking_uri` (default: a local file store)."""

    MAX_PARAM = 6000  # MLflow's limit on a parameter value

    def __init__(self, tracking_uri: str, experiment: str, run_name: str):
        try:
            import mlflow
        except ImportError:
            raise BiseError("logger=mlflow needs mlflow (pip install mlflow-skinny, or pip install -e "
                            "'.[tracking]')") from None
        if "://" not in tracking_uri:
            # A plain folder is MLflow's local file store: offline, no server. MLflow 3 keeps it in maintenance
            # mode behind an opt-in; bise opts in only for a folder the user (or the default) named.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            tracking_uri = Path(tracking_uri).resolve().as_uri()
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)

    def log_params(self, params: dict) -> None:
        self.mlflow.log_params({k: str(v)[:self.MAX_PARAM] for k, v in params.items()})

    def log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if values:
            self.mlflow.log_metrics({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def open_tracker(options: dict | None, run_dir: Path, experiment: str) -> Tracker:
    """The tracker named by the `logger` config (`none` when absent)."""
    options = options or {"name": "none"}
    check_choice("logger", options.get("name"), TRACKERS)
    if options["name"] == "tensorboard":
        return TensorBoardTracker(Path(options.get("dir") or run_dir / "tensorboard"))
    if options["name"] == "mlflow":
        return MLflowTracker(str(options["tracking_uri"]), options.get("experiment") or experiment,
                             run_name=Path(run_dir).name)
    return Tracker()


def check_tracker(options: dict | None) -> None:
    """Fail before any work when the chosen tracker's package is missing (not after hours of training)."""
    name = (options or {}).get("name", "none")
    check_choice("logger", name, TRACKERS)
    needs = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}
    if name in needs:
        module, package = needs[name]
        try:
            __import__(module)
        except ImportError:
            raise BiseError(f"logger={name} needs {package} (pip install {package}, or pip install -e "
                            "'.[tracking]')") from None


def track_run(options: dict | None, run_dir: Path, cfg: dict, records: list[dict], failed: bool = False) -> None:
    """Send a run folder's config, curves and records to the configured tracker (a no-op for logger=none)."""
    if not options or options.get("name", "none") == "none":
        return
    tracker = open_tracker(options, Path(run_dir), str(cfg.get("name") or "bise"))
    try:
        tracker.log_run(Path(run_dir), cfg, records)
    finally:
        tracker.close(failed)
