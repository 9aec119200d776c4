"""Regression tests: results that used to be silently wrong are now correct or one clear failure.

Each case below finished with exit code 0 and a wrong or stale result before the stage cache was keyed on the
data and checkpoint contents, checksummed and loaded safely, before divergence failed a stage, and before a
run's records were verified on re-runs.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.models import build_backbone
from bise_cli.run import pipeline
from bise_cli.run.records import make_record

from conftest import TINY_OVERRIDES, compose_config, without_timing, write_idx


def _cfg(tmp_path, *extra: str) -> dict:
    return compose_config([*TINY_OVERRIDES, f"output_root={tmp_path / 'outputs'}", *extra])


def _entries(tmp_path, stage: str) -> list:
    return sorted((tmp_path / "outputs" / "cache" / stage).glob("*.pt"))


def _idx_folder(folder, seed: int):
    """Four MNIST IDX files of random binary digits (same sizes and labels for every seed)."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for stem, n in (("train", 300), ("t10k", 100)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255,
                  compress=False)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)
    return folder


def test_another_checkpoint_of_the_same_size_at_the_same_path_is_not_reused(tmp_path):
    path = tmp_path / "vanilla.pt"
    metrics = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(build_backbone("simple_convnet", 10, width=0.125).state_dict(), path)
        records = pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={path}"), tmp_path / f"r{seed}")
        metrics.append(records[0])
    assert len(_entries(tmp_path, "vanilla_metrics")) == 2
    assert metrics[0]["group_acc"] != metrics[1]["group_acc"] or metrics[0]["leakage"] != metrics[1]["leakage"]


def test_another_data_root_with_other_images_is_not_reused(tmp_path):
    records = [pipeline.run(_cfg(tmp_path, "stages=[vanilla]", "dataset.source=files", "dataset.max_samples=null",
                                 f"dataset.root={_idx_folder(tmp_path / name, seed)}"), tmp_path / f"run_{name}")
               for name, seed in (("a", 0), ("b", 1))]
    assert records[0][0]["data_sha256"] != records[1][0]["data_sha256"]
    assert len(_entries(tmp_path, "vanilla")) == 2  # trained twice: the second root did not hit the first's entry
    summary = json.loads((tmp_path / "run_b" / "data_summary.json").read_text())
    assert summary["fingerprint"]["sha256"] == records[1][0]["data_sha256"]


def test_a_garbled_cache_entry_warns_and_is_recomputed(tmp_path, caplog):
    first = pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "a")
    for stage in ("vanilla", "vanilla_metrics"):
        (entry,) = _entries(tmp_path, stage)
        data = bytearray(entry.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(8)  # same size, different bytes (a truncated file is the easy case)
        entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        second = pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "b")
    assert "failed its checksum" in caplog.text
    assert without_timing(second) == without_timing(first)


def test_a_planted_cache_file_is_not_executed(tmp_path):
    pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "a")
    (entry,) = _entries(tmp_path, "vanilla_metrics")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"payload": Payload()}, entry)
    sidecar = entry.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(entry.read_bytes()).hexdigest()  # even with a matching checksum
    sidecar.write_text(json.dumps(meta))
    records = pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "b")
    assert not marker.exists() and records[0]["stage"] == "vanilla"


@pytest.mark.parametrize("overrides, message, stage", [
    (["stages=[vanilla]", "train.lr=1e6"], "vanilla diverged", "vanilla"),
    (["stages=[vanilla,reweighted_ft]", "finetune.lr=1e8"], "reweighted_ft diverged", "reweighted_ft"),
    (["stages=[vanilla]", "leakage_probe.lr=1e30"], "leakage probe diverged", "vanilla_metrics"),
])
def test_divergence_fails_the_stage_and_caches_nothing(tmp_path, overrides, message, stage):
    with pytest.raises(BiseError, match=message):
        pipeline.run(_cfg(tmp_path, *overrides), tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and message in status["error"]
    assert not _entries(tmp_path, stage)


@pytest.mark.parametrize("damage", ["lost_lines", "truncated_line"])
def test_a_finished_run_with_damaged_records_is_redone_from_the_caches(tmp_path, damage):
    cfg = _cfg(tmp_path, "stages=[vanilla,bise,random]")
    first = pipeline.run(cfg, tmp_path / "run")
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" if damage == "lost_lines" else "\n".join(lines)[:-20])
    again = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in again] == ["vanilla", "bise", "random"]
    assert without_timing(read_jsonl(path)) == without_timing(first)


def test_a_missing_device_is_refused_before_a_finished_run_is_shown(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be exercised")
    pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "run")
    with pytest.raises(BiseError, match="device=cuda"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", "device=cuda"), tmp_path / "run")


def test_latency_records_name_the_device_that_measured_them(tmp_path):
    (record,) = pipeline.run(_cfg(tmp_path, "stages=[vanilla]"), tmp_path / "run")
    assert record["latency_device"] == "cpu" and record["latency_ms_b1"] > 0


def test_record_keys_cannot_rewrite_reserved_fields(tmp_path):
    with pytest.raises(BiseError, match="reserved record field"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", "+record_keys.stage=bise_ft"), tmp_path / "run")
    with pytest.raises(BiseError, match="reserved record field"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", "+record_keys.acc=1"), tmp_path / "run")


def test_records_carry_the_whole_config_however_the_command_was_typed():
    typed = compose_config([*TINY_OVERRIDES, "rho=0.9", "pruning.gamma=1.0"])  # both equal the preset's values
    plain = compose_config(TINY_OVERRIDES)
    a, b = make_record("bise", {"acc": 0.5}, typed), make_record("bise", {"acc": 0.5}, plain)
    assert a == b
    assert {"rho", "seed", "dataset", "backbone", "pruning.gamma", "train.lr", "reweighting"} <= set(a["keys"])
    assert "device" not in a and "output_root" not in a  # where and on what it ran does not change a result


@pytest.mark.parametrize("content", [[1, 2, 3], {"weights": "not a tensor"}])
def test_a_checkpoint_that_is_not_a_state_dict_is_one_clear_error(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(BiseError, match="is not a state dict"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={path}"), tmp_path / "run")
