"""What a run writes about itself: its records, its run directory (status, records, log) and the settings hash.

Files go through `bise_cli.core.files` (atomic writes). `metrics.jsonl` is rewritten whole after each stage from
the in-memory record list, so a resumed run cannot duplicate or lose a record.

A record is self-describing: `stage`, `keys` (the names of its config fields), the whole resolved config
flattened to dotted names (so `bise table` groups the same way however a command was typed), then the metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from bise_cli.core.defaults import NOT_RECORD_SETTINGS
from bise_cli.core.files import file_sha256, json_safe, read_jsonl, write_json, write_jsonl

# Fields every record sets itself; `record_keys` may not override them.
RESERVED_FIELDS = ("stage", "keys", "run_dir", "data_sha256", "data_train_size", "data_source", "selection",
                   "peak_gpu_memory_mb")


# The files of a run folder that `bise export` hands on, checksummed when the run finishes (status.json's
# `artefacts`): a pruned model, masks, config or data summary that differs from them is not the finished run's.
RUN_ARTEFACTS = ("pruned_*.pt", "masks.pt", "config.yaml", "data_summary.json")


def record_value(value: Any) -> Any:
    """How a record stores one config value: lists as compact JSON text (hashable in tables), the rest as is."""
    if isinstance(value, (list, tuple)):
        return json.dumps(json_safe(list(value)), separators=(",", ":"))
    return value


def flatten_config(cfg: dict, prefix: str = "") -> dict:
    """{dotted.name: record_value} for every leaf of `cfg` but the settings that are no record field
    (`defaults.NOT_RECORD_SETTINGS`); `dataset.name` and `backbone.name` are shortened to `dataset` and
    `backbone`."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if name in NOT_RECORD_SETTINGS:
            continue
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[{"dataset.name": "dataset", "backbone.name": "backbone"}.get(name, name)] = record_value(value)
    return flat


def _extra_fields(cfg: dict) -> dict:
    """`record_keys` flattened like the config (settings that never change a result left out, e.g. a
    `logger=mlflow` choice)."""
    return flatten_config({str(k): v for k, v in (cfg.get("record_keys") or {}).items()
                           if str(k) not in NOT_RECORD_SETTINGS and str(k).split(".")[0] not in NOT_RECORD_SETTINGS})


def record_fields(cfg: dict) -> dict:
    """The config part of every record of a run: the flattened config, then the `record_keys` it lacks. Both are
    compared as composed values in the same form (a list is the same JSON text however it was typed), so a
    `record_keys` entry that repeats a config field with another value is a clash (BiseError)."""
    from bise_cli.core.errors import BiseError

    fields = flatten_config(cfg)
    for key, value in _extra_fields(cfg).items():
        if key in fields and fields[key] != value and str(fields[key]) != str(value):
            raise BiseError(f"record_keys.{key}={value!r} contradicts the config value {fields[key]!r}")
        fields.setdefault(key, value)
    return fields


def check_record_keys(cfg: dict) -> None:
    """The record fields of a run, checked before anything runs (a clash must not wait for the first record):
    `record_keys` may not rewrite a reserved field (stage, keys, a metric, ...) nor contradict the config."""
    from bise_cli.core.errors import BiseError
    from bise_cli.core.names import METRICS

    clash = sorted(set(_extra_fields(cfg)) & (set(RESERVED_FIELDS) | {m.name for m in METRICS}))
    if clash:
        raise BiseError(f"record_keys cannot set the reserved record field(s) {', '.join(clash)}")
    record_fields(cfg)


def make_record(stage: str, metrics: dict, cfg: dict, extra: dict | None = None) -> dict:
    """One self-describing record: stage, the names of its config fields, the flattened config, the metrics."""
    config = record_fields(cfg)
    extra = extra or {}
    return {"stage": stage, "keys": [*config, *[k for k in extra if k == "selection"]], **config, **extra,
            **metrics}


def config_hash(settings: dict) -> str:
    """Short stable hash of a JSON-serialisable settings dict (key order does not matter)."""
    text = json.dumps(json_safe(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunDir:
    """One run's folder: config.yaml, status.json, metrics.jsonl, run.log and artefacts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []

    def file(self, name: str) -> Path:
        return self.path / name

    def status(self) -> dict:
        """The status record, or {} when it is missing or unreadable (bytes, a list, half a file)."""
        path = self.file("status.json")
        try:
            status = json.loads(path.read_text()) if path.is_file() else {}
        except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return {}
        return status if isinstance(status, dict) else {}

    def finished_records(self, identity: str, data_sha256: str | None = None) -> list[dict] | None:
        """The records of a finished run with the same settings and data, or None when it must be (re)done: not
        done, other settings, other data (`data_sha256`, the fingerprint of the data loaded now), or records that
        lost lines, do not parse or were edited since the run finished."""
        status = self.status()
        if status.get("state") != "done" or status.get("config_hash") != identity:
            return None
        if status.get("data_sha256") != data_sha256:
            before = status.get("data_sha256")
            why = (f"the data changed since the run finished (data_sha256 {before[:12]}..., now "
                   f"{str(data_sha256)[:12]}...)" if isinstance(before, str) else "its status names no data")
            logging.getLogger(__name__).warning("%s: %s; redoing the run from the stage caches that still apply",
                                                self.path, why)
            return None
        path = self.file("metrics.jsonl")
        if file_sha256(path) != status.get("records_sha256"):
            logging.getLogger(__name__).warning("%s is incomplete or changed since the run finished: redoing the "
                                                "run from the stage caches", path)
            return None
        try:
            return read_jsonl(path)
        except ValueError:
            return None

    def finish(self, identity: str, data_sha256: str | None = None, **extra) -> None:
        """Mark the run done for settings `identity` and data `data_sha256`, with a checksum of its records (what
        `finished_records` verifies) and of its artefacts (what `bise export` verifies)."""
        extra.setdefault("artefacts", self.artefact_checksums())
        self.set_status("done", config_hash=identity, data_sha256=data_sha256, records=len(self.records),
                        records_sha256=file_sha256(self.file("metrics.jsonl")), **extra)

    def set_status(self, state: str, **extra) -> None:
        write_json(self.file("status.json"), {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              **extra})

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with the error and its traceback (records already written stay)."""
        self.set_status("failed", error=f"{type(error).__name__}: {error}",
                        traceback="".join(traceback.format_exception(error)))

    def artefact_checksums(self) -> dict[str, str]:
        """{file name: sha256} of the files a finished run hands on (RUN_ARTEFACTS): the pruned models, the masks,
        the config and data summary that describe them."""
        return {path.name: file_sha256(path) for pattern in RUN_ARTEFACTS
                for path in sorted(self.path.glob(pattern)) if path.is_file()}

    def add_record(self, record: dict) -> None:
        self.records.append(record)
        write_jsonl(self.file("metrics.jsonl"), self.records)
