"""Helpers shared by the benchmark scripts: argument parsing, MNIST location, timing."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def parse_args(description: str, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mnist", default=str(DEFAULT_MNIST), help="folder with the MNIST IDX files")
    parser.add_argument("--threads", type=int, default=2)
    for name, (kind, default, text) in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


@contextmanager
def timer(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start


def add_frozen_mlp_args(parser: argparse.ArgumentParser) -> None:
    """The options of `frozen_mlp_search_start`: where the digits come from, vanilla epochs, threads."""
    parser.add_argument("--source", default="embedded", help="dataset.source of multicolor_mnist")
    parser.add_argument("--root", default="datasets/mnist", help="dataset.root (the MNIST files)")
    parser.add_argument("--epochs", type=int, default=5, help="vanilla epochs")
    parser.add_argument("--threads", type=int, default=1)


def frozen_mlp_search_start(args: argparse.Namespace):
    """The start of a BISE search on Multi-Color MNIST: the paper's MLP trained `args.epochs` epochs with Adam
    (batch 256, lr 1e-3, seed 0) and frozen, the search split and its inverse-rho sample weights, as
    (model, search split, weights). Sets torch's threads to `args.threads`."""
    from bise_cli.method.recipe import TrainRecipe
    from bise_cli.method.reweighting import sample_weights
    from bise_cli.method.train import fit, freeze
    from bise_cli.models import build_backbone
    from bise_cli.run import pipeline

    torch.set_num_threads(args.threads)
    cfg = {"dataset": {"name": "multicolor_mnist", "source": args.source, "root": args.root, "max_samples": None,
                       "fallback": "embedded", "rho_left": 0.99, "rho_right": 0.95, "severity": 4,
                       "val_holdout": 0, "label_noise": 0.0}, "rho": 0.99, "seed": 0}
    bundle = pipeline.load_data(cfg)
    torch.manual_seed(0)
    model = build_backbone("mlp", 10)
    fit(model, bundle["train"], TrainRecipe(epochs=args.epochs, batch_size=256, optimizer="adam", lr=1e-3), seed=0)
    freeze(model)
    search = bundle["search"]
    return model, search, sample_weights("inverse_rho", search.y, search.b, 10, 10, bundle.nominal_rho)
