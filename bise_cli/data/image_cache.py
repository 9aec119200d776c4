"""Content-keyed caches of decoded uint8 image arrays (the datasets decode PNG/JPEG files only once).

`file_listing_key` hashes a file list by name, size and mtime; `cached_arrays` stores a dict of arrays as one
.npz under the cache folder with a SHA-256 of the array bytes beside it (checked on every load; a mismatch
rebuilds); `cached_memmap` fills a memory-mapped .npy chunk by chunk (resumable: the filled prefix is recorded)
for sets too large for memory (CelebA at 224 px), with the SHA-256 of its bytes beside it (checked on every load,
i.e. when a run starts; a mismatch rebuilds). Writes are atomic (temporary name, then os.replace). A cache is
built under its lock (`bise_cli.core.locking`): jobs that need it at the same time wait for the one building it and
then read what it built, so it is built once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bise_cli.core.files import atomic_write, write_text
from bise_cli.core.locking import compute_lock
from bise_cli.core.progress import progress_bar

log = logging.getLogger("bise")
DEFAULT_CACHE_DIR = "outputs/cache/data"
CHECKSUM_BLOCK = 64 << 20  # bytes per SHA-256 of a memory-mapped cache (the blocks are hashed in parallel)


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
    arrays = _load_arrays(path, sidecar)
    if arrays is not None:
        return arrays, True
    with compute_lock(path, f"the {kind} data cache") as waited:
        arrays = _load_arrays(path, sidecar) if waited else None  # what the job we waited for built
        if arrays is not None:
            return arrays, True
        return _store_arrays(path, sidecar, key, build()), False


def _load_arrays(path: Path, sidecar: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached_arrays entry when it is present and matches its checksum, else None."""
    if path.is_file() and sidecar.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if json.loads(sidecar.read_text()).get("sha256") == arrays_sha(arrays):
                return arrays
            log.warning("data cache %s fails its checksum; rebuilding", path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            log.warning("data cache %s unreadable (%s); rebuilding", path, error)
    return None


def _store_arrays(path: Path, sidecar: Path, key: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
    write_text(sidecar, json.dumps({"key": key, "sha256": arrays_sha(arrays),
                                    "shapes": {k: list(v.shape) for k, v in arrays.items()}}))
    return arrays


def _host() -> str:
    """This machine's name, safe in a file name (the owner of a partial cache file is host + process id)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def block_digests(path: Path, workers: int | None = None) -> list[str]:
    """SHA-256 of every CHECKSUM_BLOCK bytes of the file at `path`, hashed in parallel threads (hashlib releases
    the GIL), so verifying a cache of tens of GB is bound by the disk rather than one core."""
    size = path.stat().st_size

    def one(start: int) -> str:
        digest_ = hashlib.sha256()
        with open(path, "rb") as handle:
            handle.seek(start)
            left = min(CHECKSUM_BLOCK, size - start)
            while left > 0:
                chunk = handle.read(min(1 << 20, left))
                if not chunk:
                    break
                digest_.update(chunk)
                left -= len(chunk)
        return digest_.hexdigest()

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(0, max(size, 1), CHECKSUM_BLOCK)))


def _verified(path: Path, sidecar: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The memmap at `path` when its shape and dtype are right and its bytes match the checksums in `sidecar`;
    else None, with a warning saying why (the caller rebuilds it)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        log.warning("data cache %s unreadable (%s); rebuilding", path, error)
        return None
    if array.shape != tuple(shape) or array.dtype != np.uint8:
        log.warning("data cache %s has shape %s, expected %s; rebuilding", path, array.shape, shape)
        return None
    try:
        recorded = json.loads(sidecar.read_text())
    except FileNotFoundError:
        log.warning("data cache %s has no checksum file %s (an older bise wrote it); rebuilding", path, sidecar.name)
        return None
    except (OSError, ValueError) as error:
        log.warning("data cache checksum file %s unreadable (%s); rebuilding", sidecar, error)
        return None
    if not isinstance(recorded, dict) or recorded.get("size") != path.stat().st_size \
            or recorded.get("block") != CHECKSUM_BLOCK or recorded.get("sha256") != block_digests(path):
        log.warning("data cache %s fails its checksum (changed since it was written); rebuilding", path)
        return None
    return array


def _orphaned(name: str, marker: str) -> bool:
    """Whether the file `name` (`<cache file><marker><host>-<pid>`) was left by a process of this machine that no
    longer runs (or by this process): another machine's files, or a running fill's, are not ours to touch."""
    owner, _, pid = name.rpartition(marker)[2].rpartition("-")
    return owner == _host() and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid)))


def _adopt(path: Path, shape: tuple[int, ...], partial: Path, state: Path) -> int:
    """Rows already filled: a fill of this cache interrupted on this machine (its process no longer runs) is
    taken over by renaming its files to ours. A rename is atomic, so of two processes only one takes it over.
    Other files such processes left (more partial fills, a half-written checksum file) are removed."""
    done = 0
    for old_state in sorted(path.parent.glob(f"{path.name}.progress-*")):
        if not _orphaned(old_state.name, ".progress-"):
            continue
        old_partial = old_state.with_name(old_state.name.replace(".progress-", ".partial-", 1))
        try:
            info = json.loads(old_state.read_text())
        except (OSError, ValueError):
            info = {}
        rows = info.get("done") if isinstance(info, dict) and info.get("shape") == list(shape) else None
        if done or not (isinstance(rows, int) and 0 < rows <= shape[0]):
            if old_partial != partial:
                old_partial.unlink(missing_ok=True)
            old_state.unlink(missing_ok=True)
            continue
        try:
            os.rename(old_partial, partial)
        except OSError:   # taken over by another process just now, or never created: the state file is stale
            old_state.unlink(missing_ok=True)
            continue
        old_state.unlink(missing_ok=True)
        state.write_text(json.dumps({"shape": list(shape), "done": rows}))
        done = rows
    for marker, pattern in ((".partial-", f"{path.name}.partial-*"),
                            (".tmp-", f"{path.with_suffix('.json').name}.tmp-*")):
        for leftover in path.parent.glob(pattern):
            if leftover != partial and _orphaned(leftover.name, marker):
                leftover.unlink(missing_ok=True)
    return done


def cached_memmap(cache_dir: str | Path | None, kind: str, key: str, shape: tuple[int, ...],
                  fill: Callable[[int, int], np.ndarray], chunk: int = 1024,
                  description: str = "decoding images") -> tuple[np.ndarray, bool]:
    """(read-only memmap, hit): a uint8 array of `shape` whose rows [a, b) are `fill(a, b)`, stored as
    `kind`-`key`.npy with the SHA-256 of its bytes (per CHECKSUM_BLOCK) in `kind`-`key`.json, verified on every
    load; a changed, truncated or unverifiable file is rebuilt.

    Each process fills its own `.partial-<host>-<pid>` file and records its progress beside it; a fill killed
    midway is resumed by the next process on the same machine (`_adopt`). Two processes building the same cache
    at once: one fills it (under the cache's lock), the others wait and then read it."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR)
    path = folder / f"{kind}-{key[:20]}.npy"
    sidecar = path.with_suffix(".json")
    if path.is_file():
        array = _verified(path, sidecar, shape)
        if array is not None:
            return array, True
    with compute_lock(path, f"the {kind} data cache") as waited:
        array = _verified(path, sidecar, shape) if waited and path.is_file() else None
        if array is not None:  # built by the job we waited for
            return array, True
        return _fill_memmap(path, sidecar, key, shape, fill, chunk, description), False


def _fill_memmap(path: Path, sidecar: Path, key: str, shape: tuple[int, ...],
                 fill: Callable[[int, int], np.ndarray], chunk: int, description: str) -> np.ndarray:
    """Fill the cache at `path` (resuming an interrupted fill of this machine) and move it into place."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    token = f"{_host()}-{os.getpid()}"
    partial = path.with_name(f"{path.name}.partial-{token}")
    state = path.with_name(f"{path.name}.progress-{token}")
    done = _adopt(path, shape, partial, state)
    if done:
        out = np.load(partial, mmap_mode="r+")
        log.info("resuming %s at row %d of %d", path, done, shape[0])
    else:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=tuple(shape))
    n = shape[0]
    with progress_bar(description, 1, max(1, (n - done + chunk - 1) // chunk)) as bar:
        for start in range(done, n, chunk):
            stop = min(start + chunk, n)
            out[start:stop] = fill(start, stop)
            out.flush()
            state.write_text(json.dumps({"shape": list(shape), "done": stop}))
            bar.advance_batch()
        bar.advance_epoch(f"{n} images")
    del out
    # The checksums before the array: a reader never sees a new array with no (or an old) checksum file; a kill in
    # between leaves the partial file, which the next process resumes (all rows done) and finishes.
    write_text(sidecar, json.dumps({"key": key, "shape": list(shape), "size": partial.stat().st_size,
                                    "block": CHECKSUM_BLOCK, "sha256": block_digests(partial)}))
    os.replace(partial, path)  # the filled array takes its place (a rename: atomic)
    state.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
