"""The fresh leakage probe trains on bottleneck features computed once (bise_cli.method.probe.fresh_probe_leakage): on
un-augmented inputs that is the same probe as one that recomputes the frozen model's features for every batch of
every epoch (the same seed draws the same heads and the same batch order)."""

from __future__ import annotations

import torch

from bise_cli.data.base import bias_columns
from bise_cli.method.probe import fresh_probe_leakage, head_accuracy, make_head, model_epoch
from bise_cli.method.train import freeze, predict
from bise_cli.models import build_backbone
from bise_cli.run import pipeline

from conftest import TINY_OVERRIDES, compose_config


def recomputed_probe(model, train, test, num_bias: int, *, epochs: int, batch_size: int, lr: float, seed: int):
    """The reference: the probe's heads stepped on features recomputed from the inputs batch by batch."""
    dim = model.classifier.in_features
    heads = [make_head(dim, num_bias, lr, 0.9, 1e-4, seed + k) for k in range(len(bias_columns(train.b)))]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model_epoch(heads, model, train, batch_size, generator, "cpu")
    z_test = predict(model, test, 500, "cpu", features=True)["z"]
    return [head_accuracy(head, z_test, b) for (head, _), b in zip(heads, bias_columns(test.b), strict=True)], heads


def test_cached_feature_probe_equals_the_recomputed_probe():
    cfg = compose_config(TINY_OVERRIDES)
    bundle = pipeline.load_data(cfg)
    assert bundle["search"].augment is None  # un-augmented inputs: the case where caching is exact
    torch.manual_seed(0)
    model = freeze(build_backbone("simple_convnet", bundle.num_classes, width=0.125))
    options = {"epochs": 3, "batch_size": 50, "lr": 0.1, "seed": 7}
    cached = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options)
    reference, _ = recomputed_probe(model, bundle["search"], bundle["test"], bundle.num_bias, **options)
    assert cached == reference
    # The same seed is the same probe; another seed draws another one (the comparison is not vacuous).
    assert fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options) == cached
    other = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **{**options, "seed": 8})
    assert other != cached
