"""Issue 18, the user-data surfaces: every case a hostile or faulty input once got through, as a regression test
through the real command line (`python -m bise_cli ...` in a subprocess). Manifests are tiny generated images
(tests/test_table_data.py's fixtures); runs use tiny settings; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_table_data import TINY, write_table

from bise_cli.core.files import read_jsonl

from conftest import TINY_OVERRIDES, bise_env, compose_config, run_bise

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit 2 and exactly one line on stderr that holds every fragment; returns it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def table_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """A `dataset=table` command line on folder/manifest.csv, writing under `out`."""
    return ["dataset=table", f"dataset.manifest={folder / 'manifest.csv'}", "dataset.bias_columns=place",
            f"output_root={out}", "dataset.workers=1", *extra]


@pytest.fixture
def table(tmp_path):
    """A manifest of 58 8x8 PNGs (tests/test_table_data.py's COUNTS)."""
    folder = tmp_path / "data"
    return folder, write_table(folder)


# ------------------------------------------------------------------------------------ 1. stale finished runs

def test_a_finished_run_is_redone_when_its_data_changed(tmp_path):
    """Case 1: an image changed in place (same size and mtime: uncompressed BMPs) or labels swapped in the
    manifest redo the finished run; unchanged data is still 'already done'."""
    data = tmp_path / "data"
    frame = write_table(data, size=(28, 28), fmt="bmp")
    args = ["run", *table_args(data, tmp_path / "out", "stages=[vanilla]", f"hydra.run.dir={tmp_path / 'run'}"),
            *TINY]
    ok(run_bise(*args, cwd=tmp_path))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["data_sha256"]
    assert status["state"] == "done" and status["data_sha256"] == first

    image = data / frame.loc[frame["split"] == "test", "path"].iloc[0]
    stat, size = image.stat(), image.stat().st_size
    Image.fromarray(np.full((28, 28, 3), 250, np.uint8)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == size and image.stat().st_mtime_ns == stat.st_mtime_ns
    changed = ok(run_bise(*args, cwd=tmp_path))
    assert "already done" not in changed.stdout + changed.stderr
    assert "the data changed since the run finished" in changed.stdout + changed.stderr
    second = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["data_sha256"]
    assert second != first and json.loads((tmp_path / "run" / "status.json").read_text())["data_sha256"] == second

    # Swap the labels of two training rows of different classes in the same place: same groups, other data.
    manifest = pd.read_csv(data / "manifest.csv")
    a = manifest.index[(manifest["split"] == "train") & (manifest["target"] == "landbird")
                       & (manifest["place"] == "land")][0]
    b = manifest.index[(manifest["split"] == "train") & (manifest["target"] == "waterbird")
                       & (manifest["place"] == "land")][0]
    manifest.loc[[a, b], "target"] = manifest.loc[[b, a], "target"].to_numpy()
    manifest.to_csv(data / "manifest.csv", index=False)
    swapped = ok(run_bise(*args, cwd=tmp_path))
    assert "already done" not in swapped.stdout + swapped.stderr
    third = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["data_sha256"]
    assert third not in (first, second)

    again = ok(run_bise(*args, cwd=tmp_path))   # nothing changed since: the finished run is reused
    assert "already done, skipping" in again.stdout + again.stderr


# ------------------------------------------------------------------------------------ 2. the image cache

def test_image_cache_built_twice_at_once_then_damaged_is_rebuilt(tmp_path):
    """Also-case (two builds at once) and case 2: two `bise data` building the same cache concurrently both
    succeed and leave no partial files; rows zeroed in the cache afterwards fail its checksum and are rebuilt."""
    data = tmp_path / "data"
    write_table(data)
    env = bise_env(OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-m", "bise_cli", "data",
                              *table_args(data, tmp_path / "out", f"hydra.run.dir={tmp_path / f'data{i}'}")],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
    cache = tmp_path / "out" / "cache" / "data"
    [array] = cache.glob("table*.npy")
    # The build lock's file may stay (an OS lock, released with its holder; an empty file is no lock).
    assert sorted(p.name for p in cache.iterdir() if p.suffix != ".lock") == \
        sorted([array.name, array.with_suffix(".json").name]), \
        "partial or progress files left behind"
    original = array.read_bytes()

    damaged = np.load(array, mmap_mode="r+")
    damaged[:5] = 0
    damaged.flush()
    del damaged
    assert array.read_bytes() != original
    rerun = ok(run_bise("data", *table_args(data, tmp_path / "out", f"hydra.run.dir={tmp_path / 'data2'}"),
                        cwd=tmp_path))
    assert "fails its checksum (changed since it was written); rebuilding" in rerun.stdout + rerun.stderr
    assert json.loads((tmp_path / "data2" / "summary.json").read_text())["info"]["image_cache_hit"] is False
    assert array.read_bytes() == original
    hit = ok(run_bise("data", *table_args(data, tmp_path / "out", f"hydra.run.dir={tmp_path / 'data3'}"),
                      cwd=tmp_path))
    assert json.loads((tmp_path / "data3" / "summary.json").read_text())["info"]["image_cache_hit"] is True
    assert "rebuilding" not in hit.stdout + hit.stderr


FILL = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from bise_cli.data.image_cache import cached_memmap
    calls = []
    def fill(a, b):
        calls.append(a)
        if sys.argv[2] == "die" and len(calls) == 3:
            os._exit(9)                     # killed after two chunks: no clean-up runs
        time.sleep(float(sys.argv[3]))
        return np.full((b - a, 2), a, np.uint8)
    while time.time() < float(sys.argv[4]):  # start together
        time.sleep(0.01)
    array, hit = cached_memmap(sys.argv[1], "t", "k" * 20, (6, 2), fill, chunk=1)
    print(hit, calls, array[:, 0].tolist())
""")


def _fill(cache, mode, pause, start):
    return subprocess.Popen([sys.executable, "-c", FILL, str(cache), mode, str(pause), str(start)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_image_cache_fills_at_once_and_after_a_kill(tmp_path):
    """The cache's own guarantees, with fills slow enough to overlap for sure: two processes filling the same
    cache at once both succeed with the same array and leave only it and its checksums; a fill killed after two
    chunks is resumed by the next process at row 2, which also removes what other dead fills left."""
    start = time.time() + 3
    both = [_fill(tmp_path / "a", "ok", 0.3, start) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    assert all(out.strip().endswith("[0, 1, 2, 3, 4, 5]") for out, _ in outputs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix != ".lock") == ["t-kkkkkkkkkkkkkkkkkkkk.json",
                                                                   "t-kkkkkkkkkkkkkkkkkkkk.npy"]

    killed = _fill(tmp_path / "b", "die", 0, 0)
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    assert any(p.name.startswith("t-kkkkkkkkkkkkkkkkkkkk.npy.partial-") for p in (tmp_path / "b").iterdir())
    from bise_cli.data.image_cache import _host
    # What other killed processes may leave: a partial file killed before its first chunk, a half-written
    # checksum file (the owner: a process that has exited).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "b" / f"t-kkkkkkkkkkkkkkkkkkkk.npy.partial-{_host()}-{gone.pid}").write_bytes(b"x")
    (tmp_path / "b" / f"t-kkkkkkkkkkkkkkkkkkkk.json.tmp-{_host()}-{gone.pid}").write_text("{")
    resumed = _fill(tmp_path / "b", "ok", 0, 0)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert out.strip() == "False [2, 3, 4, 5] [0, 1, 2, 3, 4, 5]"
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix != ".lock") == ["t-kkkkkkkkkkkkkkkkkkkk.json",
                                                                   "t-kkkkkkkkkkkkkkkkkkkk.npy"]


# ------------------------------------------------------------------------------------ 3. 16-bit images

def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    """Case 3: 16-bit grey PNGs (PIL mode I;16) decode to value * 255 / 65535, not to 255 for everything above
    255; 32-bit integer and float pixels are refused rather than clipped."""
    data = tmp_path / "data"
    frame = write_table(data, size=(8, 8))
    values = {}
    for i, name in enumerate(frame["path"]):
        value = (i * 1103) % 65536
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(data / name)
        values[i] = value
    assert Image.open(data / frame["path"][0]).mode == "I;16"
    ok(run_bise("data", *table_args(data, tmp_path / "out", f"hydra.run.dir={tmp_path / 'd'}"), cwd=tmp_path))
    [array] = (tmp_path / "out" / "cache" / "data").glob("table*.npy")
    pixels = np.load(array)[:, :, 0, 0]     # every file opens, so the cache holds every row in manifest order
    expected = np.array([round(values[i] * 255 / 65535) for i in range(len(frame))])
    assert np.array_equal(pixels, np.stack([expected] * 3, 1)), "16-bit values were not scaled to 0..255"

    from bise_cli.data.table import to_rgb
    for mode, array_ in (("I", np.full((4, 4), 70000, np.int32)), ("F", np.full((4, 4), 0.5, np.float32))):
        with pytest.raises(ValueError, match=f"mode {mode}"):
            to_rgb(Image.fromarray(array_, mode))


# ------------------------------------------------------------------------------------ 4. label values as text

def write_coded(folder: Path) -> pd.DataFrame:
    """A manifest whose target is "01" / "1" and whose bias columns hold "01", "1", "2" and "NA", "None"."""
    rows = []
    for split, per_group in (("train", 5), ("test", 1)):   # 5: a derived val of floor(0.2 x 5) = 1 per group
        for target in ("01", "1"):
            for bg in ("01", "1", "2"):
                for nb in ("NA", "None"):
                    rows += [{"target": target, "bg": bg, "nb": nb, "split": split}] * per_group
    (folder / "images").mkdir(parents=True)
    for i, row in enumerate(rows):
        row["path"] = f"images/{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / row["path"])
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "manifest.csv", index=False)
    return frame


def test_label_and_bias_values_are_mapped_exactly(tmp_path):
    """Case 4: "01", "1" and "2" are three bias values and "01" / "1" two classes (not [1, 2] and one class);
    "NA" and "None" are values unless dataset.missing_values names them."""
    data = tmp_path / "data"
    write_coded(data)
    base = ["dataset=table", f"dataset.manifest={data / 'manifest.csv'}", f"output_root={tmp_path / 'out'}",
            "dataset.workers=1"]
    ok(run_bise("data", *base, "dataset.bias_columns=[bg,nb]", f"hydra.run.dir={tmp_path / 'd'}", cwd=tmp_path))
    info = json.loads((tmp_path / "d" / "summary.json").read_text())["info"]
    assert info["class_names"] == ["01", "1"]
    assert info["bias_values"] == {"bg": ["01", "1", "2"], "nb": ["NA", "None"]}
    assert info["bias_alignment"]["bg"] == {"01": "01", "1": "1"}
    missing = run_bise("data", *base, "dataset.bias_columns=[bg,nb]", "dataset.missing_values=[NA]",
                       f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    one_line_error(missing, "column 'nb' is empty in 36 row(s)")


# ------------------------------------------------------------------------------------ 6. label noise

@pytest.mark.parametrize("value", ["-0.1", "abc"])
def test_label_noise_outside_0_1_is_refused_before_anything_runs(tmp_path, value):
    """Case 6: -0.1 was accepted (noise 0, recorded -0.1) and abc was a traceback (1.0 is refused by the same
    check)."""
    result = run_bise("run", *TINY_OVERRIDES, f"dataset.label_noise={value}", "output_root=out", cwd=tmp_path)
    shown = repr(float(value)) if value != "abc" else "'abc'"
    one_line_error(result, "dataset.label_noise must be a number in [0, 1)", f"got {shown}")
    assert not list((tmp_path / "out").rglob("status.json")) and not (tmp_path / "out" / "cache").exists()


# ------------------------------------------------------------------------------------ 7. bise table

def _record(seed: int, data: str, acc: float) -> dict:
    return {"stage": "vanilla", "keys": ["dataset", "seed"], "dataset": "table", "seed": seed,
            "data_sha256": data * 64, "acc": acc}


def test_table_never_averages_one_seed_on_two_datasets(tmp_path):
    """Case 7: two runs of seed 0 on different data were "n = 2 over seeds"; they are split by data_sha256, and
    a warning says why. Different seeds on the same data still average."""
    for name, records in (("old", [_record(0, "a", 0.5), _record(1, "a", 0.7)]), ("new", [_record(0, "b", 0.9)])):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = ok(run_bise("table", tmp_path / "runs", "--format", "csv", cwd=tmp_path))
    assert "records of the same seed on different data" in result.stderr and "split by data_sha256" in result.stderr
    table = pd.read_csv(tmp_path / "runs" / "table.csv", dtype={"data_sha256": str})
    assert sorted(zip(table["data_sha256"], table["n"], table["acc_mean"].round(3), strict=True)) == [
        ("a" * 12, 2, 0.6), ("b" * 12, 1, 0.9)]
    assert "split by data_sha256" in (tmp_path / "runs" / "table.md").read_text()

    from bise_cli.core.errors import BiseError
    from bise_cli.reporting.tables import compare_stages, load_records
    records = load_records(tmp_path / "runs")
    bise_rows = records.assign(stage="bise")
    with pytest.raises(BiseError, match="computed on different data: separate them with --by ... data_sha256"):
        compare_stages(pd.concat([records, bise_rows], ignore_index=True), "vanilla", "bise")


def test_table_into_an_unwritable_folder_is_one_line(tmp_path):
    """Also-case: `bise table` on a folder it cannot write was a traceback (a file where the folder should be
    fails like a read-only folder, also for root)."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text(json.dumps(_record(0, "a", 0.5)) + "\n")
    (tmp_path / "blocker").write_text("a file")
    result = run_bise("table", tmp_path / "runs", "--out", tmp_path / "blocker" / "tables", cwd=tmp_path)
    one_line_error(result, f"output folder {tmp_path / 'blocker' / 'tables'} is not writable")


# ------------------------------------------------------------------------------------ 10. columns

@pytest.mark.parametrize("column, message", [
    ("target", "dataset.target_column='target' is also the input column"),
    ("place", "dataset.bias_columns: 'place' is also the input or target column"),
])
def test_input_column_equal_to_target_or_bias_is_refused(table, tmp_path, column, message):
    """Case 10: dataset.input_column=target (the answer fed in as text) was accepted."""
    data, _ = table
    result = run_bise("data", *table_args(data, tmp_path / "out", f"dataset.input_column={column}",
                                          f"hydra.run.dir={tmp_path / 'd'}"), cwd=tmp_path)
    one_line_error(result, message)


@pytest.mark.parametrize("column, clash", [("head", "leakage_head"), ("head_vanilla", "leakage_head")])
def test_a_bias_column_whose_leakage_key_reads_as_another_metric_is_refused(table, tmp_path, column, clash):
    """A bias column named `head` would record the fresh probe's per-attribute leakage as `leakage_head`, the key
    of BISE's own bias-head metric (one would overwrite the other in the record): refused in one line, before
    anything is read."""
    data, _ = table
    result = run_bise("data", *table_args(data, tmp_path / "out", f"dataset.bias_columns=[place,{column}]",
                                          f"hydra.run.dir={tmp_path / 'd'}"), cwd=tmp_path)
    one_line_error(result, f"dataset.bias_columns: a bias column named '{column}' would record its leakage as "
                           f"leakage_{column}, which reads as the metric {clash}; rename that column in the manifest")


def test_per_attribute_leakage_displays_as_the_bias_probe():
    """`leakage_left` is shown like `leakage` (a percentage, titled by its attribute), not as a raw undeclared
    number; `leakage_head_vanilla` like `leakage_head`."""
    from bise_cli.core.names import format_value, metric

    left = metric("leakage_left")
    assert left.title == "bias probe (left)" and left.scale == metric("leakage").scale
    assert format_value("leakage_left", 0.8854) == format_value("leakage", 0.8854)
    assert metric("leakage_head_vanilla").scale == metric("leakage_head").scale


# ------------------------------------------------------------------------------------ 11. round_to

def test_round_to_that_undoes_the_search_warns_and_records_both_sparsities(tmp_path):
    """Case 11: pruning.round_to=1000 turned all pruning off in silence; now a warning, and the bise record holds
    the units off before (sparsity_units_unrounded) and after (sparsity_units) rounding."""
    result = ok(run_bise("run", *TINY_OVERRIDES, "stages=[vanilla,bise]", "pruning.round_to=1000",
                         "pruning.gate_init=0.0", "pruning.mask_lr=1.0", "leakage_probe.epochs=0", "threads=1",
                         "output_root=out", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    [bise_record] = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "bise"]
    assert bise_record["sparsity_units_unrounded"] > 0, "the tiny search switched nothing off: no test"
    assert bise_record["sparsity_units"] < bise_record["sparsity_units_unrounded"] / 2
    assert "pruning.round_to=1000 takes the units switched off from" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------ 12. checkpoints

def _smoke_state() -> dict:
    from bise_cli.models import build_backbone

    cfg = compose_config(TINY_OVERRIDES)
    backbone = cfg["backbone"]
    model = build_backbone(backbone["name"], 10, **{k: v for k, v in backbone.items() if k != "name"})
    return model.state_dict()


def test_checkpoints_with_wrong_dtypes_or_no_bytes_are_one_line_and_optional_buffers_load(tmp_path):
    """Case 12 and two also-cases: integer or bool tensors where the model has floats were cast silently (the run
    then failed for a wrong cause); a zero-byte file was an IndexError; a checkpoint without BatchNorm's
    num_batches_tracked (which PyTorch's strict load accepts) was refused."""
    from safetensors.torch import save_file

    state = _smoke_state()
    floats = [k for k, v in state.items() if v.is_floating_point()]
    bad = {k: v.clone() for k, v in state.items()}
    bad[floats[0]] = bad[floats[0]].round().to(torch.int64)
    bad[floats[1]] = bad[floats[1]] > 0
    save_file(bad, str(tmp_path / "ints.safetensors"))
    run = ["run", *TINY_OVERRIDES, "stages=[vanilla]", "leakage_probe.epochs=0", "output_root=out"]
    line = one_line_error(run_bise(*run, f"vanilla_checkpoint={tmp_path / 'ints.safetensors'}", cwd=tmp_path),
                          "dtype mismatches 2", f"{floats[0]} int64 vs float32", f"{floats[1]} bool vs float32")
    assert "diverged" not in line

    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(run_bise(*run, f"vanilla_checkpoint={tmp_path / 'empty.pt'}", cwd=tmp_path),
                   "the file is empty (0 bytes)")
    gates = run_bise("gates", "backbone=torchvision", "backbone.arch=resnet18", "backbone.input_size=[3,32,32]",
                     f"backbone.weights={tmp_path / 'empty.pt'}", "classes=2", cwd=tmp_path)
    one_line_error(gates, "backbone.weights", "the file is empty (0 bytes)")

    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters
    torch.save({k: v for k, v in state.items() if k not in counters}, tmp_path / "old.pt")
    ok(run_bise(*run, f"vanilla_checkpoint={tmp_path / 'old.pt'}", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path))
    assert [r["stage"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == ["vanilla"]


def test_an_error_without_a_message_is_named_by_its_type(tmp_path):
    """torch.load of a two-byte pickle header raises an EOFError with no message: its type is the reason (the
    first line of an empty message was the IndexError)."""
    from bise_cli.core.errors import BiseError
    from bise_cli.models.checkpoints import read_state_dict

    path = tmp_path / "cut.pt"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(BiseError, match=r"^cannot read vanilla_checkpoint '.*cut\.pt': EOFError$"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------ folders and splits

def test_unwritable_run_or_sweep_folder_is_one_line(tmp_path):
    """Also-case: an unwritable hydra.run.dir was Hydra's PermissionError traceback though the README promises
    one line and exit 2 (a file where the folder should be fails the same way, also for root)."""
    (tmp_path / "blocker").write_text("a file")
    run = run_bise("run", *TINY_OVERRIDES, "output_root=out", f"hydra.run.dir={tmp_path / 'blocker' / 'run'}",
                   cwd=tmp_path)
    one_line_error(run, f"output folder {tmp_path / 'blocker' / 'run'} is not writable", "hydra.run.dir")
    sweep = run_bise("run", "-m", *TINY_OVERRIDES, "seed=0,1", "output_root=out",
                     f"hydra.sweep.dir={tmp_path / 'blocker' / 'sweep'}", cwd=tmp_path)
    one_line_error(sweep, "is not writable", "hydra.sweep.dir")
    assert not (tmp_path / "out").exists()


def test_skip_unreadable_that_drops_every_test_image_says_so(table, tmp_path):
    """Also-case: with skip_unreadable, a manifest whose test images are all broken said "mark test rows"."""
    data, frame = table
    for name in frame.loc[frame["split"] == "test", "path"]:
        (data / name).write_bytes(b"not an image")
    result = run_bise("data", *table_args(data, tmp_path / "out", "dataset.skip_unreadable=true",
                                          f"hydra.run.dir={tmp_path / 'd'}"), cwd=tmp_path)
    line = one_line_error(result, "every test image of the manifest (8) is unreadable and was skipped",
                          "dataset.skip_unreadable=true")
    assert "mark test rows" not in line
