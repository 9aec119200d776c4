"""Stage cache that never returns a wrong result: verified, plain-data entries shared across runs.

An entry is `<root>/<stage>/<hash>.pt` (the value, torch.save'd) plus a sidecar `<hash>.json` holding the
stage, the full key, the sha256 of the .pt bytes and the format version. `<hash>` is `config_hash(key)`.

Guarantees:
- an entry is used only if its sidecar is valid, names the same stage and exactly the requested key (not just
  the same hash) and the .pt bytes match the recorded sha256; anything else (garbled, truncated, missing or
  foreign files, a key collision) is logged and recomputed, never trusted;
- values are loaded with `torch.load(weights_only=True)`, so a planted file cannot run code when read, and only
  plain data (tensors, str, int, float, bool, None in dicts, lists and tuples) may be saved;
- files are written atomically, the .pt before its sidecar: a run killed in between leaves a .pt without a
  matching sidecar, which is recomputed;
- one job computes an entry, the others wait for it (`bise_cli.core.locking`: an OS lock per entry, released when
  its holder exits or dies) and then read what it wrote, so jobs of a sweep that start together and share a
  vanilla model train it once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from bise_cli.core.files import atomic_write, json_safe, write_json
from bise_cli.core.locking import DEFAULT_WAIT_MINUTES, compute_lock
from bise_cli.run.records import config_hash

log = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_FORMAT = 1
_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)
_MISS = object()  # "no usable entry", distinct from a cached None


def check_plain(value: Any, where: str = "value") -> None:
    """Raise TypeError unless `value` is plain data that `torch.load(weights_only=True)` can read back."""
    # Exact types: a subclass such as numpy.float64 would pickle fine but be refused on load.
    if isinstance(value, torch.Tensor) or type(value) in _LEAVES:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(f"stage cache values must be plain data, got {type(value).__module__}."
                        f"{type(value).__qualname__} at {where}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_plain(k, f"{where} key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    else:
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")


def _canonical(key: dict) -> Any:
    """The key as it reads back from JSON (tuples become lists, NaN becomes None), for exact comparison."""
    return json.loads(json.dumps(json_safe(key), sort_keys=True))


class StageCache:
    """Verified cache of stage results under `<root>/<stage>/`, keyed by the settings and data they depend on."""

    def __init__(self, root: str | Path, enabled: bool = True, wait_minutes: float = DEFAULT_WAIT_MINUTES):
        self.root = Path(root)
        self.enabled = enabled
        self.wait_minutes = wait_minutes  # how long a job waits for another job computing the same entry

    def key_path(self, stage: str, key: dict) -> Path:
        """Path of the .pt file of the entry for (`stage`, `key`)."""
        return self.root / stage / f"{config_hash(key)}.pt"

    def load(self, stage: str, key: dict) -> Any | None:
        """The verified cached value for (`stage`, `key`), or None if there is none, it cannot be trusted or
        caching is disabled."""
        value = self._load(stage, key) if self.enabled else _MISS
        return None if value is _MISS else value

    def _load(self, stage: str, key: dict) -> Any:
        path = self.key_path(stage, key)
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            return _MISS
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("bise_cache_format") != CACHE_FORMAT or meta.get("stage") != stage:
            log.warning("cache entry %s has no valid sidecar: recomputing", path)
            return _MISS
        if meta.get("key") != _canonical(key):
            log.warning("cache entry %s was computed for another key: recomputing", path)
            return _MISS
        # Hash and load the same bytes, so the file cannot change between the check and the load.
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            log.warning("cache entry %s failed its checksum: recomputing", path)
            return _MISS
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # a planted object is refused by the weights-only unpickler
            log.warning("cache entry %s could not be loaded (%s: %s): recomputing", path, type(error).__name__,
                        error)
            return _MISS

    def save(self, stage: str, key: dict, value: Any) -> Path | None:
        """Write `value` as the entry for (`stage`, `key`): the .pt atomically, then its sidecar (if enabled)."""
        check_plain(value)  # before anything is written
        if not self.enabled:
            return None
        buffer = io.BytesIO()
        torch.save(value, buffer)
        data = buffer.getbuffer()
        path = self.key_path(stage, key)
        atomic_write(path, lambda handle: handle.write(data))
        write_json(path.with_suffix(".json"), {
            "stage": stage, "key": _canonical(key), "sha256": hashlib.sha256(data).hexdigest(),
            "bise_cache_format": CACHE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return path

    def get_or_compute(self, stage: str, key: dict, compute: Callable[[], T], *, describe: str | None = None) -> T:
        """The cached value for (`stage`, `key`) if a verified entry exists, else `compute()` (then cached).

        The entry is computed under its lock: a job that finds another job computing it waits, then reuses the
        entry that job wrote (or computes it itself when the other job died or failed before writing it)."""
        if not self.enabled:
            return compute()
        path = self.key_path(stage, key)
        value = self._load(stage, key)
        if value is not _MISS:  # a cached None is a hit too
            log.info("%s from cache (%s)", describe or stage, path)
            return value
        with compute_lock(path, describe or stage, self.wait_minutes) as waited:
            if waited:  # the holder may have written the entry meanwhile
                value = self._load(stage, key)
                if value is not _MISS:
                    log.info("%s from cache: reused the result another job computed (%s)", describe or stage, path)
                    return value
                log.info("%s: the other job left no result (it failed or was killed); computing it here",
                         describe or stage)
            value = compute()  # an exception here propagates before anything is written
            self.save(stage, key, value)
        return value
