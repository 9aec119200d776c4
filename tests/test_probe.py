"""The fresh leakage probe trains on bottleneck features computed once (bise_cli.method.probe.fresh_probe_leakage): on
un-augmented inputs that is the same probe as one that recomputes the frozen model's features for every batch of
every epoch (the same seed draws the same heads and the same batch order)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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


@pytest.fixture(scope="module")
def smoke_model():
    """The smoke preset's bundle, a frozen width-0.125 SimpleConvNet, the probe settings of the evaluation tests,
    and `sizes`: a forward hook on the model records the batch size of every forward pass there (a test clears it
    before the passes it counts)."""
    bundle = pipeline.load_data(compose_config(TINY_OVERRIDES))
    torch.manual_seed(0)
    model = freeze(build_backbone("simple_convnet", bundle.num_classes, width=0.125))
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: sizes.append(len(inputs[0])))
    yield SimpleNamespace(bundle=bundle, model=model, probe={"epochs": 3, "batch_size": 50, "lr": 0.1}, sizes=sizes)
    handle.remove()


def test_cached_feature_probe_equals_the_recomputed_probe(smoke_model):
    bundle, model = smoke_model.bundle, smoke_model.model
    assert bundle["search"].augment is None  # un-augmented inputs: the case where caching is exact
    options = {"epochs": 3, "batch_size": 50, "lr": 0.1, "seed": 7}
    cached = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options)
    reference, _ = recomputed_probe(model, bundle["search"], bundle["test"], bundle.num_bias, **options)
    assert cached == reference
    # The same seed is the same probe; another seed draws another one (the comparison is not vacuous).
    assert fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options) == cached
    other = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **{**options, "seed": 8})
    assert other != cached


def test_evaluation_hands_its_test_features_to_the_probe(smoke_model):
    """At the probe's feature batch size, evaluation passes over the test split once and the probe uses that
    pass's features: the metrics are exactly those of the separate passes (test metrics, then a probe computing
    its own test features), and the test split is forwarded once instead of twice."""
    from bise_cli.method.evaluate import evaluate_model, split_metrics
    from bise_cli.method.probe import FEATURE_BATCH

    bundle, model, probe = smoke_model.bundle, smoke_model.model, smoke_model.probe
    smoke_model.sizes.clear()
    shared = evaluate_model(model, bundle, batch_size=FEATURE_BATCH, device="cpu", probe=probe, seed=3)
    evaluated = sum(len(bundle[name]) for name in ("test", "val", "search") if bundle.get(name) is not None)
    assert sum(smoke_model.sizes) == evaluated  # test, val and the probe's search features: each split once

    separate = split_metrics(model, bundle, "test", FEATURE_BATCH, "cpu")
    for name in ("val", "test_conflicting"):
        if bundle.get(name) is not None:
            extra = split_metrics(model, bundle, name, FEATURE_BATCH, "cpu")
            separate.update({f"{name}_{k}": v for k, v in extra.items() if isinstance(v, float)})
    leakage = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, seed=3, **probe)
    separate["leakage"] = sum(leakage) / len(leakage)
    assert shared == separate


def test_evaluation_at_another_batch_size_lets_the_probe_compute_its_own_features(smoke_model):
    """Features from a pass at another batch size may round differently: then the probe makes its own pass at
    FEATURE_BATCH, so its leakage is the one it always reported."""
    from bise_cli.method.evaluate import evaluate_model
    from bise_cli.method.probe import FEATURE_BATCH

    bundle, model, probe = smoke_model.bundle, smoke_model.model, smoke_model.probe
    smoke_model.sizes.clear()
    metrics = evaluate_model(model, bundle, batch_size=64, device="cpu", probe=probe, seed=3)
    forwarded = sum(len(bundle[name]) for name in ("test", "val", "search", "test") if bundle.get(name) is not None)
    assert FEATURE_BATCH != 64 and sum(smoke_model.sizes) == forwarded
    leakage = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, seed=3, **probe)
    assert metrics["leakage"] == sum(leakage) / len(leakage)
