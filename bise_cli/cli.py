"""The `bise` command: `run` (the pipeline, through Hydra), `audit` (the model card of an unpruned model), `data`
(inspect a dataset), `gates` (where BISE's gates go), `table` (aggregate), `export` (a pruned model as a file).

Only this module and pipeline.py know Hydra. `bise run ARGS` hands ARGS to a Hydra app, so every Hydra feature
works as documented: overrides, `-m` sweeps, `--cfg job`, `--help`, launchers; `bise audit` is the same app with
the stages fixed to [vanilla]. `bise gates` only composes the config (Hydra's compose API): it writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bise_cli import __version__
from bise_cli.core.defaults import CONF_DIR, NOT_RECORD_SETTINGS
from bise_cli.core.errors import BiseError, Terminated, unknown_choice

log = logging.getLogger("bise")

USAGE = f"""bise {__version__}: Bias-Invariant Subnetwork Extraction experiment runner

usage: bise <command> [arguments]

commands:
  run [overrides]    train (or reuse) the vanilla model, run the BISE search, prune, evaluate, write records
                     e.g.  bise run dataset=biased_mnist rho=0.99
                           bise run -m rho=0.99,0.995,0.997 seed=0,1,2
                           bise run experiment=quickstart
                     `bise run --help` lists every config group; `bise run --cfg job` prints the config
  audit [overrides]  the model card of a model WITHOUT pruning it (stages fixed to [vanilla]); writes
                     MODEL_CARD.md, model_card.json and group_accuracy.png into outputs/audits/<overrides>
                     e.g.  bise audit dataset=celeba backbone=resnet18 vanilla_checkpoint=model.pt
  data [overrides]   build the dataset only; print and write a summary and a sample grid
  gates [overrides]  list the backbone's gates (module, position, units, removable) and the layers left ungated
                     e.g.  bise gates backbone=resnet18 dataset=cifar10c    (classes=N sets the class count;
                     by default it is the dataset's, and only unknown datasets are built to find it)
  table DIR [opts]   mean +- std tables (md, tex, csv) over every record under DIR; `bise table --help`
  export RUN_DIR --format state_dict|torchscript|onnx [--out PATH] [--stage bise]
                     the run's pruned model as a standalone file, reloaded and checked against the pruned
                     model, with preprocessing.json (input and classes) beside it; `bise export --help`
  version            print the version
"""
COMMANDS = ("run", "audit", "data", "gates", "table", "export", "version")
MAX_DIRNAME = 200
FAILED_JOBS: list[str] = []


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
    """{group: chosen option} for each config group chosen on the command line whose choice the composed config
    does not show as a field (e.g. `experiment=quickstart`, `pruning=ffw`), so that records and tables can tell
    the choices a sweep varies. Every other override sets a config value, which each record already carries in
    its composed form (`records.flatten_config`): it is not repeated here, because the override's text is not
    the value (`[gender]` is the list ["gender"], `null` is None, `1e-3` is 0.001). Deletions (`~key`) are not
    record keys either: the composed config shows what is left."""
    from hydra.core.hydra_config import HydraConfig

    from bise_cli.run.records import flatten_config

    hydra_cfg = HydraConfig.get()
    fields = flatten_config(plain)
    keys = {}
    for override in hydra_cfg.overrides.task:
        if override.startswith("~"):
            continue
        group = override.lstrip("+").partition("=")[0].partition("@")[0]
        choice = hydra_cfg.runtime.choices.get(group)
        # Not a group, a group already shown as a field (dataset, backbone), or one that never changes a result
        # (logger: a record key would also change the run's identity, and `logger=mlflow` would redo a run).
        if choice is None or group.startswith("hydra") or group in fields or group in NOT_RECORD_SETTINGS:
            continue
        keys[group] = choice
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


class OutputFolderCheck:
    """Hydra callback (`hydra.callbacks` in conf/config.yaml): the run folder (`hydra.run.dir`), or a sweep's
    folder, must be writable before Hydra creates it, so an unwritable one is one line and exit 2 (Hydra itself
    would fail with a traceback before any bise code runs)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Jobs of a parallel launcher (joblib, submitit) fail in other processes: their status.json tells."""
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        for path in sorted(sweep.glob("*/status.json")):
            if path.stat().st_mtime >= getattr(self, "_started", 0) - 1 and str(path.parent) not in FAILED_JOBS:
                try:
                    failed = json.loads(path.read_text()).get("state") == "failed"
                except (OSError, ValueError, AttributeError):
                    failed = False
                if failed:
                    FAILED_JOBS.append(str(path.parent))

    def __getattr__(self, name: str):
        if name.startswith("on_"):   # Hydra's other hooks (job start and end, ...): nothing to check
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        from bise_cli.run.validate import check_writable

        HydraConfig.instance().set_config(config)   # as Hydra does before it resolves the folder
        try:
            check_writable(str(OmegaConf.select(config, key)))
        except BiseError as error:
            print(f"error: {error} ({key})", file=sys.stderr, flush=True)
            sys.exit(2)


def _mark_failed(error: BaseException) -> None:
    """Count a failed sweep job and say so in its status.json, now (a job that failed before the pipeline marked it
    running has none, or an old one): how a parallel launcher's jobs report back (OutputFolderCheck.on_multirun_end)."""
    from bise_cli.run.records import RunDir

    FAILED_JOBS.append(str(_output_dir()))
    RunDir(_output_dir()).fail(error)


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
                _mark_failed(error)
                return None
            _fail(f"error: {error}", 2 if isinstance(error, BiseError) else 1)
        except Exception as error:
            if _is_multirun():
                log.exception("job failed (traceback also in %s/status.json)", _output_dir())
                _mark_failed(error)
                return None
            raise
    return wrapper


def _validated(cfg: DictConfig) -> dict:
    """The job's config as a plain dict, every setting checked (warnings logged) before anything runs."""
    from bise_cli.run.validate import validate_config

    plain = OmegaConf.to_container(cfg, resolve=True)
    for warning in validate_config(plain):
        log.warning(warning)
    return plain


def _run_pipeline(cfg: DictConfig) -> None:
    """The job of `bise run` (and `bise audit`): check, run the pipeline, print the summary."""
    from bise_cli.run.validate import check_writable

    _interrupt_on_sigterm()
    plain = _validated(cfg)
    plain["record_keys"] = {**_override_keys(plain), **(plain.get("record_keys") or {})}
    check_writable(_output_dir())
    if plain.get("cache"):
        check_writable(Path(plain["output_root"]) / "cache")

    from bise_cli.reporting.summary import print_run_summary
    from bise_cli.run import pipeline

    if plain.get("note"):
        log.info(plain["note"])
    records = pipeline.run(plain, _output_dir())
    print_run_summary(records, note=plain.get("note", ""), out_dir=_output_dir())
    objective = (plain.get("tune") or {}).get("objective")
    if objective:  # the value a sweeper (experiment=tune/*) maximises: one validation metric
        from bise_cli.run.tuning import objective_value

        try:
            value = objective_value(records, objective)
        except BiseError as error:
            if _is_multirun():
                raise  # a failed trial (the sweeper gets no number)
            log.warning("%s", error)  # a single run: nothing consumes the objective
            return None
        log.info("tune.objective %s = %.6g", objective, value)
        return value
    return None


@_guarded
def run_task(cfg: DictConfig):
    return _run_pipeline(cfg)


@_guarded
def data_task(cfg: DictConfig):
    from bise_cli.run.validate import check_writable

    plain = _validated(cfg)
    check_writable(_output_dir())

    from bise_cli.reporting.summary import write_data_summary
    from bise_cli.run import pipeline

    bundle = pipeline.load_data(plain)
    write_data_summary(bundle, _output_dir())


@_guarded
def audit_task(cfg: DictConfig):
    """`bise run` with stages=[vanilla]: the model card of the vanilla model (no search, no pruning)."""
    OmegaConf.update(cfg, "stages", ["vanilla"])
    _run_pipeline(cfg)
    print(f"model card: {_output_dir() / 'MODEL_CARD.md'}")


def _compose(overrides: list[str]) -> dict:
    """The resolved config for `overrides` through Hydra's compose API (no run folder, no log file)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _check_group_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise BiseError(_hydra_message(error)) from None


def _hydra_message(error: Exception) -> str:
    """Hydra's message on one line, without the config search path it appends to "not found" messages (a missing
    config no override names, e.g. one in a config file's defaults list)."""
    return " ".join(str(error).split("Config search path")[0].split())[:300]


def _check_group_choices(overrides: list[str]) -> None:
    """Fail before Hydra starts on a group choice with no config (`bise run backbone=resnet19`, one choice of a sweep
    `backbone=mlp,resnet19`, `hydra/launcher=slurm2`), worded as every bad choice is, instead of Hydra's dozen lines
    with its search path. Left to Hydra: sweep functions and globs, interpolations, quoted values, `null` and
    deletions (`~group`)."""
    suspects = []
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        group = key.split("@")[0]  # `group@package=choice`
        if (not sep or override.startswith("~") or any(c in value for c in "()*[]{}$'\" ")
                or not (group.startswith("hydra/") or (CONF_DIR / group).is_dir())):
            continue
        # A config file in conf/ settles it; anything else (a typo, or a plugin's launcher or sweeper) is asked of
        # Hydra's loader below, which knows the plugins' choices too.
        suspects += [(key, group, choice) for choice in value.split(",") if choice and choice != "null"
                     and not (CONF_DIR / group / f"{choice}.yaml").is_file()]
    if not suspects:
        return
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for key, group, choice in suspects:
            choices = _group_choices(loader, group)
            if choices and choice not in choices:  # a group Hydra does not know is left to Hydra's message
                raise unknown_choice(key, choice, choices)


def _group_choices(loader, group: str) -> list[str]:
    """Every config of a Hydra group, nested ones as `sub/name` (`experiment=tune/multicolor_mnist`)."""
    from hydra.core.object_type import ObjectType

    choices = list(loader.get_group_options(group, ObjectType.CONFIG))
    for sub in loader.get_group_options(group, ObjectType.GROUP):
        choices += [f"{sub}/{name}" for name in _group_choices(loader, f"{group}/{sub}")]
    return choices


def _gate_rows(model) -> list[dict]:
    """One row per gate, then one per channel group left ungated: `describe_gates` (bise_cli.models.auto_gates;
    keys name, module, units, where, removable, status, reason, ...)."""
    from bise_cli.models.auto_gates import describe_gates

    return [dict(row) for row in describe_gates(model)]


def _ungated_layers(model, rows: list[dict]) -> list[dict]:
    """The ungated channel groups `describe_gates` reports; for a hand-written backbone (which reports none) the
    conv and linear layers that are no gate's producer, whose output units are therefore kept whole."""
    from torch import nn

    reported = [row for row in rows if row.get("status") == "ungated"]
    if reported or hasattr(model, "ungated_groups"):
        return [{"module": row.get("module"), "type": type(model.get_submodule(row["module"])).__name__
                 if row.get("module") else "", "units": row.get("units"), "reason": row.get("reason", "")}
                for row in reported]
    covered = {row.get("producer") or row.get("module") for row in rows}
    classifier = getattr(model, "classifier", None)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name not in covered:
            units = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
            reason = "the classifier: its outputs are the classes" if module is classifier else \
                "no gate on its output units (kept whole)"
            layers.append({"module": name, "type": type(module).__name__, "units": units, "reason": reason})
    return layers


def gates_command(argv: list[str]) -> int:
    """`bise gates [overrides] [classes=N]`: a table of the backbone's gates and of the layers left ungated."""
    from rich.table import Table

    from bise_cli.reporting.summary import console
    from bise_cli.run.validate import validate_config

    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: bise gates [overrides] [classes=N]\n  lists where BISE's gates go in the configured backbone "
              "(e.g. bise gates backbone=resnet18 dataset=cifar10c)")
        return 0
    classes = [arg for arg in argv if arg.lstrip("+").startswith("classes=")]
    plain = _compose([arg for arg in argv if arg not in classes])
    for warning in validate_config(plain):
        log.warning(warning)
    num_classes, origin = _class_count(plain, classes[-1].partition("=")[2] if classes else None)

    from bise_cli.models import build_backbone

    backbone = plain["backbone"]
    try:
        model = build_backbone(backbone["name"], num_classes, **{k: v for k, v in backbone.items() if k != "name"})
    except (ValueError, TypeError) as error:  # a backbone option the constructor refuses
        raise BiseError(f"cannot build backbone {backbone['name']}: {error}") from None
    rows = _gate_rows(model)
    gates = [row for row in rows if row.get("status") != "ungated"]
    table = Table(title=f"gates of {backbone['name']} ({num_classes} classes, from {origin})")
    for column in ("gate", "module", "where", "units", "removable", "reason"):
        table.add_column(column, justify="right" if column == "units" else "left")
    for row in gates:
        module = ", ".join([str(row.get("module")), *row.get("also", [])])
        table.add_row(str(row.get("name")), module, str(row.get("where", "")), str(row.get("units")),
                      "yes" if row.get("removable", True) else "masked-not-removed", str(row.get("reason") or ""))
    units = sum(int(row.get("units") or 0) for row in gates)
    removable = sum(int(row.get("units") or 0) for row in gates if row.get("removable", True))
    table.caption = (f"{len(gates)} gates, {units} units: {removable} removable, {units - removable} "
                     "masked-not-removed (the pruned model keeps their width and zeroes them)")
    console.print(table)
    ungated = _ungated_layers(model, rows)
    if ungated:
        table = Table(title=f"{len(ungated)} channel group(s) left ungated")
        for column in ("module", "type", "units", "reason"):
            table.add_column(column)
        for row in ungated:
            table.add_row(*(str(row.get(column, "")) for column in ("module", "type", "units", "reason")))
        console.print(table)
    return 0


def _class_count(plain: dict, given: str | None) -> tuple[int, str]:
    """The backbone's class count and where it came from: `classes=N`, the dataset config's `num_classes`, a
    built-in dataset's (its registry spec: `bise gates` need not build the data, since no backbone gates its
    classifier), else the dataset itself (built once: the only case that reads data)."""
    from bise_cli.data.registry import DATASETS, spec

    dataset = plain["dataset"]["name"]
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise BiseError(f"classes must be a positive integer, got {given!r}")
        return int(given), "classes="
    if plain["dataset"].get("num_classes"):
        return int(plain["dataset"]["num_classes"]), f"dataset {dataset}"
    if dataset in DATASETS and spec(dataset).num_classes:
        return spec(dataset).num_classes, f"dataset {dataset}"
    from bise_cli.run import pipeline
    return pipeline.load_data(plain).num_classes, f"dataset {dataset}, built to count them"


def _hydra_app(task, argv: list[str], program: str, extra: list[str] = ()) -> None:
    import hydra

    if not CONF_DIR.is_dir():
        raise BiseError(f"config folder {CONF_DIR} not found; reinstall bise (pip install -e . or the wheel)")
    _check_group_choices(argv)
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)
    sys.argv = [program, *argv, *extra]
    try:
        app()
    except ValueError as error:  # Hydra's own usage errors (`-m` with `--cfg`) would otherwise be a traceback
        if "can be specified" not in str(error):
            raise
        raise BiseError(str(error)) from None


def _exit_if_jobs_failed() -> None:
    """After a sweep: exit 1 naming the jobs that failed (each job's error is in its status.json)."""
    if FAILED_JOBS:
        print(f"{len(FAILED_JOBS)} job(s) failed; see status.json in: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            _hydra_app(run_task, rest, "bise run")
            _exit_if_jobs_failed()
        elif command == "audit":  # default folder outputs/audits/<overrides>, unless the user chose one
            if any(arg.lstrip("+~").startswith("stages=") or arg.lstrip("~") == "stages" for arg in rest):
                raise BiseError("bise audit evaluates the model as given: its stages are always [vanilla] "
                                "(use bise run for the BISE stages)")
            chosen = any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in rest)
            _hydra_app(audit_task, rest, "bise audit", [] if chosen else
                       ["hydra.run.dir='${output_root}/audits/${bise.dirname:${hydra:job.override_dirname}}'"])
            _exit_if_jobs_failed()
        elif command == "gates":
            sys.exit(gates_command(rest))
        elif command == "export":
            from bise_cli.reporting.export import export_command
            sys.exit(export_command(rest))
        elif command == "data":  # default folder outputs/data/<overrides>, unless the user chose one
            chosen = any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in rest)
            _hydra_app(data_task, rest, "bise data", [] if chosen else
                       ["hydra.run.dir='${output_root}/data/${bise.dirname:${hydra:job.override_dirname}}'"])
        elif command == "table":
            from bise_cli.reporting.tables import table_command
            sys.exit(table_command(rest))
        elif command == "version":
            print(__version__)
        else:
            raise BiseError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)} (see bise --help)")
    except BiseError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:  # outside a job (while composing the config, importing, ...)
        print(_interrupt_message(error, None), file=sys.stderr)
        sys.exit(interrupt_exit_code(error))
