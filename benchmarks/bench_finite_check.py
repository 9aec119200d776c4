"""Cost of the non-finite-logits check on a finite evaluation (bise_cli.method.evaluate): `predict` alone vs `predict`
watched by `_watch_logits` plus `check_finite_logits`, alternated on the same model and split; prints the ratio
of the medians (the check is one isfinite per batch on the device and one host sync at the end)."""

from __future__ import annotations

import statistics
import time

import torch

from bise_cli.data import build_dataset
from bise_cli.method.evaluate import _watch_logits, check_finite_logits
from bise_cli.method.train import predict
from bise_cli.models import build_backbone


def main(repeats: int = 7, batch_size: int = 256) -> None:
    torch.set_num_threads(1)
    bundle = build_dataset("biased_mnist", rho=0.99, seed=0, source="embedded", root="datasets", max_samples=300)
    split = bundle["test"]
    for arch, options in (("mlp", {}), ("simple_convnet", {"width": 0.25})):
        model = build_backbone(arch, bundle.num_classes, **options).eval()
        plain, watched = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(model, split, batch_size)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            with _watch_logits(model) as watch:
                predict(model, split, batch_size)
            check_finite_logits(model, split, "test", watch["bad"], batch_size, "cpu")
            watched.append(time.perf_counter() - start)
        a, b = statistics.median(plain), statistics.median(watched)
        print(f"{arch}: {len(split)} test samples, batch {batch_size}: predict {a * 1e3:.1f} ms, with the check "
              f"{b * 1e3:.1f} ms, ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
