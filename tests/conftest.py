"""Shared fixtures: small real data (the embedded MNIST digits) and tiny generated IDX files; `run_bise`, the
`bise` command in a subprocess."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bise_cli.data.mnist_source import Digits, load_embedded


@pytest.fixture(scope="session")
def embedded_digits() -> Digits:
    return load_embedded()


# `make test` runs one pytest worker per core (pytest-xdist): each worker and the `bise` subprocesses it starts
# get an equal share of the cores, so that workers do not oversubscribe the machine.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # torch's default thread count in subprocesses


@pytest.fixture(scope="module")
def tiny(embedded_digits):
    """A small BiasedMNIST bundle and a frozen SimpleConvNet trained on it for one epoch (the search tests)."""
    from bise_cli.data.biased_mnist import build_biased_mnist
    from bise_cli.method.recipe import TrainRecipe
    from bise_cli.method.train import fit, freeze
    from bise_cli.models import build_backbone

    torch.manual_seed(0)
    bundle = build_biased_mnist(embedded_digits, rho=0.9, seed=0, max_samples=300, clean_split=True)
    model = build_backbone("simple_convnet", 10, width=0.25)
    fit(model, bundle["train"], TrainRecipe(epochs=1, batch_size=50, lr=0.05), seed=0)
    return bundle, freeze(model)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, THREADS))


def bise_env(**extra: str) -> dict[str, str]:
    """The environment of a `bise` subprocess: this process's (OMP_NUM_THREADS as set above) with Hydra's one-line
    errors (HYDRA_FULL_ERROR=0), plus `extra`."""
    return {**os.environ, "HYDRA_FULL_ERROR": "0", **extra}


def run_bise(*args, cwd: Path, timeout: int = 300, entry: tuple[str, ...] = ("-m", "bise_cli"),
             **kwargs) -> subprocess.CompletedProcess:
    """`python -m bise_cli ARGS` in `cwd`, as a user types it, with `bise_env()`; stdout and stderr captured as
    text. `entry` replaces `-m bise_cli` (another module, or `-c CODE`); `kwargs` go to subprocess.run."""
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=cwd, env=bise_env(), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write an IDX file (magic 2051 for 3-d uint8 images, 2049 for 1-d labels)."""
    header = (2051 if array.ndim == 3 else 2049).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """A folder with the four MNIST IDX files made of random digits (200 train, 50 test), gzipped."""
    rng = np.random.default_rng(0)
    for stem, n in (("train", 200), ("t10k", 50)):
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
        labels = np.arange(n) % 10
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", images, compress=True)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", labels, compress=True)
    return tmp_path


# Overrides that shrink every stage to seconds on CPU; the same settings as conf/experiment/smoke.yaml, spelled
# out so they can be combined with another preset (the quickstart test).
TINY_SETTINGS = [
    "dataset.source=embedded", "dataset.max_samples=300", "train.epochs=1", "train.milestones=[1]",
    "pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.head_pretrain_epochs=1", "pruning.head_refine_epochs=1",
    "pruning.gate_init=1.0", "finetune.epochs=1", "leakage_probe.epochs=1", "latency.repeats=1",
    "latency.warmup=0",
]
TINY_OVERRIDES = ["experiment=smoke"]
TIMING_KEYS = ("latency_ms_b1", "latency_ms_b100", "latency_ms_b1_dense", "latency_ms_b100_dense",
               "train_seconds", "run_dir")


def compose_config(overrides: list[str]) -> dict:
    """The resolved config for `overrides`, as the CLI would build it, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import bise_cli.cli as cli

    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move 1-d parameters (norm scales, biases), layer scales and BN statistics away from their init values, so
    that a mis-sliced BatchNorm, LayerNorm or layer scale cannot hide behind weight 1, bias 0, mean 0, variance 1
    (the pruned == gated tests)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("layer_scale"):
                noise = 0.2 * torch.randn(param.shape, generator=generator)
                param.copy_(noise + (1.0 if name.endswith("weight") else 0.0))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_and_compare(model: torch.nn.Module, x: torch.Tensor, make_masks, all_kept: bool, device=None):
    """Gate `model` with `make_masks(gate points)` (fixed binary gates), prune it physically and assert what every
    backbone must keep: the original is unchanged (gated while the gates are attached, vanilla after), no gate
    hook is copied, pruned logits equal gated logits to 1e-5, and the pruned model has fewer parameters unless
    every unit is kept (then it equals the vanilla model). Returns (pruned model, its logits on `x`)."""
    from bise_cli.method.prune import prune_model
    from bise_cli.models.masking import GateSet

    vanilla = model(x)
    gates = GateSet(model.gate_points())
    gates = (gates.to(device) if device is not None else gates).attach(model)
    masks = make_masks(gates.points)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    gated = model(x)
    pruned = prune_model(model, masks)  # with the gates still attached: the original must not change
    assert torch.equal(model(x), gated)
    gates.detach()
    assert torch.equal(model(x), vanilla)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.modules()), "gate hooks were copied"
    out = pruned(x)
    assert out.shape == gated.shape
    assert (out - gated).abs().max() <= 1e-5
    if all_kept:
        assert (out - vanilla).abs().max() <= 1e-5 and param_count(pruned) == param_count(model)
    else:
        assert param_count(pruned) < param_count(model)
    return pruned, out
