"""One job computes, the others wait: a lock per cache entry shared by every job that uses the same cache folder.

`compute_lock(path, what)` holds an OS file lock (the `filelock` package: `flock` on Unix, which NFS v4 and
Lustre support) on `<path>.lock` while the entry at `path` is built. A job that finds it held logs "waiting for
<what> being computed by another job (lock <file>) ...", waits (logging again every few minutes) and then reads
the entry the holder wrote. The OS drops a lock when its process dies, however it dies, so a killed job never
blocks the others: the lock FILE that may stay behind holds no lock and is simply locked again. Callers write
their entries atomically and verify them on load, so a dead holder's partial output is never read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from bise_cli.core.errors import BiseError

log = logging.getLogger(__name__)

DEFAULT_WAIT_MINUTES = 24 * 60.0  # a paper-scale vanilla training on a slow node takes hours
REPORT_EVERY_S = 300.0  # how often a waiting job says it is still waiting


def lock_path(path: str | Path) -> Path:
    """The lock file of the cache entry at `path`."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def compute_lock(path: str | Path, what: str, wait_minutes: float = DEFAULT_WAIT_MINUTES) -> Iterator[bool]:
    """Hold the lock of the cache entry at `path` while the body runs; yields True when another job held it first
    (the caller should then look for the entry that job wrote before computing it again).

    BiseError when the lock is still held after `wait_minutes` (the holder is alive but slower than that)."""
    file = lock_path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock belongs to the process (a stage may run in a worker thread).
    lock = FileLock(str(file), thread_local=False)
    waited = False
    try:
        lock.acquire(blocking=False)
    except Timeout:
        waited = True
        started = time.monotonic()
        deadline = started + wait_minutes * 60.0
        log.info("waiting for %s being computed by another job (lock %s) ...", what, file)
        while True:
            try:
                lock.acquire(timeout=max(0.0, min(REPORT_EVERY_S, deadline - time.monotonic())))
                break
            except Timeout:
                if time.monotonic() >= deadline:
                    raise BiseError(f"{what} is still being computed by another job after {wait_minutes:g} min "
                                    f"(lock {file}); raise cache_wait_minutes, or run with cache=false to compute "
                                    "it in this job") from None
                log.info("still waiting for %s (%.0f min so far, lock %s)", what,
                         (time.monotonic() - started) / 60.0, file)
        log.info("lock %s released after %.1f s of waiting", file, time.monotonic() - started)
    try:
        yield waited
    finally:
        lock.release()
