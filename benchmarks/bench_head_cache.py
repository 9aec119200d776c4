"""Bias-head epochs on cached bottleneck features vs recomputing the frozen model (README: "Deviations from the paper").

The paper schedule runs 550 head-only epochs (50 pre-training + 10 x 50 refinement) over the 50k search set.
Uncached, each is a full forward pass of the frozen SimpleConvNet; cached, the run needs 11 feature passes plus
550 epochs of one linear layer. Both costs are measured on slices and extrapolated; target ratio >= 30x.
"""

from __future__ import annotations

import time

import torch

from bise_cli.data.base import Split
from bise_cli.method.probe import feature_epoch, make_head, model_epoch
from bise_cli.method.train import freeze, predict
from bise_cli.models import build_backbone

from common import parse_args


def main() -> None:
    args = parse_args(__doc__, width=(float, 1.0, "SimpleConvNet width"), slice_size=(int, 2000, "images timed"))
    n_search, epochs, passes = 50_000, 550, 11
    model = freeze(build_backbone("simple_convnet", 10, width=args.width))
    x = torch.randint(0, 256, (args.slice_size, 3, 28, 28), dtype=torch.uint8)
    b = torch.randint(0, 10, (args.slice_size,))
    split = Split(x, b.clone(), b, lambda t: t.float().div(127.5).sub(1))
    head, opt = make_head(model.classifier.in_features, 10, 0.1, 0.9, 1e-4, seed=0)

    start = time.perf_counter()
    model_epoch([(head, opt)], model, split, 100, torch.Generator().manual_seed(0), "cpu")
    uncached_epoch = (time.perf_counter() - start) * n_search / args.slice_size

    start = time.perf_counter()
    predict(model, split, 500, features=True)
    feature_pass = (time.perf_counter() - start) * n_search / args.slice_size

    z = torch.randn(n_search, model.classifier.in_features)
    labels = torch.randint(0, 10, (n_search,))
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        feature_epoch([(head, opt)], z, labels, 100, generator)
    cached_epoch = (time.perf_counter() - start) / 5

    uncached = epochs * uncached_epoch
    cached = passes * feature_pass + epochs * cached_epoch
    print(f"width {args.width}: uncached head epoch {uncached_epoch:.1f} s, feature pass {feature_pass:.1f} s, "
          f"cached head epoch {cached_epoch:.3f} s (50k samples)")
    print(f"550 head epochs: uncached {uncached / 3600:.2f} h, cached {cached / 60:.1f} min, "
          f"ratio {uncached / cached:.0f}x (target >= 30x)")


if __name__ == "__main__":
    main()
