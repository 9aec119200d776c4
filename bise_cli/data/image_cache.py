"""Content-keyed caches of decoded uint8 image arrays (the datasets decode PNG/JPEG files only once).

`file_listing_key` hashes a file list by name, size and mtime; `cached_arrays` stores a dict of arrays as one
.npz under the cache folder with a SHA-256 of the array bytes beside it (checked on every load; a mismatch
rebuilds); `cached_memmap` fills a memory-mapped .npy chunk by chunk (resumable: the filled prefix is recorded)
for sets too large for memory (CelebA at 224 px). Writes are atomic (temporary name, then os.replace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from bise_cli.progress import progress_bar

log = logging.getLogger("bise")
DEFAULT_CACHE_DIR = "outputs/cache/data"


def digest(payload) -> str:
    """SHA-256 of a JSON-serialisable payload (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_listing_key(paths: Iterable[Path], base: Path) -> str:
    """SHA-256 over (relative name, size, mtime_ns) of every file: any added, removed or changed file changes it."""
    h = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        h.update(f"{path.relative_to(base).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def arrays_sha(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}{array.dtype}{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()


def cached_arrays(cache_dir: str | Path | None, kind: str, key: str,
                  build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """(arrays, hit): the arrays stored under `kind`-`key` when present and intact, else `build()` stored there."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR)
    path = folder / f"{kind}-{key[:20]}.npz"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if json.loads(sidecar.read_text()).get("sha256") == arrays_sha(arrays):
                return arrays, True
            log.warning("data cache %s fails its checksum; rebuilding", path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            log.warning("data cache %s unreadable (%s); rebuilding", path, error)
    arrays = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    tmp_side = sidecar.with_name(sidecar.name + f".tmp{os.getpid()}")
    tmp_side.write_text(json.dumps({"key": key, "sha256": arrays_sha(arrays),
                                    "shapes": {k: list(v.shape) for k, v in arrays.items()}}))
    os.replace(tmp_side, sidecar)
    return arrays, False


def cached_memmap(cache_dir: str | Path | None, kind: str, key: str, shape: tuple[int, ...],
                  fill: Callable[[int, int], np.ndarray], chunk: int = 1024,
                  description: str = "decoding images") -> tuple[np.ndarray, bool]:
    """(read-only memmap, hit): a uint8 array of `shape` whose rows [a, b) are `fill(a, b)`, stored as
    `kind`-`key`.npy. Filling resumes after an interruption from the last completed chunk."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR)
    path = folder / f"{kind}-{key[:20]}.npy"
    if path.is_file():
        array = np.load(path, mmap_mode="r")
        if array.shape == tuple(shape) and array.dtype == np.uint8:
            return array, True
        log.warning("data cache %s has shape %s, expected %s; rebuilding", path, array.shape, shape)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = path.with_name(path.name + ".progress")
    done = 0
    if partial.is_file() and state.is_file():
        try:
            info = json.loads(state.read_text())
            if info.get("shape") == list(shape):
                done = int(info["done"])
        except (ValueError, KeyError, json.JSONDecodeError):
            done = 0
    if done:
        out = np.load(partial, mmap_mode="r+")
        log.info("resuming %s at row %d of %d", partial, done, shape[0])
    else:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=tuple(shape))
    n = shape[0]
    with progress_bar(description, 1, (n - done + chunk - 1) // chunk) as bar:
        for start in range(done, n, chunk):
            stop = min(start + chunk, n)
            out[start:stop] = fill(start, stop)
            out.flush()
            state.write_text(json.dumps({"shape": list(shape), "done": stop}))
            bar.advance_batch()
        bar.advance_epoch(f"{n} images")
    del out
    os.replace(partial, path)
    state.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), False
