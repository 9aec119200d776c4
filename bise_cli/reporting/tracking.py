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

A tracker never costs a run: `check_tracker` finds a missing package or an unwritable event folder or file store
before training, and a tracker that fails anyway once the run is done (a server down, a disk full) is one warning
line; the run folder's records stand and the command exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from pathlib import Path

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.run.records import flatten_config

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


def local_store(tracking_uri: str) -> Path | None:
    """The folder an MLflow tracking URI writes to on this machine: a plain folder or file:// (the file store),
    sqlite:///FILE (its folder); None for a server (http://, databricks, ...), which only the run can reach."""
    uri = str(tracking_uri)
    if "://" not in uri:
        return Path(uri)
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        from urllib.parse import unquote, urlparse
        return Path(unquote(urlparse(uri).path))
    if scheme == "sqlite" and rest.startswith("/") and len(rest) > 1:  # sqlite:///relative.db, sqlite:////abs.db
        return Path(rest[1:]).parent
    return None


def check_tracker(options: dict | None) -> None:
    """Fail before any work, in one line, when the chosen tracker's package is missing or the folder it writes
    to (`logger.dir`, a local MLflow store) cannot be written (not after hours of training). TensorBoard's
    default folder is inside the run folder, which the pipeline checks itself."""
    from bise_cli.run.validate import check_writable

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
    folder = options.get("dir") if name == "tensorboard" else \
        local_store(options.get("tracking_uri") or "") if name == "mlflow" else None
    if folder:
        try:
            check_writable(folder)
        except BiseError as error:
            setting = "logger.dir" if name == "tensorboard" else "logger.tracking_uri"
            raise BiseError(f"logger={name}: {error} (the {setting} setting)") from None


@contextlib.contextmanager
def _thread_errors():
    """Collect the exceptions of threads that end during the block (TensorBoard writes its event file from a
    thread: a write error there would print "Exception in thread ..." and a traceback) instead of printing them."""
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        yield errors
    finally:
        threading.excepthook = previous


def track_run(options: dict | None, run_dir: Path, cfg: dict, records: list[dict], failed: bool = False) -> bool:
    """Send a run folder's config, curves and records to the configured tracker (a no-op for logger=none).
    Returns False, after one warning line, when the tracker fails: the run folder already holds everything, so a
    tracker problem never fails the run."""
    if not options or options.get("name", "none") == "none":
        return True
    name = options.get("name")
    with _thread_errors() as thread_errors:
        try:
            tracker = open_tracker(options, Path(run_dir), str(cfg.get("name") or "bise"))
            try:
                tracker.log_run(Path(run_dir), cfg, records)
            finally:
                tracker.close(failed)
        except Exception as error:  # noqa: BLE001  (a tracker's own errors are many and not ours to list)
            thread_errors.insert(0, error)
    if not thread_errors:
        return True
    error = thread_errors[0]
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    log.warning("logger=%s failed, nothing more was sent (the records in %s are complete): %s: %s", name, run_dir,
                type(error).__name__, reason)
    return False
