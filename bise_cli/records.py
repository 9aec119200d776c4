"""Everything a run writes to disk: atomic files, the run directory (status, records, log) and stage caches.

Files are written atomically (temporary file in the same folder, then os.replace) so a run killed at any point
leaves either the old or the new version of a file, never half of one. `metrics.jsonl` is rewritten whole after
each stage from the in-memory record list, so a resumed run cannot duplicate or lose a record.

Stage caches live in `<outputs>/cache/<stage>/<hash>.pt`, where the hash is taken over the JSON of exactly the
settings that determine the stage's result; every run with the same settings reuses the entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write `text` to `path`."""
    return _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and inf become None (JSON has no NaN), tensors become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Atomically write one JSON object per line."""
    return write_text(path, "".join(json.dumps(_clean(row)) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_torch(path: str | Path, obj: Any) -> Path:
    """Atomically torch.save `obj`."""
    return _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def config_hash(settings: dict) -> str:
    """Short stable hash of a JSON-serialisable settings dict (key order does not matter)."""
    text = json.dumps(_clean(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    """Content-addressed cache of stage results: `<root>/<stage>/<hash>.pt`, shared across runs."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def path(self, stage: str, settings: dict) -> Path:
        return self.root / stage / f"{config_hash(settings)}.pt"

    def load(self, stage: str, settings: dict) -> Any | None:
        path = self.path(stage, settings)
        if not self.enabled or not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a corrupt entry (e.g. disk full) is recomputed, not fatal
            return None

    def save(self, stage: str, settings: dict, value: Any) -> Path | None:
        if not self.enabled:
            return None
        path = self.path(stage, settings)
        save_torch(path, value)
        write_json(path.with_suffix(".json"), settings)  # human-readable: what this entry was computed from
        return path


class RunDir:
    """One run's folder: config.yaml, status.json, metrics.jsonl, run.log and artefacts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []

    def file(self, name: str) -> Path:
        return self.path / name

    def status(self) -> dict:
        path = self.file("status.json")
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def set_status(self, state: str, **extra) -> None:
        write_json(self.file("status.json"), {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              **extra})

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with the error and its traceback (records already written stay)."""
        self.set_status("failed", error=f"{type(error).__name__}: {error}",
                        traceback="".join(traceback.format_exception(error)))

    def add_record(self, record: dict) -> None:
        self.records.append(record)
        write_jsonl(self.file("metrics.jsonl"), self.records)
