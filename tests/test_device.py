"""Device consistency without a GPU: every encode, augmentation, batching and bias-relabelling function, and a short
pipeline per dataset family, run on torch's `meta` device, which refuses to mix with CPU tensors exactly as CUDA
does (tests/meta_device.py). A constant left on the CPU, a prediction compared with device labels, a CPU draw
indexing device images: each fails here as it would on the first batch of a GPU run. Also the memory decision
(`data_on_device`), the deterministic cuBLAS setting and the device in the vanilla cache key.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from meta_device import meta_device

from bise_cli.core.precision import (
    CUBLAS_DETERMINISTIC,
    configure_determinism,
    data_placement,
    device_generator,
    training_memory_bytes,
)
from bise_cli.data import augment, biased_mnist, celeba, cifar10c, multicolor_mnist, table
from bise_cli.data.base import Split, place_splits
from bise_cli.method.reweighting import REWEIGHTINGS, sample_weights
from bise_cli.models import build_backbone
from bise_cli.run import pipeline
from bise_cli.run.records import RunDir

from conftest import TINY_OVERRIDES, TINY_SETTINGS, compose_config

META = torch.device("meta")


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.zeros(n, 3, size, size, dtype=torch.uint8, device=META)


# ------------------------------------------------------------------------------------------- encode and augment

ENCODERS = {"biased_mnist": biased_mnist.encode, "multicolor_mnist": multicolor_mnist.encode,
            "celeba": celeba.encode, "cifar10c": cifar10c.encode,
            "table": table.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encode_runs_on_the_device_without_waiting(name):
    with meta_device() as mode:
        out = ENCODERS[name](_images())
    assert out.device == META and out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    assert mode.syncs == [], mode.where()


@pytest.mark.parametrize("name", ["hflip", "random_crop", "crop_flip"])
def test_every_augmentation_draws_on_the_device(name):
    fn = getattr(augment, name)
    with meta_device() as mode:
        out = fn(_images(), torch.Generator().manual_seed(0))
    assert out.device == META and out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    # No CPU decision or index meets the device images, not even one CUDA would copy over implicitly.
    assert mode.syncs == [], mode.where()


def test_device_generator_keeps_the_cpu_stream_and_is_reproducible():
    g = torch.Generator().manual_seed(5)
    assert device_generator(g, "cpu") is g  # CPU results stay what they were
    assert device_generator(torch.Generator().manual_seed(5), META) is None  # meta has no generators
    # Elsewhere the device generator is seeded by one CPU draw: the same CPU state gives the same seed.
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    device_generator(a, META)
    device_generator(b, META)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


# -------------------------------------------------------------------------------------------------- batching

def _split(n: int = 20) -> Split:
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % 2
    return Split(x, y, (y + (torch.arange(n) % 5 == 0)) % 2, cifar10c.encode, {"row": torch.arange(n)},
                 augment.crop_flip)


@pytest.mark.parametrize("on_device", [True, False], ids=["data_on_device", "host_data"])
def test_batches_are_built_on_the_device(on_device):
    with meta_device() as mode:
        split = _split().to(META) if on_device else _split()
        mode.syncs.clear()  # the one-time move is not part of the loop
        batches = list(split.batches(6, shuffle=True, generator=torch.Generator().manual_seed(0), device=META,
                                     augment=True))
    assert len(batches) == 4
    for x, y, b in batches:
        assert x.device == y.device == b.device == META and x.dtype == torch.float32
    assert mode.syncs == [], mode.where()


def test_distinct_splits_move_once_and_stay_shared():
    train, val = _split(), _split(6)
    with meta_device():
        moved = place_splits({"train": train, "search": train, "val": val}, META)
    assert moved["train"] is moved["search"] and moved["train"] is not moved["val"]
    assert moved["train"].x.device == META


@pytest.mark.parametrize("weighting", REWEIGHTINGS)
def test_pseudo_bias_labels_follow_the_split(weighting):
    with meta_device():
        split = _split().to(META)
        relabelled = split.with_bias(torch.zeros(len(split), dtype=torch.long))  # predict() returns CPU labels
        assert relabelled.b.device == META
        rho = float((relabelled.b == relabelled.y).float().mean())
        weights = sample_weights(weighting, relabelled.y, relabelled.b, 2, 2, (max(rho, 0.5),)).to(META)
        x, y, b = relabelled.batch(torch.arange(5), META)
        assert weights(y, b).device == META


# ------------------------------------------------------------------------------------------------- pipelines

# Stages chosen so that together the families run every stage once; each run is as short as TINY_SETTINGS make it.
STAGE_SETS = {
    # BiasedMNIST with pseudo bias labels: identification, then BISE and DFR on them; the matched baselines.
    # (The MLP: meta BatchNorm runs through slow Python decompositions; the ResNet18 runs below cover convolutions.)
    "biased_mnist": [*TINY_OVERRIDES, "bias_labels=identification", "backbone=mlp",
                     "stages=[vanilla,bise,random,magnitude,dfr_train]"],
    # Multi-Color MNIST: two bias attributes, two heads; the reweighted fine-tuning control.
    "multicolor_mnist": ["experiment=quickstart", "dataset.source=embedded", "stages=[vanilla,bise,reweighted_ft]"],
    # FFW on BiasedMNIST (the smoke preset tunes BISE's keys: TINY_SETTINGS without them).
    "ffw": ["pruning=ffw", "stages=[vanilla,ffw]", "pruning.max_epochs=1", "pruning.head_max_epochs=2",
            "pruning.t_patience=0", "dataset.source=embedded", "backbone.width=0.125"],
}


def _generated(family: str, tmp_path):
    """Overrides for the CelebA and Corrupted CIFAR-10 presets on generated files in their real layouts."""
    if family == "celeba":  # ResNet18, ImageNet normalisation, flips; the data on the device
        from test_celeba import write_layout
        root = write_layout(tmp_path / "celeba", "torchvision")
        return ["experiment=paper/celeba", f"dataset.root={root}", "dataset.image_size=16",
                "backbone.weights=none", "stages=[vanilla,bise,dfr_val]"]
    # Corrupted CIFAR-10: ResNet18, crops and flips in the search too (recomputed head features); the data in host
    # memory (data_on_device=never), so every batch is copied over and augmented on the device.
    from test_cifar10c import _write_release
    root = _write_release(tmp_path / "cifar10c")
    return ["experiment=paper/cifar10c", f"dataset.root={root}", "backbone.weights=none", "data_on_device=never",
            "stages=[vanilla,bise,bise_ft,lff]"]


@pytest.fixture(autouse=True)
def _no_latency_on_meta(monkeypatch):
    # A forward pass on `meta` computes nothing: timing it only costs the test seconds.
    monkeypatch.setattr("bise_cli.reporting.efficiency.measure_latency", lambda *args, **kwargs: 0.0)


def _run_on_meta(overrides: list[str], tmp_path) -> tuple[list[dict], dict, list[str]]:
    # CelebA, CIFAR-10-C and text name their own data.
    generated = any(o.startswith(("dataset.root=", "dataset.source=")) for o in overrides)
    settings = [o for o in TINY_SETTINGS if not (o.startswith("pruning.") and "pruning=ffw" in overrides)
                and not (o.startswith("dataset.") and generated)]
    cfg = compose_config([*overrides, *settings, f"output_root={tmp_path / 'out'}", "cache=false", "threads=1",
                          "bootstrap.n=0", "train.batch_size=64", "finetune.batch_size=64", "pruning.batch_size=64"])
    if cfg["dataset"]["name"] not in ("celeba", "cifar10c"):
        cfg["dataset"]["max_samples"] = 150
    run_dir = RunDir(tmp_path / "run")
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")  # load_state_dict into meta parameters warns per tensor
        bundle = pipeline.load_data(cfg)
        pipeline.recipe(cfg, META, run_dir, bundle, pipeline.fingerprint_bundle(bundle))
    return run_dir.records, cfg, mode.where()


@pytest.mark.parametrize("family", ["biased_mnist", "multicolor_mnist", "ffw", "celeba", "cifar10c"])
def test_pipeline_runs_on_the_device(family, tmp_path):
    overrides = STAGE_SETS.get(family) or _generated(family, tmp_path)
    records, cfg, _ = _run_on_meta(overrides, tmp_path)
    assert list(dict.fromkeys(r["stage"] for r in records)) == cfg["stages"]
    placement = json.loads((tmp_path / "run" / "data_summary.json").read_text())["data_on_device"]
    assert placement["mode"] == cfg["data_on_device"]
    assert placement["on_device"] is (cfg["data_on_device"] != "never")


def test_text_pipeline_runs_on_the_device(tmp_path):
    pytest.importorskip("transformers")
    records, cfg, _ = _run_on_meta(["experiment=quickstart_text", "backbone.pretrained=tiny",
                                    "dataset.source=synthetic", "dataset.synthetic_size=200",
                                    "dataset.max_length=16", "stages=[vanilla,bise]"], tmp_path)
    assert list(dict.fromkeys(r["stage"] for r in records)) == cfg["stages"]


# ------------------------------------------------------------------------------------------- memory decision

GB = 10**9
CELEBA_224 = 24.7 * GB          # 162,770 x 3 x 224 x 224 uint8 training images (README)
# training_memory_bytes(ResNet18, batch 256 at 224 px): 5.86 GB (test_training_estimate_scales_with_the_batch
# checks how it is made; computing it here takes seconds).
RESNET18_224_B256 = 5.86 * GB


@pytest.mark.parametrize(("card_gb", "lff", "expected"), [
    (16, True, False), (24, True, False), (40, True, False), (80, True, True),
    (16, False, False), (24, False, False), (40, False, True), (80, False, True)])
def test_celeba_at_224_px_goes_on_the_card_only_with_room_to_train(card_gb, lff, expected):
    total = card_gb * GB
    free = total - int(0.6 * GB)  # the CUDA context
    on_device, reason = data_placement("auto", "cuda", int(CELEBA_224), (free, total), int(RESNET18_224_B256), lff)
    # 40 GB: 24.7 + 5.86 + 4.0 (margin) = 34.6 <= 39.4 for one model; + another 5.86 for LfF = 40.4 > 39.4.
    assert on_device is expected, reason
    assert ("on the device" in reason) is expected


def test_small_data_always_fit_and_explicit_modes_win():
    mnist = 60_000 * 3 * 28 * 28  # BiasedMNIST's training images, 141 MB
    assert data_placement("auto", "cuda", mnist, (15 * GB, 16 * GB), int(0.4 * GB), True)[0]
    assert data_placement("always", "cuda", int(CELEBA_224), (15 * GB, 16 * GB), None, True)[0]
    assert not data_placement("never", "cuda", mnist, (79 * GB, 80 * GB), None, False)[0]
    assert data_placement("never", "cpu", mnist, None, None, False)[0]  # the CPU holds the data either way
    assert data_placement("auto", "cuda", mnist, None, None, False)[0]  # no memory figure: on the device
    # No training estimate: a quarter of the free memory per model.
    assert not data_placement("auto", "cuda", int(CELEBA_224), (39 * GB, 40 * GB), None, True)[0]


def test_training_estimate_scales_with_the_batch():
    model = build_backbone("resnet18", 2, weights="none")
    params = sum(p.numel() * 4 for p in model.parameters())
    sizes = {batch: training_memory_bytes(model, torch.zeros(batch, 3, 32, 32)) for batch in (2, 4, 8)}
    assert sizes[2] > 4 * params
    assert sizes[8] - sizes[4] == pytest.approx(2 * (sizes[4] - sizes[2]), rel=0.01)  # activations ~ batch
    assert training_memory_bytes(build_backbone("mlp", 2), torch.zeros(4, 3, 28, 28)) > 0


def test_bad_placement_is_one_clear_error(tmp_path):
    from bise_cli.core.errors import BiseError
    cfg = compose_config([*TINY_OVERRIDES, "data_on_device=sometimes", f"output_root={tmp_path}"])
    with pytest.raises(BiseError, match="data_on_device 'sometimes'; allowed: auto, always, never"):
        pipeline.run(cfg, tmp_path / "run")


# ------------------------------------------------------------------------------------------ reproducibility

def test_deterministic_runs_set_the_cublas_workspace(monkeypatch, tmp_path):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_determinism(False)
    import os
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    # Through the pipeline: set first, even when the run then fails validation (no CUDA call has happened yet).
    cfg = compose_config([*TINY_OVERRIDES, "seed=-1", f"output_root={tmp_path}"])
    with pytest.raises(Exception, match="seed"):
        pipeline.run(cfg, tmp_path / "run")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
    configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_vanilla_weights_are_keyed_by_the_training_device():
    """A GPU run never reuses vanilla weights a CPU run trained (different kernels, different rounding): the
    vanilla key, and every key built on it (identification, LfF), names the device type."""
    from bise_cli.data import build_dataset
    from bise_cli.run import stages

    cfg = compose_config(TINY_OVERRIDES)
    bundle = build_dataset("biased_mnist", 0.99, 0, "embedded", "", max_samples=50)
    keys = {device: stages.Context(cfg, bundle, torch.device(device), None, None, "sha").train_key()
            for device in ("cpu", "cuda", "cuda:1")}
    assert keys["cpu"] != keys["cuda"] and keys["cuda"] == keys["cuda:1"]
    assert keys["cpu"]["train_device"] == "cpu"
