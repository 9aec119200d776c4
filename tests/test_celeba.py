"""CelebA: the three annotation layouts, BISE's split arithmetic, the image cache and a preset pipeline run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from bise_cli.core.errors import BiseError
from bise_cli.data.augment import hflip
from bise_cli.data.celeba import build, make_splits, read_tables
from bise_cli.run import pipeline

from conftest import compose_config

ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
# (partition, Blond_Hair, Male) -> count; smallest partition-0 group 12 -> m = floor(2.4) = 2 per group
COUNTS = {(0, 0, 0): 20, (0, 0, 1): 18, (0, 1, 0): 15, (0, 1, 1): 12,
          (1, 0, 0): 5, (1, 0, 1): 4, (1, 1, 0): 4, (1, 1, 1): 3, (2, 0, 0): 2}


def _rows():
    rows = []
    for (part, blond, male), n in COUNTS.items():
        rows += [(part, blond, male)] * n
    order = np.random.default_rng(0).permutation(len(rows))
    return [(f"{i + 1:06d}.jpg", *rows[j]) for i, j in enumerate(order)]


def _write_images(folder, names, size=(178, 218)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def write_layout(root, layout):
    rows = _rows()

    def values(blond, male):
        return [1, 1 if blond else -1, 1 if male else -1, -1]

    if layout == "torchvision":
        base = root / "celeba"
        base.mkdir(parents=True)
        lines = [str(len(rows)), " ".join(ATTRS)]
        lines += [f"{n}  " + " ".join(f"{v:2d}" for v in values(b, m)) for n, _, b, m in rows]
        (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p, _, _ in rows))
        images = base / "img_align_celeba"
    elif layout == "kaggle":
        base = root
        base.mkdir(parents=True, exist_ok=True)
        lines = ["image_id," + ",".join(ATTRS)] + [f"{n}," + ",".join(map(str, values(b, m))) for n, _, b, m in rows]
        (base / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        partition = "".join(f"{n},{p}\n" for n, p, _, _ in rows)
        (base / "list_eval_partition.csv").write_text("image_id,partition\n" + partition)
        images = base / "img_align_celeba" / "img_align_celeba"
    else:
        base = root
        base.mkdir(parents=True, exist_ok=True)
        lines = ["image " + " ".join(ATTRS)] + [f"{n} " + " ".join(map(str, values(b, m))) for n, _, b, m in rows]
        (base / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        (base / "list_eval_partition.csv").write_text("image,split\n" + "".join(f"{n},{p}\n" for n, p, _, _ in rows))
        images = base / "img_align_celeba"
    _write_images(images, [n for n, p, _, _ in rows if p < 2])   # partition 2 is never read
    return root


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {layout: write_layout(tmp_path_factory.mktemp(layout), layout)
            for layout in ("torchvision", "kaggle", "eidos")}


def test_split_arithmetic():
    import pandas as pd
    table = pd.DataFrame(_rows(), columns=["image", "partition", "Blond_Hair", "Male"])
    splits = make_splits(table, seed=0)
    assert len(splits["val"]) == 4 * 2                     # m = floor(0.2 * 12) = 2 per group
    assert len(splits["train"]) == 65 - 8                  # partition 0 minus val
    assert len(splits["test"]) == 4 * 3 and len(splits["test_conflicting"]) == 6   # m' = 3 (smallest group)
    assert not set(splits["val"]["image"]) & set(splits["train"]["image"])
    assert set(splits["test"]["image"]) <= set(table.loc[table["partition"] == 1, "image"])
    for frame in (splits["val"], splits["test"]):
        assert (frame.groupby(["Blond_Hair", "Male"]).size().nunique()) == 1
    conflicting = splits["test_conflicting"]
    assert (conflicting["Blond_Hair"] == conflicting["Male"]).all()   # blond men, dark women
    # pandas .sample(random_state=seed): same seed, same picks; another seed, other picks.
    assert list(make_splits(table, 0)["val"]["image"]) == list(splits["val"]["image"])
    assert list(make_splits(table, 1)["val"]["image"]) != list(splits["val"]["image"])


@pytest.mark.parametrize("layout", ["torchvision", "kaggle", "eidos"])
def test_layouts_load(roots, layout, tmp_path):
    table, _, found, _ = read_tables(roots[layout])
    assert found == layout and len(table) == sum(COUNTS.values())
    bundle = build("files", roots[layout], seed=0, image_size=16, cache_dir=str(tmp_path / "cache"))
    assert {n: len(s) for n, s in bundle.splits.items()} == {"train": 57, "val": 8, "test": 12,
                                                             "test_conflicting": 6, "search": 57}
    train = bundle["train"]
    assert train.x.shape == (57, 3, 16, 16) and train.x.dtype == torch.uint8 and train.augment is hflip
    assert bundle.num_classes == 2 and bundle.nominal_rho is None
    # b = 1 - Male: aligned = blond women + dark men.
    assert int((train.y == train.b).sum()) == (15 - 2) + (18 - 2)
    assert bundle.info["groups"]["test_conflicting"] == {"y0_b0": 0, "y0_b1": 3, "y1_b0": 3, "y1_b1": 0}


def test_cache_and_invalidation(roots, tmp_path):
    root, cache = roots["eidos"], tmp_path / "cache"
    first = build("files", root, seed=0, image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob("celeba16-*.npy"))) == 1
    second = build("files", root, seed=0, image_size=16, cache_dir=str(cache))
    assert torch.equal(first["train"].x, second["train"].x) and len(list(cache.glob("*.npy"))) == 1
    name = read_tables(root)[0]["image"].iloc[0]
    path = root / "img_align_celeba" / name
    Image.fromarray(np.zeros((218, 178, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    third = build("files", root, seed=0, image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 2
    assert any(int(third[s].x.flatten(1).sum(1).min()) == 0 for s in ("train", "val", "test"))


def test_errors(roots, tmp_path):
    with pytest.raises(BiseError, match="does not exist"):
        build("files", tmp_path / "nowhere", seed=0, cache_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiseError, match="no CelebA annotations"):
        build("files", tmp_path / "empty", seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "list_attr_celeba.csv").write_text("filename;Blond_Hair\n")
    with pytest.raises(BiseError, match="unknown header"):
        build("files", bad, seed=0)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "list_attr_celeba.csv").write_text((roots["kaggle"] / "list_attr_celeba.csv").read_text())
    with pytest.raises(BiseError, match=r"missing .*list_eval_partition\.csv"):
        build("files", missing, seed=0)
    (missing / "list_eval_partition.csv").write_text((roots["kaggle"] / "list_eval_partition.csv").read_text())
    with pytest.raises(BiseError, match="missing .*img_align_celeba"):
        build("files", missing, seed=0)
    values = tmp_path / "values"
    values.mkdir()
    text = (roots["kaggle"] / "list_attr_celeba.csv").read_text().replace(",-1,", ",0,")
    (values / "list_attr_celeba.csv").write_text(text)
    (values / "list_eval_partition.csv").write_text((roots["kaggle"] / "list_eval_partition.csv").read_text())
    with pytest.raises(BiseError, match="must hold -1/1"):
        build("files", values, seed=0)
    with pytest.raises(BiseError, match="image_size"):
        build("files", roots["kaggle"], seed=0, image_size=3)


TINY = ["backbone.weights=none", "train.epochs=1", "pruning.tau_period=1", "pruning.tau_min=0.3",
        "pruning.head_pretrain_epochs=1", "pruning.head_refine_epochs=1", "finetune.epochs=1",
        "leakage_probe.epochs=1", "latency.repeats=1", "latency.warmup=0", "threads=1"]


def test_preset_pipeline(roots, tmp_path):
    cfg = compose_config(["experiment=paper/celeba", f"dataset.root={roots['torchvision']}", "dataset.image_size=32",
                          f"output_root={tmp_path / 'outputs'}", *TINY])
    assert cfg["pruning"]["selection"] == "best_val" and cfg["train"]["lr"] == 1e-4
    assert cfg["train"]["scheduler"] == "none" and cfg["backbone"]["name"] == "resnet18"
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == cfg["stages"]
    assert {"dfr_train", "lff"} <= set(cfg["stages"])  # the baselines run wherever the data allows
