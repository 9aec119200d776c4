"""Stage-cache locks between processes: a job waits for another job computing the same entry and reuses it;
a killed holder (SIGKILL) or a stale lock file blocks nobody; a holder that outlives the wait is one clear error."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.core.locking import lock_path
from bise_cli.run.cache import StageCache

KEY = {"stage": "vanilla", "data": "abc", "seed": 0}

# A second process computing an entry: it takes the entry's lock as StageCache does, says so, and lets go once
# the file `go` exists (or never: the test kills it). It imports no torch, so it starts in a fraction of a second;
# the test writes the holder's result itself (StageCache.save) before saying go.
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bise_cli.core.locking import compute_lock
    entry, started, go = (Path(a) for a in sys.argv[1:4])
    with compute_lock(entry, "vanilla"):
        started.write_text("holding")
        while not go.exists():
            time.sleep(0.02)
""")


def start_holder(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The holder process, once it holds the lock of KEY's entry; returns it and its `go` file."""
    started, go = tmp_path / "started", tmp_path / "go"
    entry = StageCache(tmp_path / "cache").key_path("vanilla", KEY)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(started), str(go)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while not started.exists():
        assert holder.poll() is None, "the holder process died before taking the lock"
        assert time.monotonic() < deadline, "the holder process never took the lock"
        time.sleep(0.02)
    return holder, go


class Waiter(threading.Thread):
    """get_or_compute of KEY in a thread of this process (another process than the holder)."""

    def __init__(self, cache: StageCache):
        super().__init__(daemon=True)
        self.cache, self.calls, self.value = cache, 0, None

    def compute(self):
        self.calls += 1
        return {"by": "waiter"}

    def run(self):
        self.value = self.cache.get_or_compute("vanilla", KEY, self.compute)


def wait_for_log(caplog, text: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"never logged {text!r}; log:\n{caplog.text}"
        time.sleep(0.02)


def test_waiter_reuses_what_the_holder_computed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    holder, go = start_holder(tmp_path)
    waiter = Waiter(StageCache(tmp_path / "cache"))
    waiter.start()
    wait_for_log(caplog, "waiting for vanilla being computed by another job (lock ")
    assert waiter.is_alive() and waiter.calls == 0  # blocked, not computing
    StageCache(tmp_path / "cache").save("vanilla", KEY, {"by": "holder"})  # what the holder computed
    go.write_text("go")
    assert holder.wait(120) == 0
    waiter.join(120)
    assert waiter.value == {"by": "holder"} and waiter.calls == 0
    assert "reused the result another job computed" in caplog.text


def test_killed_holder_does_not_block_and_its_work_is_redone(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    holder, _ = start_holder(tmp_path)  # never told to go: it holds the lock until killed
    with pytest.raises(BiseError, match=r"still being computed by another job after 0.005 min \(lock .*\.lock\)"):
        StageCache(tmp_path / "cache", wait_minutes=0.005).get_or_compute("vanilla", KEY, lambda: {"by": "x"})
    # The timed-out call above logged the same "waiting" line: forget it, so that the holder is killed only once
    # the waiter itself waits (otherwise a waiter thread started late finds the lock free and never waits).
    caplog.clear()
    waiter = Waiter(StageCache(tmp_path / "cache"))
    waiter.start()
    wait_for_log(caplog, "waiting for vanilla being computed by another job")
    holder.send_signal(signal.SIGKILL)
    holder.wait(120)
    waiter.join(120)
    assert not waiter.is_alive() and waiter.calls == 1 and waiter.value == {"by": "waiter"}
    assert "the other job left no result (it failed or was killed); computing it here" in caplog.text
    # The dead holder's lock file is still there and blocks nobody; the entry is the waiter's.
    cache = StageCache(tmp_path / "cache")
    assert lock_path(cache.key_path("vanilla", KEY)).is_file()
    assert cache.load("vanilla", KEY) == {"by": "waiter"}


def test_stale_lock_file_is_not_waited_for(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = StageCache(tmp_path / "cache", wait_minutes=0.001)
    stale = lock_path(cache.key_path("vanilla", KEY))
    stale.parent.mkdir(parents=True)
    stale.write_text("12345")  # what a lock file left by a dead job may hold
    assert cache.get_or_compute("vanilla", KEY, lambda: {"by": "me"}) == {"by": "me"}
    assert "waiting" not in caplog.text


SHARED = ["experiment=smoke", "stages=[vanilla]", "threads=1"]


def vanilla_entry(overrides: list[str], output_root: Path) -> Path:
    """Where the runs of `overrides` cache their vanilla model (the key holds the fingerprint of the data)."""
    import torch

    from bise_cli.run import pipeline, stages
    from bise_cli.run.fingerprint import fingerprint_bundle

    from conftest import compose_config

    cfg = compose_config([*overrides, f"output_root={output_root}"])
    bundle = pipeline.load_data(cfg)
    cache = StageCache(stages.cache_root(cfg))
    ctx = stages.Context(cfg, bundle, torch.device("cpu"), cache, None, fingerprint_bundle(bundle)["sha256"])
    return cache.key_path("vanilla", ctx.train_key())


@pytest.mark.slow
def test_parallel_sweep_trains_the_shared_vanilla_once(tmp_path):
    """Two jobs of a joblib sweep (two processes) that share one vanilla model: one trains it, the other waits and
    reuses it. The test holds the vanilla's lock until both jobs wait for it, so they really run at once."""
    from filelock import FileLock

    out = tmp_path / "out"
    entry = vanilla_entry(SHARED, out)
    lock = FileLock(str(lock_path(entry)), thread_local=False)
    entry.parent.mkdir(parents=True)
    lock.acquire()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "bise_cli", "run", "-m", "hydra/launcher=local_parallel", *SHARED,
         "leakage_probe.epochs=1,2", f"output_root={out}"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600
        while len([log for log in out.glob("sweeps/smoke/*/run.log") if "waiting for vanilla" in log.read_text()]) < 2:
            assert sweep.poll() is None, f"the sweep ended before its jobs waited:\n{sweep.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the jobs never waited for the vanilla's lock"
            time.sleep(0.1)
    finally:
        lock.release()
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output[-3000:]
    logs = [log.read_text() for log in sorted(out.glob("sweeps/smoke/*/run.log"))]
    trained = [text for text in logs if "vanilla: 1 epochs of" in text]  # what bise_cli.method.train logs as it starts
    assert len(logs) == 2 and len(trained) == 1
    [reused] = [text for text in logs if text not in trained]
    assert "vanilla from cache: reused the result another job computed" in reused
    records = [read_jsonl(p) for p in sorted(out.glob("sweeps/smoke/*/metrics.jsonl"))]
    assert [len(r) for r in records] == [1, 1]
    assert records[0][0]["train_seconds"] == records[1][0]["train_seconds"]  # one training, reported by both
