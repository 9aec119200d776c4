"""Atomic files, the stage cache and the run directory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bise_cli.records import RunDir, StageCache, config_hash, read_jsonl, save_torch, write_json, write_jsonl


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_json_writers_are_atomic_and_nan_safe(tmp_path):
    path = write_json(tmp_path / "x.json", {"v": math.nan, "t": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"v": None, "t": [1, 2]}
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"a": math.inf}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"a": 1}, {"a": None}]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    save_torch(path, {"ok": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_torch(path, Unpicklable())
    assert torch.load(path) == {"ok": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_stage_cache_round_trip_and_disabled(tmp_path):
    cache = StageCache(tmp_path)
    settings = {"stage": "vanilla", "seed": 0}
    assert cache.load("vanilla", settings) is None
    cache.save("vanilla", settings, {"w": torch.ones(2)})
    assert torch.equal(cache.load("vanilla", settings)["w"], torch.ones(2))
    assert json.loads(cache.path("vanilla", settings).with_suffix(".json").read_text()) == settings
    assert StageCache(tmp_path, enabled=False).load("vanilla", settings) is None
    cache.path("vanilla", settings).write_bytes(b"corrupt")
    assert cache.load("vanilla", settings) is None  # a corrupt entry is recomputed, not fatal


def test_run_dir_status_and_records(tmp_path):
    run = RunDir(tmp_path / "run")
    run.set_status("running")
    run.add_record({"stage": "vanilla", "acc": 0.5})
    run.add_record({"stage": "bise", "acc": 0.7})
    assert [r["stage"] for r in read_jsonl(run.file("metrics.jsonl"))] == ["vanilla", "bise"]
    try:
        raise ValueError("boom")
    except ValueError as error:
        run.fail(error)
    status = run.status()
    assert status["state"] == "failed" and status["error"] == "ValueError: boom" and "Traceback" in status["traceback"]
