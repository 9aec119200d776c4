"""`bise export`: a run's pruned model as a standalone artefact (state dict, TorchScript or ONNX), checked.

Every export loads `RUN_DIR/pruned_<stage>.pt` (bise_cli.method.prune.load_pruned, weights only), writes the artefact,
reloads it the way a user would and compares its logits with the pruned model's on a batch of a size the
export never saw (so the dynamic batch axis is exercised too). Beside the artefact go `preprocessing.json` (how
raw data becomes the model's input, and what its outputs mean) and `<artefact>.json` (how to load it, which
exporter made it, the check's result).

- state_dict: the save_pruned checkpoint copied ({"arch", "kwargs", "state_dict"}); loads with
  `bise_cli.method.prune.load_pruned` (torch.load(weights_only=True) inside).
- torchscript: torch.jit.trace on an example input; reloaded with torch.jit.load. torch.jit is deprecated in
  torch 2.x but still the one format that runs from C++ (libtorch) without Python.
- onnx: `exporter=auto` tries torch's dynamo exporter (torch.export + onnxscript, torch's default) and falls back
  to the TorchScript-based exporter when torch.export cannot capture the model (the pruned BERT's mask-aware
  LayerNorm branches on its mask). Checked with onnxruntime when it is installed.

The example input is built from the preprocessing description (shape and dtype; random pixels or tokens), so a
run folder needs nothing beyond what the pipeline already writes.

What is exported, and where, is checked before anything is written: only a run whose status.json says done, with
the checksums of its artefacts (pruned models, masks, config, data summary) recorded when it finished still
matching (a failed or interrupted re-run leaves an older run's pruned model behind); never into a run folder or
over a file of the run; never over an existing file unless --force. Scratch folders that a killed export left
behind are removed by the next export into the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.files import file_sha256, write_json

log = logging.getLogger(__name__)

FORMATS = ("state_dict", "torchscript", "onnx")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
FILE_SUFFIX = {"state_dict": "_state_dict.pt", "torchscript": "_torchscript.pt", "onnx": ".onnx"}
TOLERANCE = 1e-4       # max |logit difference| between the artefact and the pruned model
CHECK_BATCH = 3        # the check's batch size: differs from the export's, so the batch axis is really dynamic
EXPORT_BATCH = 2       # torch.export specialises a dimension of size 1, so the traced example has two rows
ONNX_OPSET = 17        # the TorchScript-based exporter's opset (the dynamo exporter picks its own)
PREPROCESSING = "preprocessing.json"
RUN_MARKERS = ("status.json", "metrics.jsonl")  # a folder holding one of them is a run folder: never written into
SCRATCH_PREFIX = ".export-"                      # scratch folders: .export-<host>-<pid>-<random>
SCRATCH_NAME = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
STALE_SCRATCH_SECONDS = 3600  # a scratch folder whose owner cannot be checked (another host) counts as abandoned


# --------------------------------------------------------------------------------------------- run folder

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BiseError(f"cannot read {path}: {error}") from None


def run_config(run_dir: str | Path) -> dict:
    """The run's resolved config (config.yaml), or {} when the folder has none."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise BiseError(f"cannot read {path}: {error}") from None


def derive_preprocessing(dataset: str, info: dict) -> dict | None:
    """A built-in dataset's preprocessing from its registry `preprocessing` function (bise_cli.data.registry),
    called with the options the run's info recorded (image_size, tokenizer, max_length); None when the dataset
    has none. For run folders written before the builders stored it in data_summary.json."""
    from bise_cli.data.registry import DATASETS, spec

    if dataset not in DATASETS or spec(dataset).preprocessing is None:
        return None
    try:
        describe = spec(dataset).function("preprocessing")
    except ImportError:  # the dataset's optional extra is not installed
        return None
    options = {name: info[name] for name in inspect.signature(describe).parameters if info.get(name) is not None}
    return describe(**options)


def run_preprocessing(run_dir: str | Path) -> dict:
    """How raw data becomes the model's input: data_summary.json's `info["preprocessing"]` (written by the
    dataset builders), else derived from the built-in dataset named in config.yaml."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "data_summary.json"
    info = _read_json(summary_path).get("info", {}) if summary_path.is_file() else {}
    preprocessing = info.get("preprocessing")
    dataset = (run_config(run_dir).get("dataset") or {}).get("name", "?")
    if preprocessing is None:
        preprocessing = derive_preprocessing(dataset, info)
    if preprocessing is None:
        raise BiseError(f"cannot tell the model's input: {summary_path} has no info.preprocessing and bise cannot "
                        f"derive it for dataset {dataset!r}")
    preprocessing = dict(preprocessing)
    if "class_names" not in preprocessing and info.get("class_names"):
        preprocessing["class_names"] = list(info["class_names"])
    check_choice("preprocessing kind", preprocessing.get("kind"), ("image", "text"))
    return {"dataset": dataset, **preprocessing}


def input_spec(preprocessing: dict) -> dict:
    """Name, dtype and shape of the model's input ("batch" is the dynamic axis)."""
    if preprocessing["kind"] == "image":
        return {"name": "input", "dtype": "float32", "shape": ["batch", *preprocessing["size"]],
                "meaning": "normalised image, channels first: (uint8 RGB value * scale - mean) / std per channel"}
    return {"name": "input", "dtype": "int64", "shape": ["batch", 3, preprocessing["max_length"]],
            "meaning": "token ids, attention mask and token type ids stacked on axis 1, padded to max_length "
                       f"with the tokenizer {preprocessing['tokenizer']!r}"}


def _vocabulary_size(model: nn.Module) -> int:
    config = getattr(getattr(model, "model", None), "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    embeddings = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0] if embeddings else 100


def example_input(preprocessing: dict, model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    """A random input of the right shape and dtype: normalised random pixels, or random tokens whose last row
    is half padding (so traced graphs never assume a full attention mask)."""
    generator = torch.Generator().manual_seed(seed)
    if preprocessing["kind"] == "image":
        size = [int(s) for s in preprocessing["size"]]
        pixels = torch.randint(0, 256, (batch, *size), generator=generator).float()
        shape = (1, -1, *([1] * (len(size) - 1)))
        mean = torch.tensor(preprocessing.get("mean") or [0.0] * size[0]).view(shape)
        std = torch.tensor(preprocessing.get("std") or [1.0] * size[0]).view(shape)
        return (pixels * float(preprocessing.get("scale", 1 / 255)) - mean) / std
    length = int(preprocessing["max_length"])
    vocabulary = _vocabulary_size(model)
    ids = torch.randint(min(1000, vocabulary - 1), vocabulary, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    return torch.stack([ids * mask, mask, torch.zeros_like(ids)], dim=1)


def load_run_model(run_dir: str | Path, stage: str = "bise") -> tuple[nn.Module, Path]:
    """The pruned model of `stage` in `run_dir` (on the CPU, eval mode) and its checkpoint path."""
    from bise_cli.method.prune import load_pruned

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BiseError(f"run folder {str(run_dir)!r} not found")
    path = run_dir / f"pruned_{stage}.pt"
    if not path.is_file():
        available = sorted(p.stem.removeprefix("pruned_") for p in run_dir.glob("pruned_*.pt"))
        hint = f"; pruned models there: {', '.join(available)} (--stage)" if available else \
            f" (the run had no {stage} stage)"
        raise BiseError(f"no pruned model in {run_dir}: {path.name} is missing{hint}")
    try:
        return load_pruned(path), path
    except Exception as error:  # not a bise checkpoint, truncated, unknown architecture: the user's file
        raise BiseError(f"cannot load {path}: {_first_line(error)}") from None


# -------------------------------------------------------------------------------------------------- export

def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # the dynamo exporter colours its messages
    return (text.splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (deprecation and tracer warnings, torch.export's graph dumps on failure)."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "torch.fx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    buffer = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise BiseError(f"exported model returns shape {tuple(a.shape)}, the pruned model {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _export_state_dict(model: nn.Module, checkpoint: Path, path: Path, check: torch.Tensor) -> dict:
    from bise_cli.method.prune import load_pruned

    shutil.copyfile(checkpoint, path)
    with torch.no_grad():
        diff = _max_diff(load_pruned(path)(check), model(check))
    return {"exporter": "bise_cli.method.prune.save_pruned", "check": {"runtime": f"torch {torch.__version__}",
                                                                 "max_abs_diff": diff}}


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, check: torch.Tensor) -> dict:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, (example,), strict=False)
        traced.save(str(path))
        diff = _max_diff(torch.jit.load(str(path), map_location="cpu")(check), model(check))
    return {"exporter": "torch.jit.trace", "check": {"runtime": f"torch {torch.__version__} (torch.jit.load)",
                                                     "max_abs_diff": diff}}


def _onnx_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # Weights inside the .onnx file (one artefact) unless they approach protobuf's 2 GB limit.
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, external_data=external,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _onnx_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, check: torch.Tensor, exporter: str) -> dict:
    check_choice("ONNX exporter", exporter, ONNX_EXPORTERS)
    result: dict = {}
    with _quiet(), torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _onnx_dynamo(model, example, path)
                result["exporter"] = "torch.onnx.export(dynamo=True)"
            except Exception as error:
                if exporter == "dynamo":
                    raise BiseError(f"the dynamo ONNX exporter failed: {_first_line(error.__cause__ or error)} "
                                    "(try --exporter torchscript)") from None
                # torch.export's own reason (e.g. a data-dependent branch) is the cause, not the wrapper's advice.
                result["dynamo_failed"] = _first_line(error.__cause__ or error)
                for leftover in path.parent.iterdir():  # the scratch folder: a half-written file, external data
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if "exporter" not in result:
            try:
                _onnx_torchscript(model, example, path)
            except Exception as error:
                raise BiseError(f"ONNX export failed: {_first_line(error)}") from None
            result["exporter"] = f"torch.onnx.export(dynamo=False, opset_version={ONNX_OPSET})"
    if result.get("dynamo_failed"):
        log.info("the dynamo ONNX exporter could not capture the model (%s): used the TorchScript-based exporter",
                 result["dynamo_failed"])
    try:
        import onnxruntime
    except ImportError:
        result["check"] = "onnxruntime not installed: not verified"
        return result
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    with torch.no_grad():
        diff = _max_diff(torch.from_numpy(outputs[0]), model(check))
    result["check"] = {"runtime": f"onnxruntime {onnxruntime.__version__}", "max_abs_diff": diff}
    return result


def _load_instructions(fmt: str, name: str, preprocessing: dict) -> list[str]:
    dtype = "float32" if preprocessing["kind"] == "image" else "int64"
    if fmt == "state_dict":
        return ["from bise_cli.method.prune import load_pruned",
                f"model = load_pruned({name!r})  # torch.load(weights_only=True): arch, kwargs, state_dict",
                "logits = model(x)  # x as described in preprocessing.json"]
    if fmt == "torchscript":
        return ["import torch", f"model = torch.jit.load({name!r}, map_location='cpu')",
                "logits = model(x)  # x as described in preprocessing.json; no bise needed (C++: torch::jit::load)"]
    return ["import onnxruntime", f"session = onnxruntime.InferenceSession({name!r})",
            f"logits = session.run(None, {{'input': x}})[0]  # x: numpy {dtype}, see preprocessing.json"]


def _output_path(run_dir: Path, fmt: str, out: str | Path | None, stage: str) -> Path:
    """The artefact's path: `out`, a folder's default file name inside it, or RUN_DIR/export/<stage><suffix>."""
    path = Path(out) if out else run_dir / "export" / f"{stage}{FILE_SUFFIX[fmt]}"
    if path.is_dir() or str(out or "").endswith(("/", os.sep)):
        path = path / f"{stage}{FILE_SUFFIX[fmt]}"
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_targets(path: Path, run_dir: Path, preprocessing: dict, force: bool) -> None:
    """Refuse, before anything is written, an export that would overwrite what it must not: a file in any run
    folder (one holding RUN_MARKERS: its records, status, pruned models), a file of the exported run (outside its
    export/ folder), a sidecar's name, or an existing file unless `force` (preprocessing.json that already says
    exactly what this export would write is shared, not replaced)."""
    folder = path.parent
    markers = [name for name in RUN_MARKERS if (folder / name).exists()]
    if markers:
        raise BiseError(f"--out {path} is in the run folder {folder} (it holds {', '.join(markers)}): an export "
                        "never writes among a run's files; choose another folder (the default is RUN_DIR/export/)")
    if path.name == PREPROCESSING:
        raise BiseError(f"--out {path} is the name of the export's own input description ({PREPROCESSING}); "
                        "name the model file, e.g. model.onnx")
    sidecars = {PREPROCESSING: preprocessing, f"{path.name}.json": None}
    for target in (path, *(folder / name for name in sidecars)):
        if _inside(target, run_dir) and not _inside(target, run_dir / "export") and target.exists():
            raise BiseError(f"{target} is a file of the run {run_dir}: an export never replaces it; choose another "
                            "--out (the default is RUN_DIR/export/)")
        if not (target.exists() or target.is_symlink()) or force:
            continue
        if target.name == PREPROCESSING and _same_json(target, preprocessing):
            continue
        raise BiseError(f"{target} exists: bise export never replaces a file unless asked (--force), or choose "
                        "another --out")


def _same_json(path: Path, expected: dict) -> bool:
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(expected))
    except (OSError, ValueError):
        return False


def check_finished_run(run_dir: Path, checkpoint: Path) -> dict:
    """status.json of `run_dir` when the run finished for its current config and data and its artefacts are the
    ones it finished with: state "done" and every checksum of status.json's `artefacts` (recorded by
    `RunDir.finish`) equal to the file's. A run that is running, was killed, failed (its pruned model may be an
    earlier run's) or whose files changed since is refused in one line. A run that finished before bise recorded
    artefact checksums is accepted with `artefacts_verified` false."""
    status_path = run_dir / "status.json"
    if not status_path.is_file():
        raise BiseError(f"{run_dir} has no status.json: not a run folder bise finished, so {checkpoint.name} "
                        "cannot be told to belong to it")
    status = _read_json(status_path)
    state = status.get("state") if isinstance(status, dict) else None
    rerun = "re-run its command until it finishes, then export"
    if state == "running":
        raise BiseError(f"the run in {run_dir} has not finished (status.json: running since {status.get('time')}; "
                        f"a killed run stays so): {checkpoint.name} may be an earlier run's; {rerun}")
    if state == "failed":
        error = str(status.get("error") or "no reason recorded").splitlines()[0][:200]
        raise BiseError(f"the last run in {run_dir} failed ({error}): {checkpoint.name} may be an earlier run's, "
                        f"with other settings or data; {rerun}")
    if state != "done":
        raise BiseError(f"{status_path} says the run is {state!r}, not done; {rerun}")
    artefacts = status.get("artefacts")
    if artefacts is None:
        return {**status, "artefacts_verified": False}
    if not isinstance(artefacts, dict):
        raise BiseError(f"{status_path} is damaged (artefacts is not a table of checksums); {rerun}")
    # The run's records are intact, so re-running its command would find it done: status.json must go first.
    rebuild = f"delete {status_path} and re-run its command to rebuild them (finished stages come from the caches)"
    if checkpoint.name not in artefacts:
        raise BiseError(f"{checkpoint} was not part of the run when it finished; {rebuild}")
    changed = [name for name, sha in artefacts.items() if file_sha256(run_dir / name) != sha]
    if changed:
        raise BiseError(f"{', '.join(changed)} in {run_dir} changed or disappeared since the run finished (sha256 "
                        f"differs from status.json): not the finished run's; {rebuild}")
    return {**status, "artefacts_verified": True}


def _scratch_prefix() -> str:
    return f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def remove_stale_scratch(folder: Path, started: float) -> list[Path]:
    """Remove the scratch folders that killed exports left in `folder`: those older than this export (`started`,
    a time.time()) whose process (named in the folder: host and pid) is gone. One of another host, or of a bise
    that did not name it, is removed only when older than STALE_SCRATCH_SECONDS. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for entry in folder.glob(f"{SCRATCH_PREFIX}*"):
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            modified = entry.stat().st_mtime
        except OSError:
            continue
        if modified >= started:  # an export that started after this one
            continue
        owner = SCRATCH_NAME.match(entry.name)
        if owner and owner["host"] == host:
            if _alive(int(owner["pid"])):
                continue
        elif time.time() - modified < STALE_SCRATCH_SECONDS:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    if removed:
        log.info("removed %d scratch folder(s) of killed exports in %s", len(removed), folder)
    return removed


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, stage: str = "bise",
               exporter: str = "auto", force: bool = False) -> dict:
    """Export `run_dir`'s pruned `stage` model as `fmt` to `out` (default RUN_DIR/export/<stage><suffix>; a
    folder gets the default file name), check it, and write preprocessing.json and <artefact>.json beside it.
    Only a finished run is exported (`check_finished_run`), never over a run's files or, unless `force`, over
    an existing file (`check_targets`). Returns the manifest written to <artefact>.json (its `check` holds the
    logit comparison)."""
    started = time.time()
    check_choice("format", fmt, FORMATS)
    check_choice("exporter", exporter, ONNX_EXPORTERS)
    run_dir = Path(run_dir)
    model, checkpoint = load_run_model(run_dir, stage)
    status = check_finished_run(run_dir, checkpoint)
    preprocessing = run_preprocessing(run_dir)
    classes = preprocessing.get("class_names")
    num_classes = model.classifier.out_features
    description = {**{k: v for k, v in preprocessing.items() if k != "class_names"},
                   "input": input_spec(preprocessing),
                   "output": {"name": "logits", "dtype": "float32", "shape": ["batch", num_classes],
                              "class_names": classes if classes and len(classes) == num_classes else None}}
    path = _output_path(run_dir, fmt, out, stage)
    check_targets(path, run_dir, description, force)
    example = example_input(preprocessing, model, EXPORT_BATCH, seed=0)
    check = example_input(preprocessing, model, CHECK_BATCH, seed=1)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(folder, started)
        # Written and checked in a scratch folder beside the target, then moved into place: a failed export or a
        # failed check never leaves a wrong artefact under the final name.
        scratch = Path(tempfile.mkdtemp(dir=folder, prefix=_scratch_prefix()))
    except OSError as error:
        raise BiseError(f"cannot write the export into {folder}: {error.strerror or error}") from None
    try:
        staged = scratch / path.name
        if fmt == "state_dict":
            result = _export_state_dict(model, checkpoint, staged, check)
        elif fmt == "torchscript":
            result = _export_torchscript(model, example, staged, check)
        else:
            result = _export_onnx(model, example, staged, check, exporter)
        diff = result["check"]["max_abs_diff"] if isinstance(result["check"], dict) else None
        if diff is not None and not diff <= TOLERANCE:
            raise BiseError(f"the {fmt} export differs from the pruned model: max |logit difference| {diff:.3g} > "
                            f"{TOLERANCE:g}; nothing written")
        manifest = {"format": fmt, "file": path.name, "stage": stage, "run_dir": str(run_dir.resolve()),
                    "source_checkpoint": checkpoint.name, "arch": type(model).__name__, "torch": torch.__version__,
                    "run": {"state": status.get("state"), "finished": status.get("time"),
                            "config_hash": status.get("config_hash"),
                            "artefacts_verified": status["artefacts_verified"]},
                    **result, "tolerance": TOLERANCE, "check_batch": CHECK_BATCH,
                    "preprocessing": PREPROCESSING, "load": _load_instructions(fmt, path.name, preprocessing)}
        write_json(scratch / PREPROCESSING, description)
        write_json(scratch / f"{path.name}.json", manifest)
        check_targets(path, run_dir, description, force)  # again: another process may have written there since
        for name in (PREPROCESSING, path.name, f"{path.name}.json"):
            os.replace(scratch / name, folder / name)
        for produced in scratch.iterdir():  # e.g. the external weights of a very large ONNX model
            os.replace(produced, folder / produced.name)
    except OSError as error:
        raise BiseError(f"cannot write the export into {folder}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**manifest, "path": str(path)}


def export_command(argv: list[str]) -> int:
    """`bise export RUN_DIR --format state_dict|torchscript|onnx [--out PATH] [--stage bise] [--exporter E]
    [--force]`."""
    parser = argparse.ArgumentParser(prog="bise export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder with pruned_<stage>.pt (a run with the bise stage)")
    parser.add_argument("--format", help=f"{' | '.join(FORMATS)}")
    parser.add_argument("--out", help="artefact file or folder (default: RUN_DIR/export/<stage><suffix>)")
    parser.add_argument("--stage", default="bise", help="whose pruned model: reads RUN_DIR/pruned_<stage>.pt")
    parser.add_argument("--exporter", default="auto", help="ONNX only: auto (dynamo, else the TorchScript-based "
                        "exporter) | dynamo | torchscript")
    parser.add_argument("--force", action="store_true", help="replace existing export files (never a run's own)")
    args = parser.parse_args(argv)
    if not args.format:
        raise BiseError(f"bise export needs --format ({' | '.join(FORMATS)})")
    manifest = export_run(args.run_dir, args.format, args.out, args.stage, args.exporter, args.force)
    check = manifest["check"]
    verified = check if isinstance(check, str) else \
        f"verified with {check['runtime']}: max |logit difference| {check['max_abs_diff']:.2g}"
    print(f"wrote {manifest['path']} ({args.format}, {manifest['exporter']}; {verified})")
    if manifest.get("dynamo_failed"):
        print(f"note: the dynamo exporter could not capture the model ({manifest['dynamo_failed']})")
    if not manifest["run"]["artefacts_verified"]:
        print(f"note: {args.run_dir} finished before bise recorded checksums of its artefacts, so "
              f"{manifest['source_checkpoint']} could not be checked against the finished run")
    print(f"how to load: {Path(manifest['path']).parent / (manifest['file'] + '.json')}; input and classes: "
          f"{Path(manifest['path']).parent / 'preprocessing.json'}")
    return 0
