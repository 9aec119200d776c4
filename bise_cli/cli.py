"""The `bise` command: `run` (the pipeline, through Hydra), `data` (inspect a dataset), `table` (aggregate).

Only this module and pipeline.py know Hydra. `bise run ARGS` hands ARGS to a Hydra app, so every Hydra feature
works as documented: overrides, `-m` sweeps, `--cfg job`, `--help`, launchers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bise_cli import __version__
from bise_cli.errors import BiseError, Terminated

log = logging.getLogger("bise")

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package; the top-level conf/ links here
USAGE = f"""bise {__version__}: Bias-Invariant Subnetwork Extraction experiment runner

usage: bise <command> [arguments]

commands:
  run [overrides]    train (or reuse) the vanilla model, run the BISE search, prune, evaluate, write records
                     e.g.  bise run dataset=biased_mnist rho=0.99
                           bise run -m rho=0.99,0.995,0.997 seed=0,1,2
                           bise run experiment=quickstart
                     `bise run --help` lists every config group; `bise run --cfg job` prints the config
  data [overrides]   build the dataset only; print and write a summary and a sample grid
  table DIR [opts]   mean +- std tables (md, tex, csv) over every record under DIR; `bise table --help`
  version            print the version
"""
MAX_DIRNAME = 200
FAILED_JOBS: list[str] = []
# Overrides that do not change results: not written as record keys (and not part of run folder names).
NOT_RECORD_KEYS = ("device", "dataset.root", "output_root", "name")


def _dirname(overrides: str) -> str:
    """Folder name for a run: its overrides (no timestamp), made filesystem-safe; `default` when none."""
    safe = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if len(safe) > MAX_DIRNAME:  # long override lists: a readable prefix plus a hash keeps names unique
        safe = f"{safe[:MAX_DIRNAME - 17]}-{hashlib.sha256(overrides.encode()).hexdigest()[:16]}"
    return safe or "default"


if not OmegaConf.has_resolver("bise.dirname"):
    OmegaConf.register_new_resolver("bise.dirname", _dirname)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


def _override_keys(plain: dict) -> dict:
    """{key: value} of the job's command-line overrides (so records carry what a sweep varies); values are read
    back from the composed config so they keep their types; group choices (e.g. experiment) stay strings."""
    from hydra.core.hydra_config import HydraConfig

    keys = {}
    for override in HydraConfig.get().overrides.task:
        key, _, raw = override.lstrip("+~").partition("=")
        if key in NOT_RECORD_KEYS or key.startswith("hydra"):
            continue
        value = plain
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        keys[key] = value if isinstance(value, (str, int, float, bool)) else raw
    return keys


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM (cluster time limits, `timeout`) into an exception, so the run is marked failed with the
    reason instead of staying "running"; a re-run resumes it from its finished stages."""
    def handler(signum, frame):
        raise Terminated("terminated by SIGTERM")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (some launchers): keep the default behaviour
        pass


def interrupt_exit_code(error: BaseException) -> int:
    """Shell convention 128 + signal number: 143 for SIGTERM, 130 for Ctrl-C (SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


def _interrupt_message(error: BaseException, out_dir: Path | None) -> str:
    what = "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C"
    try:
        state = json.loads((out_dir / "status.json").read_text()).get("state") if out_dir else None
    except (OSError, ValueError):
        state = None
    if state == "failed":
        return f"interrupted ({what}): run marked failed; re-run the same command to resume"
    return f"interrupted ({what})"


def _log_to_file(message: str, level: int = logging.ERROR) -> None:
    """Write `message` to the run's log file only (the console gets it once, on stderr)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(message: str, code: int) -> None:
    """One line on stderr (and in run.log), then exit with `code`."""
    _log_to_file(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _guarded(task):
    """Run a task; user errors, file-system errors and interrupts become one-line messages on stderr (rc 2, 1,
    143/130). In a sweep a failed job never stops the others (an interrupt stops the sweep)."""
    def wrapper(cfg: DictConfig):
        try:
            return task(cfg)
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM through _interrupt_on_sigterm
            _fail(_interrupt_message(error, _output_dir()), interrupt_exit_code(error))
        except (BiseError, OSError) as error:
            if _is_multirun():
                log.error("error: %s (job %s)", error, _output_dir())
                FAILED_JOBS.append(str(_output_dir()))
                return None
            _fail(f"error: {error}", 2 if isinstance(error, BiseError) else 1)
        except Exception:
            if _is_multirun():
                log.exception("job failed (traceback also in %s/status.json)", _output_dir())
                FAILED_JOBS.append(str(_output_dir()))
                return None
            raise
    return wrapper


def _validated(cfg: DictConfig) -> dict:
    """The job's config as a plain dict, every setting checked (warnings logged) before anything runs."""
    from bise_cli.validate import validate_config

    plain = OmegaConf.to_container(cfg, resolve=True)
    for warning in validate_config(plain):
        log.warning(warning)
    return plain


@_guarded
def run_task(cfg: DictConfig):
    from bise_cli.validate import check_writable

    _interrupt_on_sigterm()
    plain = _validated(cfg)
    plain["record_keys"] = {**_override_keys(plain), **(plain.get("record_keys") or {})}
    check_writable(_output_dir())
    if plain.get("cache"):
        check_writable(Path(plain["output_root"]) / "cache")

    from bise_cli import pipeline
    from bise_cli.summary import print_run_summary

    if plain.get("note"):
        log.info(plain["note"])
    records = pipeline.run(plain, _output_dir())
    print_run_summary(records, note=plain.get("note", ""), out_dir=_output_dir())


@_guarded
def data_task(cfg: DictConfig):
    from bise_cli.validate import check_writable

    plain = _validated(cfg)
    check_writable(_output_dir())

    from bise_cli import pipeline
    from bise_cli.summary import write_data_summary

    bundle = pipeline.load_data(plain)
    write_data_summary(bundle, _output_dir())


def _hydra_app(task, argv: list[str], program: str, extra: list[str] = ()) -> None:
    import hydra

    if not CONF_DIR.is_dir():
        raise BiseError(f"config folder {CONF_DIR} not found; reinstall bise (pip install -e . or the wheel)")
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    sys.argv = [program, *argv, *extra]
    app()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            _hydra_app(run_task, rest, "bise run")
            if FAILED_JOBS:
                print(f"{len(FAILED_JOBS)} job(s) failed; see status.json in: {', '.join(FAILED_JOBS)}",
                      file=sys.stderr)
                sys.exit(1)
        elif command == "data":  # default folder outputs/data/<overrides>, unless the user chose one
            chosen = any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in rest)
            _hydra_app(data_task, rest, "bise data", [] if chosen else
                       ["hydra.run.dir='${output_root}/data/${bise.dirname:${hydra:job.override_dirname}}'"])
        elif command == "table":
            from bise_cli.tables import table_command
            sys.exit(table_command(rest))
        elif command == "version":
            print(__version__)
        else:
            raise BiseError(f"unknown command {command!r}; allowed: run, data, table, version (see bise --help)")
    except BiseError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:  # outside a job (while composing the config, importing, ...)
        print(_interrupt_message(error, None), file=sys.stderr)
        sys.exit(interrupt_exit_code(error))
