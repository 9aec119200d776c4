"""Multi-Color MNIST: DebiAN's quota rule and colouring, the splits, the released-folder reader, and the MLP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import bise

from bise_cli.core.errors import BiseError
from bise_cli.data.mnist_source import Digits
from bise_cli.data.multicolor_mnist import (
    PALETTE,
    RIGHT_PALETTE,
    SEVERITY_STD,
    assign_colours,
    build,
    build_multicolor_mnist,
    colourise,
    debian_folder_name,
    group_counts,
    load_debian_folder,
)
from bise_cli.models.masking import GateSet
from bise_cli.models.mlp import MLP

# MNIST's class counts (train, test): the published group sizes follow from these alone.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _labels(counts, seed=0):
    labels = np.repeat(np.arange(10), counts)
    return np.random.default_rng(seed).permutation(labels)


def _groups(labels, left, right):
    y, b = torch.from_numpy(labels), torch.from_numpy(np.stack([left, right], 1))
    return group_counts(y, b)


# ------------------------------------------------------------------------------------------- quota rule

@pytest.mark.parametrize("seed", [0, 1])
def test_train_group_sizes_match_debian(seed):
    labels = _labels(TRAIN_COUNTS, seed)
    left, right = assign_colours(labels, 0.99, 0.95)
    assert _groups(labels, left, right) == {"alig_alig": 56430, "alig_conf": 2972, "conf_alig": 573,
                                            "conf_conf": 25}
    # Every colour occurs on each side (DebiAN asserts this too).
    assert len(np.unique(left)) == 10 and len(np.unique(right)) == 10


def test_test_split_is_uniform_over_cells():
    labels = _labels(TEST_COUNTS)
    left, right = assign_colours(torch.from_numpy(labels), 0.1, 0.1)
    assert _groups(labels, left, right) == {"alig_alig": 100, "alig_conf": 900, "conf_alig": 904,
                                            "conf_conf": 8096}
    cells = np.zeros((10, 10, 10), dtype=int)
    np.add.at(cells, (labels, left, right), 1)
    assert cells.min() >= 8 and cells.max() <= 12


def test_quota_rule_is_in_dataset_order():
    # Within a class the first samples take pair 0 = (left 0, right 0), i.e. the aligned pair for digit 0.
    labels = np.zeros(100, dtype=np.int64)
    left, right = assign_colours(labels, 0.9, 0.9)
    assert (left[:81] == 0).all() and (right[:81] == 0).all()
    assert list(left) == sorted(left)  # pairs are handed out in increasing order, left colour major


# ------------------------------------------------------------------------------------------- colouring

def test_palette_right_is_complement_and_stds():
    assert PALETTE.shape == (10, 3) and torch.equal(RIGHT_PALETTE, 1 - PALETTE)
    assert ((PALETTE >= 0) & (PALETTE <= 1)).all()
    assert SEVERITY_STD == {1: 0.05, 2: 0.02, 3: 0.01, 4: 0.005, 5: 0.002}


def test_pixel_rule_on_a_hand_made_image():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 5, 3] = image[0, 5, 20] = 255
    image[0, 6, 3] = image[0, 6, 20] = 200
    out = colourise(image, torch.tensor([4]), torch.tensor([7]), severity=4, seed=0)
    assert out.shape == (1, 3, 28, 28) and out.dtype == torch.uint8
    assert (out[0, :, 5, 3] == 255).all() and (out[0, :, 5, 20] == 255).all()  # pure stroke stays white
    # Recover the jittered colours from the background (0 + 255 * c, truncated) and check the two halves.
    left = out[0, :, 0, 0].float() / 255
    right = out[0, :, 0, 27].float() / 255
    assert torch.allclose(left, PALETTE[4], atol=0.05) and torch.allclose(right, RIGHT_PALETTE[7], atol=0.05)
    background = out[0, :, 10, :]
    assert (background[:, :14] == background[:, :1]).all() and (background[:, 14:] == background[:, 14:15]).all()
    # A 200 pixel becomes trunc(min(200 + 255 * c, 255)) = min(200 + background, 255): it saturates where
    # 255 * c >= 55 (the right colour 7 saturates on all three channels).
    for column, background in ((3, out[0, :, 0, 0]), (20, out[0, :, 0, 27])):
        assert torch.equal(out[0, :, 6, column].long(), (200 + background.long()).clamp(max=255))
    assert (out[0, :, 6, 20] == 255).all()


def test_pixel_rule_exact_without_jitter(monkeypatch):
    monkeypatch.setitem(SEVERITY_STD, 4, 0.0)
    image = torch.tensor([[[0, 100, 255, 254] * 7] * 28], dtype=torch.uint8)
    out = colourise(image, torch.tensor([2]), torch.tensor([5]), severity=4, seed=0)
    for column, colour in ((1, PALETTE[2]), (15, RIGHT_PALETTE[5])):
        v = float(image[0, 0, column])
        expected = torch.clamp(v + 255 * colour, 0, 255).to(torch.uint8)
        assert torch.equal(out[0, :, 0, column], expected)
    assert (out[0, :, :, 2::4] == 255).all()
    assert torch.equal(out[0, :, 0, 0], (255 * PALETTE[2]).to(torch.uint8))  # truncation, not rounding


def test_jitter_is_seeded():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    left, right = torch.randint(0, 10, (50,)), torch.randint(0, 10, (50,))
    a = colourise(images, left, right, seed=3)
    assert torch.equal(a, colourise(images, left, right, seed=3))
    assert not torch.equal(a, colourise(images, left, right, seed=4))
    assert not torch.equal(colourise(images, left, right, severity=1, seed=3), a)


# ------------------------------------------------------------------------------------------- splits

def _digits(n_train=300, n_test=100) -> Digits:
    g = torch.Generator().manual_seed(0)
    return Digits(torch.randint(0, 256, (n_train, 28, 28), dtype=torch.uint8, generator=g),
                  torch.arange(n_train) % 10, torch.randint(0, 256, (n_test, 28, 28), dtype=torch.uint8, generator=g),
                  torch.arange(n_test) % 10, "generated", "memory")


def test_bundle_splits_and_shapes():
    bundle = build_multicolor_mnist(_digits(), seed=0)
    assert set(bundle.splits) == {"train", "search", "test"}  # no val: BISE keeps the last masks
    assert bundle["search"] is bundle["train"]
    assert bundle.num_classes == 10 and bundle.num_bias == 10 and bundle.bias_names == ("left", "right")
    for name, n in (("train", 300), ("test", 100)):
        split = bundle[name]
        assert split.x.shape == (n, 3, 28, 28) and split.x.dtype == torch.uint8
        assert split.b.shape == (n, 2) and split.b.dtype == torch.long and split.y.dtype == torch.long
        encoded = split.encode(split.x[:4])
        assert encoded.dtype == torch.float32 and torch.equal(encoded, split.x[:4].float() / 255)
    info = bundle.info
    assert info["jitter_seeded"] and info["severity"] == 4 and info["rho_left"] == 0.99
    assert sum(info["groups"]["train"].values()) == 300 and sum(info["groups"]["test"].values()) == 100
    # Same seed -> same bytes; another seed -> other jitter, same colour labels (the quota rule is deterministic).
    again, other = build_multicolor_mnist(_digits(), seed=0), build_multicolor_mnist(_digits(), seed=1)
    assert torch.equal(again["train"].x, bundle["train"].x)
    assert not torch.equal(other["train"].x, bundle["train"].x) and torch.equal(other["train"].b, bundle["train"].b)


def test_max_samples_keeps_a_seeded_ordered_subset():
    digits = _digits(300)
    bundle = build_multicolor_mnist(digits, seed=0, max_samples=100)
    assert len(bundle["train"]) == 100 and len(bundle["test"]) == 100
    assert torch.equal(bundle["train"].y, build_multicolor_mnist(digits, seed=0, max_samples=100)["train"].y)


@pytest.mark.parametrize("options, message", [
    ({"rho_left": 0.0}, "rho_left"), ({"rho_right": 1.5}, "rho_right"), ({"severity": 6}, "severity"),
    ({"max_samples": 5}, "max_samples"),
])
def test_bad_options_fail_before_reading_files(tmp_path, options, message):
    with pytest.raises(BiseError, match=message):
        build("files", tmp_path / "missing", seed=0, **options)


def test_unknown_source():
    with pytest.raises(BiseError, match="dataset.source"):
        build("internet", "x", seed=0)


# ------------------------------------------------------------------------------------------- val hold-out

def _unique_digits(n_train=2000, n_test=100) -> Digits:
    """Digits whose white (255) pixels spell out their own index in binary in row 0, everything else 0: the
    white pixels survive the colouring unchanged (the palettes never reach 255 on all three channels), so a
    coloured image still names the digit it was made from."""
    def images(n, offset):
        x = torch.zeros(n, 28, 28, dtype=torch.uint8)
        index = torch.arange(offset, offset + n)
        for bit in range(16):
            x[:, 0, bit] = ((index >> bit) & 1).to(torch.uint8) * 255
        return x
    g = torch.Generator().manual_seed(0)
    return Digits(images(n_train, 0), torch.randint(0, 10, (n_train,), generator=g), images(n_test, n_train),
                  torch.randint(0, 10, (n_test,), generator=g), "generated", "memory")


def _source_index(split) -> torch.Tensor:
    white = (split.x[:, :, 0, :16] == 255).all(dim=1).long()  # (N, 16) bits
    return (white << torch.arange(16)).sum(1)


@pytest.mark.parametrize("max_samples", [None, 1500])
def test_val_holdout_is_disjoint_uniform_and_seeded(max_samples):
    digits = _unique_digits()
    bundle = build_multicolor_mnist(digits, seed=3, max_samples=max_samples, val_holdout=1000)
    train, val, test = bundle["train"], bundle["val"], bundle["test"]
    assert set(bundle.splits) == {"train", "search", "val", "test"} and bundle["search"] is train
    # Sizes: the hold-out comes out of the (capped) training digits; test keeps every test digit.
    n = max_samples or 2000
    assert len(val) == 1000 and len(train) == n - 1000 and len(test) == 100
    assert bundle.info["val_holdout"] == 1000 and bundle.info["train_digits"] == n - 1000
    # Disjoint, and together exactly the digits the capped training set would have had.
    train_ids, val_ids = _source_index(train), _source_index(val)
    assert not set(train_ids.tolist()) & set(val_ids.tolist())
    capped = build_multicolor_mnist(digits, seed=3, max_samples=max_samples)["train"]
    assert sorted(train_ids.tolist() + val_ids.tolist()) == sorted(_source_index(capped).tolist())
    assert torch.equal(digits.train_labels[val_ids], val.y) and torch.equal(digits.train_labels[train_ids], train.y)
    # Val is coloured as the test split is built (rho 0.1 on both sides): uniform over the (left, right) pairs
    # of every digit, up to the quota rule's rounding (at most one apart).
    left, right = assign_colours(val.y, 0.1, 0.1)
    assert torch.equal(val.b, torch.from_numpy(np.stack([left, right], 1)))
    cells = np.zeros((10, 10, 10), dtype=int)
    np.add.at(cells, (val.y.numpy(), val.b[:, 0].numpy(), val.b[:, 1].numpy()), 1)
    for digit in range(10):
        assert cells[digit].max() - cells[digit].min() <= 1
    # Train keeps the paper's colouring of what is left.
    left, right = assign_colours(train.y, 0.99, 0.95)
    assert torch.equal(train.b, torch.from_numpy(np.stack([left, right], 1)))
    # Seeded: the same seed gives the same bytes, another seed other digits.
    again = build_multicolor_mnist(digits, seed=3, max_samples=max_samples, val_holdout=1000)
    assert torch.equal(again["val"].x, val.x) and torch.equal(again["train"].x, train.x)
    other = build_multicolor_mnist(digits, seed=4, max_samples=max_samples, val_holdout=1000)
    assert not torch.equal(_source_index(other["val"]), val_ids)


def test_val_holdout_zero_is_the_paper():
    digits = _unique_digits(300)
    paper, zero = build_multicolor_mnist(digits, seed=0), build_multicolor_mnist(digits, seed=0, val_holdout=0)
    assert set(zero.splits) == {"train", "search", "test"} and "val_holdout" not in zero.info
    for name in ("train", "test"):
        assert torch.equal(paper[name].x, zero[name].x) and torch.equal(paper[name].b, zero[name].b)


@pytest.mark.parametrize("value, source, message", [
    (-1, "files", "val_holdout must be an integer >= 0"), (True, "files", "val_holdout must be an integer"),
    (0.5, "files", "val_holdout must be an integer"), (10, "debian", "val_holdout needs the digits coloured here"),
])
def test_val_holdout_bad_values(tmp_path, value, source, message):
    with pytest.raises(BiseError, match=message):
        build(source, tmp_path / "missing", seed=0, val_holdout=value)


def test_val_holdout_must_leave_training_digits():
    with pytest.raises(BiseError, match="leaves fewer than 20"):
        build_multicolor_mnist(_unique_digits(300), seed=0, val_holdout=290)


def test_val_holdout_through_the_cli(tmp_path):
    bise("data", "dataset=multicolor_mnist", "backbone=mlp", "dataset.source=embedded", "dataset.val_holdout=500",
         "output_root=out", cwd=tmp_path)
    [folder] = list((tmp_path / "out" / "data").iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val"]["size"] == 500 and summary["train"]["size"] == summary["search"]["size"]
    assert summary["train"]["size"] + 500 == 4000  # the 4k embedded training digits
    result = bise("data", "dataset=multicolor_mnist", "dataset.source=embedded", "dataset.val_holdout=-3",
                  "output_root=out", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "dataset.val_holdout must be an integer >= 0" in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------- DebiAN folder

def _write_debian(folder, n_train=40, n_test=20, bad_shape=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_test)):
        (folder / split).mkdir(parents=True)
        shape = (n, 3, 28, 28) if bad_shape and split == "train" else (n, 28, 28, 3)
        np.save(folder / split / "images.npy", rng.integers(0, 256, shape, dtype=np.uint8))
        np.save(folder / split / "attrs.npy", rng.integers(0, 10, (n, 3)))


def test_debian_folder_reader(tmp_path):
    folder = tmp_path / "multi_color_mnist" / debian_folder_name()
    assert folder.name == "ColoredMNIST-SkewedA0.01-SkewedB0.05-Severity4"
    _write_debian(folder)
    for root in (tmp_path, tmp_path / "multi_color_mnist", folder):
        bundle = load_debian_folder(root)
        assert set(bundle.splits) == {"train", "search", "test"} and bundle["search"] is bundle["train"]
        assert len(bundle["train"]) == 40 and len(bundle["test"]) == 20
    images = np.load(folder / "train" / "images.npy")
    attrs = np.load(folder / "train" / "attrs.npy")
    train = bundle["train"]
    assert torch.equal(train.x, torch.from_numpy(images).permute(0, 3, 1, 2))  # HWC -> CHW
    assert torch.equal(train.y, torch.from_numpy(attrs[:, 0])) and torch.equal(train.b, torch.from_numpy(attrs[:, 1:]))
    assert len(build("debian", tmp_path, seed=0, max_samples=20)["train"]) == 20


def test_debian_folder_errors(tmp_path):
    folder = tmp_path / "cfg"
    _write_debian(folder)
    (folder / "valid" / "attrs.npy").unlink()
    with pytest.raises(BiseError, match=r"missing .*valid.*attrs\.npy"):
        load_debian_folder(folder)
    other = tmp_path / "bad"
    _write_debian(other, bad_shape=True)
    with pytest.raises(BiseError, match=r"\(N, 28, 28, 3\)"):
        load_debian_folder(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiseError, match="no DebiAN"):
        load_debian_folder(tmp_path / "empty")
    with pytest.raises(BiseError, match="does not exist"):
        load_debian_folder(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- MLP

def test_mlp_forward_and_double_scale():
    torch.manual_seed(0)
    model = MLP()
    x = torch.rand(5, 3, 28, 28)
    assert model(x).shape == (5, 10)
    plain = MLP(double_scale=False)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(x), plain(x / 255), atol=1e-6)
    assert not torch.allclose(model(x), plain(x), atol=1e-3)
    # CHW-major flattening and DebiAN's module names (feature.*, classifier.*).
    assert set(model.state_dict()) == {f"feature.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "classifier.weight", "classifier.bias"}
    assert model.classifier.in_features == 100 and model.feature[0].in_features == 2352


def test_mlp_gate_points():
    model = MLP()
    points = model.gate_points()
    assert [p.units for p in points] == [100, 100, 100]
    for point in points:
        assert isinstance(model.get_submodule(point.module), torch.nn.ReLU)
        assert isinstance(model.get_submodule(point.producer), torch.nn.Linear)
    rebuilt = MLP(**model.constructor_kwargs())
    rebuilt.load_state_dict(model.state_dict())


def test_pruned_copy_equals_gated_model():
    torch.manual_seed(0)
    model = MLP(hidden=(20, 16, 12)).eval()
    x = torch.rand(8, 3, 28, 28) * 255  # large inputs so that every layer's activations are far from zero
    gates = GateSet(model.gate_points()).attach(model)
    cases = [
        {"fc0": torch.rand(20) > 0.5, "fc1": torch.rand(16) > 0.5, "fc2": torch.rand(12) > 0.5},
        {"fc0": torch.rand(20) > 0.5, "fc1": torch.zeros(16, dtype=torch.bool), "fc2": torch.rand(12) > 0.5},
        {"fc0": torch.rand(20) > 0.5, "fc1": torch.rand(16) > 0.5, "fc2": torch.eye(12, dtype=torch.bool)[3]},
        {"fc0": torch.rand(20) > 0.5, "fc1": torch.rand(16) > 0.5, "fc2": torch.zeros(12, dtype=torch.bool)},
    ]
    for masks in cases:
        gates.load_binary_masks(masks)
        gates.set_mode("fixed")
        with torch.no_grad():
            reference = model(x)
        pruned = model.pruned_copy(masks)
        assert pruned.hidden == [max(1, int(m.sum())) for m in masks.values()]
        with torch.no_grad():
            assert torch.allclose(pruned(x), reference, atol=1e-5)
        rebuilt = MLP(**pruned.constructor_kwargs())
        rebuilt.load_state_dict(pruned.state_dict())
    gates.detach()
    # The original model is untouched by pruning.
    assert [layer.out_features for layer in model.feature[::2]] == [20, 16, 12]
