"""Corrupted CIFAR-10: release reader, caching, quota rule, local build, corruptions, augmentation, pipeline."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bise_cli.core.errors import BiseError
from bise_cli.data import build_dataset
from bise_cli.data.augment import crop_flip, hflip, random_crop
from bise_cli.data.cifar10c import assign_corruptions, build, rho_folder
from bise_cli.data.corruptions import CORRUPTION_LISTS, CORRUPTIONS, corrupt
from bise_cli.run import pipeline

from conftest import compose_config

CIFAR_TRAIN_PER_CLASS = 5000


def _write_release(root, pct="1pct", n_align=3, n_conflict=1, n_test=2):
    """A DFA-format tree: <pct>/{align,conflict,valid}/<class>/<i>_<label>_<bias>.png and test/; 10 classes."""
    rng = np.random.default_rng(0)
    index = 0
    for folder, n, aligned in ((f"{pct}/align", n_align, True), (f"{pct}/conflict", n_conflict, False),
                               (f"{pct}/valid", 1, True), ("test", n_test, None)):
        for label in range(10):
            (root / folder / str(label)).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                bias = label if aligned or (aligned is None and k == 0) else (label + 1 + k) % 10
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / folder / str(label) / f"{index}_{label}_{bias}.png")
                index += 1
    return root


@pytest.fixture
def release(tmp_path):
    return _write_release(tmp_path / "data" / "cifar10c")


def test_rho_folders():
    assert [rho_folder(r) for r in (0.995, 0.99, 0.98, 0.95)] == ["0.5pct", "1pct", "2pct", "5pct"]
    with pytest.raises(BiseError, match=r"no folder for rho=0.9; allowed rho: 0.995 \(0.5pct\)"):
        rho_folder(0.9)


def test_release_reader_sizes_labels_and_cache(release, tmp_path):
    cache = tmp_path / "cache"
    for root in (release, release.parent):   # the folder itself or its parent (<root>/cifar10c/...)
        bundle = build("files", root, 0.99, seed=0, cache_dir=str(cache))
        assert set(bundle.splits) == {"train", "search", "test"} and bundle["search"] is bundle["train"]
        assert len(bundle["train"]) == 40 and len(bundle["test"]) == 20   # valid/ is ignored
    train = bundle["train"]
    assert train.x.shape == (40, 3, 32, 32) and train.x.dtype == torch.uint8
    assert int((train.y == train.b).sum()) == 30 and bundle.nominal_rho == (0.99,)
    assert bundle.bias_names == ("corruption",) and bundle.num_bias == 10 and bundle.info["folder"] == "1pct"
    # Pixels and labels match the files.
    first = sorted((release / "1pct" / "align" / "0").glob("*.png"))[0]
    assert torch.equal(train.x[0], torch.from_numpy(np.asarray(Image.open(first)).transpose(2, 0, 1).copy()))
    assert int(train.y[0]) == 0 and int(train.b[0]) == 0
    # encode normalises with the CIFAR statistics; augment is crop + flip.
    encoded = train.encode(train.x[:2])
    assert encoded.dtype == torch.float32 and abs(float(encoded.mean())) < 1.0 and train.augment is crop_flip
    # Second load comes from the cache; a changed file invalidates it.
    npz = sorted(cache.glob("cifar10c-1pct-train-*.npz"))
    assert len(npz) == 1
    target = sorted((release / "1pct" / "conflict" / "3").glob("*.png"))[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    again = build("files", release, 0.99, seed=0, cache_dir=str(cache))
    assert len(sorted(cache.glob("cifar10c-1pct-train-*.npz"))) == 2
    changed = [i for i in range(40) if not torch.equal(again["train"].x[i], train.x[i])]
    assert len(changed) == 1 and int(again["train"].x[changed[0]].sum()) == 0
    # A corrupted cache file fails its checksum and is rebuilt.
    newest = max(cache.glob("cifar10c-1pct-train-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    arrays = dict(np.load(newest))
    arrays["y"] = arrays["y"][::-1].copy()
    np.savez(newest, **arrays)
    assert torch.equal(build("files", release, 0.99, seed=0, cache_dir=str(cache))["train"].y, again["train"].y)


def test_release_errors(release, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(BiseError, match="no folder for rho"):
        build("files", release, 0.9, seed=0, cache_dir=cache)
    with pytest.raises(BiseError, match="no Corrupted CIFAR-10 release"):
        build("files", release, 0.95, seed=0, cache_dir=cache)   # 5pct is absent
    with pytest.raises(BiseError, match="does not exist"):
        build("files", tmp_path / "nowhere", 0.99, seed=0, cache_dir=cache)
    bad = release / "1pct" / "align" / "2" / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad)
    with pytest.raises(BiseError, match=r"cannot read label and bias from file name .*image\.png"):
        build("files", release, 0.99, seed=0, cache_dir=cache)
    bad.unlink()
    for path in (release / "test").rglob("*.png"):
        path.unlink()
    with pytest.raises(BiseError, match="no PNG files"):
        build("files", release, 0.99, seed=0, cache_dir=cache)
    with pytest.raises(BiseError, match="dataset.source"):
        build("internet", release, 0.99, seed=0)


# ------------------------------------------------------------------------------------------- quota rule

def test_quota_counts_on_cifar_class_counts():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), CIFAR_TRAIN_PER_CLASS))
    for rho, conflicting in ((0.995, 250), (0.99, 500), (0.98, 1000), (0.95, 2500)):
        bias = assign_corruptions(labels, rho)
        assert int((bias != labels).sum()) == conflicting
        counts = np.zeros((10, 10), int)
        np.add.at(counts, (labels, bias), 1)
        assert (np.diag(counts) == round(CIFAR_TRAIN_PER_CLASS * rho)).all()
    test = np.repeat(np.arange(10), 1000)
    counts = np.zeros((10, 10), int)
    np.add.at(counts, (test, assign_corruptions(test, 0.1)), 1)
    assert (counts == 100).all()   # every (class, corruption) cell: 1,000 aligned, 9,000 conflicting
    # Dataset order: the first class-y samples take corruption 0.
    ordered = assign_corruptions(np.zeros(20, int), 0.5)
    assert list(ordered[:10]) == [0] * 10 and list(ordered) == sorted(ordered)


# ------------------------------------------------------------------------------------------- corruptions

def test_corruptions_shape_dtype_range_determinism():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name in CORRUPTIONS:
        if name == "Frost":  # needs texture images: the frost tests below cover it with generated ones
            continue
        a = corrupt(images, name, np.random.default_rng(1))
        assert a.shape == images.shape and a.dtype == np.uint8, name
        assert np.array_equal(a, corrupt(images, name, np.random.default_rng(1))), name
        assert name == "Original" or not np.array_equal(a, images), name
    assert np.array_equal(corrupt(images, "Original", np.random.default_rng(0)), images)
    # A flat image stays flat under contrast and the blurs.
    flat = np.full((1, 32, 32, 3), 100, np.uint8)
    # (uint8 truncation as LfF's astype: 100 / 255 * 255 may come back as 99)
    for name in ("Contrast", "Gaussian Blur", "Defocus Blur"):
        assert np.isin(corrupt(flat, name, np.random.default_rng(0)), (99, 100)).all(), name
    with pytest.raises(BiseError, match="unknown corruption"):
        corrupt(images, "Rain", np.random.default_rng(0))
    assert len(CORRUPTION_LISTS["type0"]) == len(CORRUPTION_LISTS["type1"]) == 10


def _write_batches(root, n_per_batch=20, n_test=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    return root


def test_local_build(tmp_path, monkeypatch):
    root = _write_batches(tmp_path / "cifar")
    cache = str(tmp_path / "cache")
    bundle = build("build", root, 0.9, seed=0, cache_dir=cache)
    train, test = bundle["train"], bundle["test"]
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    assert int((train.y == train.b).sum()) == 90 and int((test.y == test.b).sum()) == 2
    assert bundle.info["corruption_names"][-1] == "Original" and not bundle.info["pixel_exact"]
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle)["data"].reshape(-1, 3, 32, 32)
    original = np.flatnonzero(train.b.numpy() == 9)   # "Original" keeps the pixels
    assert len(original) and all(np.array_equal(train.x[i].numpy(), raw[i]) for i in original if i < 20)
    again = build("build", root, 0.9, seed=0, cache_dir=cache)
    assert torch.equal(again["train"].x, train.x) and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    other = build("build", root, 0.9, seed=1, cache_dir=cache)
    assert torch.equal(other["train"].b, train.b) and not torch.equal(other["train"].x, train.x)
    (tmp_path / "no_textures").mkdir()
    monkeypatch.setenv("BISE_FROST_DIR", str(tmp_path / "no_textures"))  # type0 without Frost's textures
    with pytest.raises(BiseError, match="frost1.png"):
        build("build", root, 0.9, seed=0, corruptions="type0", cache_dir=cache)
    with pytest.raises(BiseError, match="no CIFAR-10 python batches"):
        build("build", tmp_path, 0.9, seed=0, cache_dir=cache)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(BiseError, match="missing .*data_batch_3"):
        build("build", root, 0.9, seed=0, cache_dir=cache)


# ------------------------------------------------------------------------------------------- augmentation

def test_augmentations_are_deterministic_and_change_images():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for fn in (crop_flip, hflip, random_crop):
        a = fn(x, torch.Generator().manual_seed(0))
        assert a.shape == x.shape and a.dtype == torch.uint8
        assert torch.equal(a, fn(x, torch.Generator().manual_seed(0)))
        assert not torch.equal(a, x) and not torch.equal(a, fn(x, torch.Generator().manual_seed(1)))
    flipped = hflip(x, torch.Generator().manual_seed(0))
    for i in range(16):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cropped = random_crop(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):   # each crop is a 32x32 window of the zero-padded image
        assert any(torch.equal(cropped[i], padded[i, :, t:t + 32, s:s + 32]) for t in range(9) for s in range(9))


# ------------------------------------------------------------------------------------------- pipeline

TINY = ["backbone.weights=none", "train.epochs=1", "pruning.tau_period=1", "pruning.tau_min=0.3",
        "pruning.head_pretrain_epochs=1", "pruning.head_refine_epochs=1", "finetune.epochs=1",
        "leakage_probe.epochs=1", "latency.repeats=1", "latency.warmup=0", "threads=1"]


def test_preset_config_and_pipeline(release, tmp_path):
    cfg = compose_config(["experiment=paper/cifar10c", f"dataset.root={release}",
                          f"output_root={tmp_path / 'outputs'}", *TINY])
    assert cfg["backbone"]["name"] == "resnet18" and cfg["rho"] == 0.99 and cfg["pruning"]["selection"] == "last"
    assert cfg["train"]["scheduler"] == "cosine" and cfg["pruning"]["augment"] is True
    assert build_dataset("cifar10c", 0.99, 0, "files", str(release),
                         cache_dir=str(tmp_path / "c")).num_classes == 10
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == cfg["stages"]
    assert {"dfr_train", "lff"} <= set(cfg["stages"])  # the baselines run wherever the data allows
    assert all(r["dataset"] == "cifar10c" for r in records)


# ------------------------------------------------------------------------------------------- frost

def _write_frost_textures(folder, colours=None):
    """Six textures of 300x300 (60x60 after the 0.2 resize): three RGBA PNGs and three JPEGs, random or flat."""
    from bise_cli.data.corruptions import FROST_FILES
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for k, name in enumerate(FROST_FILES):
        if colours is None:
            pixels = rng.integers(0, 256, (300, 300, 4 if name.endswith(".png") else 3), dtype=np.uint8)
        else:
            pixels = np.broadcast_to(np.array(colours[k], np.uint8), (300, 300, 3)).copy()
            if name.endswith(".png"):
                pixels = np.dstack([pixels, np.full((300, 300), 17, np.uint8)])   # alpha is dropped
        Image.fromarray(pixels).save(folder / name)
    return folder


def test_frost_with_generated_textures(tmp_path, monkeypatch):
    from bise_cli.data.corruptions import FROST_DIR_ENV, frost
    textures = _write_frost_textures(tmp_path / "frost")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    direct = np.clip(frost(images, np.random.default_rng(1), frost_dir=textures), 0, 255).astype(np.uint8)
    monkeypatch.setenv(FROST_DIR_ENV, str(textures))
    a = corrupt(images, "Frost", np.random.default_rng(1))
    assert a.shape == images.shape and a.dtype == np.uint8 and np.array_equal(a, direct)
    assert np.array_equal(a, corrupt(images, "Frost", np.random.default_rng(1)))
    assert not np.array_equal(a, images) and not np.array_equal(a, corrupt(images, "Frost", np.random.default_rng(2)))
    # Flat textures: level 5 gives trunc(clip(0.75 x + 0.45 colour)) in RGB order (no channel swap); level 1 mixes
    # 1 x + 0.2 colour. JPEG decoding of a flat colour may be off by a grey level or two.
    colours = [(200, 40, 0), (10, 120, 250), (90, 90, 90), (255, 0, 128), (0, 255, 60), (1, 2, 3)]
    flat = _write_frost_textures(tmp_path / "flat", colours)
    for severity, (mix_x, mix_t) in ((5, (0.75, 0.45)), (1, (1, 0.2))):
        out = frost(images, np.random.default_rng(3), severity, frost_dir=flat)
        matches = []
        for i in range(len(images)):
            candidates = [np.clip(mix_x * images[i] + mix_t * np.array(c, float), 0, 255) for c in colours]
            errors = [np.abs(out[i] - c).max() for c in candidates]
            matches.append(int(np.argmin(errors)))
            assert min(errors) <= 2 * mix_t + 1e-9, (severity, i)
        assert max(matches) <= 4   # LfF draws the texture index from 0..4: frost6 is never used


def test_frost_textures_found_in_package_without_import(tmp_path, monkeypatch):
    import importlib

    from bise_cli.data.corruptions import FROST_DIR_ENV, find_frost_dir
    package = tmp_path / "site" / "imagecorruptions"
    _write_frost_textures(package / "frost")
    (package / "__init__.py").write_text("raise ImportError('imagecorruptions must not be imported')\n")
    monkeypatch.delenv(FROST_DIR_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert find_frost_dir().resolve() == (package / "frost").resolve()
    # An explicit folder wins over the package; an incomplete one is an error naming the missing files.
    explicit = _write_frost_textures(tmp_path / "explicit")
    assert find_frost_dir(explicit) == explicit
    (explicit / "frost4.jpg").unlink()
    with pytest.raises(BiseError, match="missing frost4.jpg"):
        find_frost_dir(explicit)


def test_frost_without_textures_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from bise_cli.data.corruptions import FROST_DIR_ENV, check_supported
    monkeypatch.delenv(FROST_DIR_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)   # as if not installed
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(BiseError, match=r"Frost.*pip install --no-deps imagecorruptions.*BISE_FROST_DIR"):
        corrupt(images, "Frost", np.random.default_rng(0))
    with pytest.raises(BiseError, match=r"pip install --no-deps imagecorruptions"):
        check_supported("type0")
    check_supported("type1")
    monkeypatch.setenv(FROST_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(BiseError, match=r"empty \(missing frost1.png.*pip install --no-deps imagecorruptions"):
        corrupt(images, "Frost", np.random.default_rng(0))


def test_local_build_type0_with_frost_textures(tmp_path, monkeypatch):
    from bise_cli.data.corruptions import FROST_DIR_ENV
    root = _write_batches(tmp_path / "cifar")
    monkeypatch.setenv(FROST_DIR_ENV, str(_write_frost_textures(tmp_path / "frost")))
    bundle = build("build", root, 0.9, seed=0, corruptions="type0", cache_dir=str(tmp_path / "cache"))
    train = bundle["train"]
    assert train.x.shape == (100, 3, 32, 32) and bundle.info["corruption_names"][1] == "Frost"
    assert int((train.b == 1).sum()) > 0
