"""BiasedMNIST construction (on the embedded real digits), IDX reading and the data sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.data import build_dataset, summarize_bundle
from bise_cli.data.biased_mnist import COLOURS, aligned_count, assign_colours, build_biased_mnist, encode, render
from bise_cli.data.mnist_source import find_idx_files, load_digits, read_idx

from conftest import write_idx


@pytest.mark.parametrize("rho", [0.9, 0.99, 0.997, 1.0, 0.1])
def test_aligned_fraction_per_class_is_exact(rho):
    labels = np.repeat(np.arange(10), 537)
    bias = assign_colours(labels, rho, np.random.default_rng(0))
    for y in range(10):
        in_class = labels == y
        assert (bias[in_class] == y).sum() == aligned_count(537, rho)
        # The remaining samples use the nine other colours in chunks of ceil(n_rest / 9).
        rest = bias[in_class & (bias != y)]
        n_rest = 537 - aligned_count(537, rho)
        if n_rest:
            counts = np.bincount(rest, minlength=10)
            assert counts.max() == -(-n_rest // 9)
            assert counts[y] == 0


def test_aligned_count_is_robust_to_float_error():
    assert aligned_count(100, 0.29) == 29
    assert aligned_count(5923, 0.99) == 5863


def test_render_colours_background_and_whitens_digits():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[:, 10:12, 10:12] = 7  # any non-zero pixel is digit
    x = render(images, torch.tensor([3, 9]))
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.uint8
    assert x[0, :, 0, 0].tolist() == COLOURS[3].tolist() == [225, 225, 0]
    assert x[1, :, 0, 0].tolist() == [128, 128, 128]
    assert x[0, :, 10, 10].tolist() == [255, 255, 255]
    assert encode(x).min() == -1.0 and encode(x).max() == 1.0


def test_splits_on_embedded_digits(embedded_digits):
    bundle = build_biased_mnist(embedded_digits, rho=0.99, seed=0)
    sizes = {name: len(split) for name, split in bundle.splits.items()}
    assert sizes == {"train": 4000, "search": 3333, "val": 667, "test": 1000}
    train = bundle["train"]
    for y in range(10):
        assert int(((train.y == y) & (train.b == y)).sum()) == aligned_count(400, 0.99)
    # val and test are coloured at rho = 0.1: per class exactly floor(0.1 n) aligned, colours nearly uniform.
    test = bundle["test"]
    for y in range(10):
        assert int(((test.y == y) & (test.b == y)).sum()) == 10
    assert torch.bincount(test.b, minlength=10).min() >= 90
    summary = summarize_bundle(bundle)
    assert summary["train"]["aligned_fraction"] == pytest.approx(0.99, abs=1e-9)
    assert len(summary["val"]["aligned_fraction_per_class"]) == 10 and sum(summary["test"]["bias_counts"]) == 1000


def _digit_ids(split):
    # No background colour is white, so the all-255 pixels are exactly the binarised digit.
    return {bytes(img.numpy().tobytes()) for img in (split.x == 255).all(dim=1)}


def test_clean_split_makes_search_and_val_disjoint(embedded_digits):
    clean = build_biased_mnist(embedded_digits, rho=0.9, seed=1, clean_split=True)
    assert not _digit_ids(clean["search"]) & _digit_ids(clean["val"])
    faithful = build_biased_mnist(embedded_digits, rho=0.9, seed=1, clean_split=False)
    # The faithful split draws val from an independent permutation: it shares digits with search.
    assert _digit_ids(faithful["search"]) & _digit_ids(faithful["val"])
    # Test digits never appear in training splits.
    assert not _digit_ids(clean["test"]) & _digit_ids(clean["train"])


def test_max_samples_and_seed(embedded_digits):
    a = build_biased_mnist(embedded_digits, rho=0.9, seed=3, max_samples=1000)
    b = build_biased_mnist(embedded_digits, rho=0.9, seed=3, max_samples=1000)
    c = build_biased_mnist(embedded_digits, rho=0.9, seed=4, max_samples=1000)
    assert len(a["train"]) == 1000 and len(a["search"]) + len(a["val"]) == 1000
    assert torch.equal(a["train"].x, b["train"].x) and torch.equal(a["val"].b, b["val"].b)
    assert not torch.equal(a["train"].b, c["train"].b)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_and_layouts(tmp_path, layout, compress):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 28, 28)).astype(np.uint8)
    labels = np.arange(30) % 10
    for stem in ("train", "t10k"):
        write_idx(folder / f"{stem}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", labels, compress)
    files = find_idx_files(tmp_path)
    assert files is not None
    assert np.array_equal(read_idx(files["train_images"]), images)
    digits = load_digits("files", tmp_path)
    assert digits.train_images.shape == (30, 28, 28) and digits.test_labels.tolist() == labels.tolist()


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes((1234).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\0")
    with pytest.raises(BiseError, match="magic number 1234"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\0\0")
    with pytest.raises(BiseError, match="truncated"):
        read_idx(short)


def test_build_dataset_from_files(idx_dir):
    bundle = build_dataset("biased_mnist", rho=0.9, seed=0, source="files", root=str(idx_dir))
    assert bundle.info["source"] == "files" and len(bundle["train"]) == 200 and len(bundle["test"]) == 50


@pytest.mark.parametrize("rho", [0, -0.5, 1.5, "abc"])
def test_bad_rho(rho):
    with pytest.raises(BiseError, match="rho must be"):
        build_dataset("biased_mnist", rho=rho, seed=0, source="embedded", root="unused")


def test_unknown_dataset_and_source_and_missing_root(tmp_path):
    with pytest.raises(BiseError, match="unknown dataset 'cifar'"):
        build_dataset("cifar", rho=0.9, seed=0, source="files", root=str(tmp_path))
    with pytest.raises(BiseError, match="unknown dataset.source 'web'"):
        build_dataset("biased_mnist", rho=0.9, seed=0, source="web", root=str(tmp_path))
    with pytest.raises(BiseError, match="does not exist"):
        build_dataset("biased_mnist", rho=0.9, seed=0, source="files", root=str(tmp_path / "missing"))
    with pytest.raises(BiseError, match="no MNIST IDX files"):
        build_dataset("biased_mnist", rho=0.9, seed=0, source="files", root=str(tmp_path))


def test_auto_without_files_or_network_names_the_options(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(BiseError, match="dataset.source=files.*download.*embedded"):
        load_digits("auto", tmp_path)
    assert load_digits("auto", tmp_path, fallback="embedded").source == "embedded"
