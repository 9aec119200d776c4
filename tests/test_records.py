"""Atomic files, the stage cache and the run directory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bise_cli.core.files import read_jsonl, save_torch, write_json, write_jsonl
from bise_cli.run.records import RunDir, config_hash


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


@pytest.mark.parametrize("content", [b"\xff\xfe binary", b"[1, 2]", b'{"state": "do'])
def test_an_unreadable_status_reads_as_no_status(tmp_path, content):
    run = RunDir(tmp_path / "run")
    run.file("status.json").write_bytes(content)
    assert run.status() == {} and run.finished_records("any") is None


def test_finished_records_are_verified_against_their_checksum(tmp_path):
    run = RunDir(tmp_path / "run")
    run.add_record({"stage": "vanilla", "acc": 0.5})
    run.add_record({"stage": "bise", "acc": 0.7})
    run.finish("abc")
    assert [r["stage"] for r in run.finished_records("abc")] == ["vanilla", "bise"]
    assert run.finished_records("other settings") is None
    path = run.file("metrics.jsonl")
    path.write_text(path.read_text().replace("0.7", "0.9"))  # edited after the run finished
    assert run.finished_records("abc") is None


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


def test_overrides_of_settings_that_never_change_a_result_are_not_record_keys():
    from bise_cli.run.records import make_record

    cfg = {"seed": 1, "logger": {"name": "mlflow"}, "threads": 1,
           "record_keys": {"logger": "mlflow", "threads": 1, "seed": 1, "ablation": "ce"}}
    record = make_record("vanilla", {"acc": 0.5}, cfg)
    assert "logger" not in record and "threads" not in record  # tables would split rows by them
    assert record["seed"] == 1 and record["ablation"] == "ce" and record["keys"] == ["seed", "ablation"]


def test_record_keys_are_compared_with_the_config_as_composed_values():
    from bise_cli.core.errors import BiseError
    from bise_cli.run.records import check_record_keys, record_fields

    cfg = {"seed": 0, "dataset": {"name": "table", "bias_columns": ["colour"], "cache_dir": "x", "image_size": None},
           "record_keys": {"dataset.bias_columns": ["colour"], "dataset.image_size": None, "grid": [[1, 2], [3]],
                           "extra": {"a": 1}}}
    fields = record_fields(cfg)
    assert fields["dataset.bias_columns"] == '["colour"]' and fields["grid"] == "[[1,2],[3]]"
    assert fields["dataset.image_size"] is None and fields["extra.a"] == 1 and fields["dataset"] == "table"
    assert "dataset.cache_dir" not in fields  # where files are, not what they hold
    cfg["record_keys"] = {"dataset.bias_columns": ["gender"]}
    with pytest.raises(BiseError, match=r"""record_keys.dataset.bias_columns='\["gender"\]' contradicts the config """
                                        r"""value '\["colour"\]'"""):
        check_record_keys(cfg)
