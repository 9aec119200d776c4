"""Verified stage cache (checksums, key checks, weights-only loading, atomic writes) and data fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bise_cli.run.cache import StageCache
from bise_cli.run.fingerprint import fingerprint_bundle, fingerprint_file, fingerprint_split, fingerprint_tensors

KEY = {"dataset": "biased_mnist", "rho": 0.99, "seed": 1, "data": "abc123"}


def weights(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state_dict": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64)},
            "history": [{"epoch": 1, "loss": 0.5}], "seconds": 1.5, "note": None, "pair": (1, "a")}


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name])
    assert (a["history"], a["seconds"], a["note"], a["pair"]) == (b["history"], b["seconds"], b["note"], b["pair"])


@pytest.fixture
def cache(tmp_path):
    return StageCache(tmp_path / "cache")


def filled(cache) -> tuple[Counter, object]:
    """Cache one entry for KEY; returns its compute counter and path."""
    compute = Counter(weights())
    cache.get_or_compute("vanilla", KEY, compute)
    return compute, cache.key_path("vanilla", KEY)


def test_compute_once_then_cached(cache, caplog):
    compute, path = filled(cache)
    with caplog.at_level(logging.INFO, logger="bise_cli.run.cache"):
        value = cache.get_or_compute("vanilla", dict(reversed(KEY.items())), compute, describe="vanilla model")
    assert compute.calls == 1
    assert_same(value, weights())
    assert f"vanilla model from cache ({path})" in caplog.text
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["stage"] == "vanilla" and sidecar["key"] == KEY and sidecar["bise_cache_format"] == 1
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and sidecar["created"]
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_different_key_or_stage_recomputes(cache):
    compute, _ = filled(cache)
    cache.get_or_compute("vanilla", {**KEY, "seed": 2}, compute)
    cache.get_or_compute("other", KEY, compute)
    assert compute.calls == 3


def test_cached_none_is_a_hit(cache):
    compute = Counter(None)
    assert cache.get_or_compute("s", KEY, compute) is None
    assert cache.get_or_compute("s", KEY, compute) is None
    assert compute.calls == 1


def recomputes_correctly(cache, caplog, message: str | None) -> None:
    """The entry for KEY is not trusted: a fresh value is computed, returned, cached and warned about."""
    fresh = Counter(weights(1))
    with caplog.at_level(logging.WARNING, logger="bise_cli.run.cache"):
        assert_same(cache.get_or_compute("vanilla", KEY, fresh), weights(1))
    assert fresh.calls == 1
    if message:
        assert message in caplog.text
    assert_same(cache.get_or_compute("vanilla", KEY, fresh), weights(1))  # the rewritten entry verifies
    assert fresh.calls == 1


def test_garbled_file_fails_checksum(cache, caplog):
    _, path = filled(cache)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    assert len(data) == path.stat().st_size
    recomputes_correctly(cache, caplog, "failed its checksum")


def test_truncated_file_recomputes(cache, caplog):
    _, path = filled(cache)
    path.write_bytes(path.read_bytes()[:100])
    recomputes_correctly(cache, caplog, "failed its checksum")


def test_missing_or_garbage_sidecar_recomputes(cache, caplog):
    _, path = filled(cache)
    path.with_suffix(".json").unlink()
    recomputes_correctly(cache, caplog, "no valid sidecar")
    path.with_suffix(".json").write_text("{not json")
    recomputes_correctly(cache, caplog, "no valid sidecar")


def test_old_format_entry_recomputes(cache, caplog):
    path = cache.key_path("vanilla", KEY)
    path.parent.mkdir(parents=True)
    torch.save(weights(0), path)
    path.with_suffix(".json").write_text(json.dumps(KEY))  # what the previous cache wrote next to its .pt
    recomputes_correctly(cache, caplog, "no valid sidecar")


def test_sidecar_for_another_key_recomputes(cache, caplog):
    _, path = filled(cache)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "key": {**KEY, "seed": 7}}))
    recomputes_correctly(cache, caplog, "computed for another key")


class Planted:
    """Pickles to a call that creates `marker` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_not_executed(cache, caplog, tmp_path):
    marker = tmp_path / "pwned"
    path = cache.key_path("vanilla", KEY)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": Planted(marker)}, path)
    path.with_suffix(".json").write_text(json.dumps({
        "stage": "vanilla", "key": KEY, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bise_cache_format": 1, "created": "now"}))
    planted = path.read_bytes()
    recomputes_correctly(cache, caplog, "could not be loaded")
    assert not marker.exists()
    # The payload is live: an unrestricted load of the planted file does run it.
    path.write_bytes(planted)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_failing_compute_writes_nothing(cache):
    def boom():
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        cache.get_or_compute("vanilla", KEY, boom)
    # No entry: only the entry's lock file, which holds no lock once its process let go (it is locked again).
    assert [p.name for p in cache.root.rglob("*") if p.is_file()] == [cache.key_path("vanilla", KEY).name + ".lock"]


def test_disabled_cache_always_computes(tmp_path):
    cache = StageCache(tmp_path / "cache", enabled=False)
    compute = Counter(weights())
    cache.get_or_compute("vanilla", KEY, compute)
    cache.get_or_compute("vanilla", KEY, compute)
    assert compute.calls == 2 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value, name", [
    (torch.nn.Linear(2, 2), "Linear"),
    ({"metrics": {"acc": np.float64(0.5)}}, "float64"),
    ([1, {"f": lambda: 0}], "function"),
])
def test_non_plain_values_are_refused_before_writing(cache, value, name):
    with pytest.raises(TypeError, match=name):
        cache.get_or_compute("vanilla", KEY, lambda: value)
    assert not [p for p in cache.root.rglob("*") if p.is_file() and p.suffix != ".lock"]  # no entry written


def test_state_dict_round_trips(cache):
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict()
    cache.save("identification", KEY, state)
    loaded = cache.load("identification", KEY)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert cache.load("identification", {**KEY, "seed": 9}) is None


# ------------------------------------------------------------------------------------------------ fingerprints
def test_tensor_fingerprint_tracks_every_byte():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50)
    reference = fingerprint_tensors([x, y])
    assert fingerprint_tensors([x.clone(), y.clone()]) == reference
    changed = x.clone()
    changed[17, 1, 3, 5] ^= 1
    assert fingerprint_tensors([changed, y]) != reference
    assert fingerprint_tensors([x.transpose(2, 3).contiguous().transpose(2, 3), y]) == reference  # layout only


def test_tensor_fingerprint_includes_dtype_and_shape():
    x = torch.arange(24, dtype=torch.int32)
    assert fingerprint_tensors([x]) != fingerprint_tensors([x.view(torch.float32)])  # same bytes
    assert fingerprint_tensors([x]) != fingerprint_tensors([x.view(4, 6)])
    assert fingerprint_tensors([x[:12], x[12:]]) != fingerprint_tensors([x])
    assert fingerprint_tensors([torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bool)])


def test_file_fingerprint(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    payload = bytes(range(256)) * 9000  # spans several 1 MiB chunks
    a.write_bytes(payload)
    b.write_bytes(payload)
    c.write_bytes(payload[:-1] + b"\x00")
    assert fingerprint_file(a) == fingerprint_file(b) == hashlib.sha256(payload).hexdigest()
    assert fingerprint_file(c) != fingerprint_file(a)


def test_bundle_fingerprint():
    def split(seed):
        g = torch.Generator().manual_seed(seed)
        return SimpleNamespace(x=torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8),
                               y=torch.randint(0, 10, (20,), generator=g), b=torch.randint(0, 10, (20,), generator=g))

    train, test = split(0), split(1)
    result = fingerprint_bundle(SimpleNamespace(splits={"train": train, "search": train, "test": test}))
    assert result["splits"] == {"search": fingerprint_split(train), "train": fingerprint_split(train),
                                "test": fingerprint_split(test)}
    same = fingerprint_bundle(SimpleNamespace(splits={"test": split(1), "train": split(0), "search": split(0)}))
    assert same == result
    other = split(1)
    other.b = other.b.flip(0)
    assert fingerprint_bundle(SimpleNamespace(splits={"train": train, "search": train, "test": other}))["sha256"] \
        != result["sha256"]
    with_meta = SimpleNamespace(**vars(test), meta={"identities": torch.zeros(20, 3)})
    assert fingerprint_split(with_meta) != fingerprint_split(test)


def test_disabled_building_blocks(tmp_path):
    cache = StageCache(tmp_path / "cache", enabled=False)
    assert cache.save("s", KEY, {"a": 1}) is None and cache.load("s", KEY) is None
    assert not (tmp_path / "cache").exists()
