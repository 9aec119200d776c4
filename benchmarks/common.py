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
