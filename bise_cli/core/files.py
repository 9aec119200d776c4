"""Atomic files: the one atomic write of the package, and the text, JSON, JSONL and torch files written with it.

Files are written atomically (temporary file in the same folder, then os.replace) so a process killed at any
point leaves either the old or the new version of a file, never half of one. Every layer writes through here:
data caches, stage caches, run folders, tables and exports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

# The process umask, read once at import (os.umask can only be read by setting it, which must not race with
# threads creating files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write) -> Path:
    """Write `path` atomically: `write(handle)` fills a temporary file (binary) in the same folder, which then
    replaces `path`; a kill at any point leaves the old file or the new one, never half of one. The one atomic
    write of the package (text, JSON, torch files, numpy archives, cache entries all go through it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; the file takes the mode an ordinary open() would give it (0666 less the
        # umask), like the plots and logs beside it.
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_UMASK)
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
    return atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and inf become None (JSON has no NaN), tensors become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Atomically write one JSON object per line."""
    return write_text(path, "".join(json.dumps(json_safe(row)) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a JSONL file (a missing file is empty; a bad line raises ValueError)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def file_sha256(path: str | Path) -> str | None:
    """Hex sha256 of the file at `path`, or None when there is no such file. Read in 1 MB chunks: a dataset file
    (CivilComments' CSV) or a checkpoint is never held in memory whole."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_torch(path: str | Path, obj: Any) -> Path:
    """Atomically torch.save `obj`."""
    return atomic_write(Path(path), lambda handle: torch.save(obj, handle))
