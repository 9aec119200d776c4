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
    cached = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options,
                                 feature_batch_size=100)
    reference, _ = recomputed_probe(model, bundle["search"], bundle["test"], bundle.num_bias, **options)
    assert cached == reference
    # The same seed is the same probe; another seed draws another one (the comparison is not vacuous).
    assert fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **options,
                               feature_batch_size=100) == cached
    other = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, **{**options, "seed": 8},
                                feature_batch_size=100)
    assert other != cached


@pytest.mark.parametrize("batch_size", [64, 100])
def test_evaluation_hands_its_test_features_to_the_probe(smoke_model, batch_size):
    """Evaluation passes over the test split once and the probe uses that pass's features: the metrics are
    exactly those of the separate passes at the same batch size (test metrics, then a probe computing its own
    test features), and the test split is forwarded once instead of twice."""
    from bise_cli.method.evaluate import evaluate_model, split_metrics

    bundle, model, probe = smoke_model.bundle, smoke_model.model, smoke_model.probe
    smoke_model.sizes.clear()
    shared = evaluate_model(model, bundle, batch_size=batch_size, device="cpu", probe=probe, seed=3)
    evaluated = sum(len(bundle[name]) for name in ("test", "val", "search") if bundle.get(name) is not None)
    assert sum(smoke_model.sizes) == evaluated  # test, val and the probe's search features: each split once
    assert max(smoke_model.sizes) == batch_size

    separate = split_metrics(model, bundle, "test", batch_size, "cpu")
    for name in ("val", "test_conflicting"):
        if bundle.get(name) is not None:
            extra = split_metrics(model, bundle, name, batch_size, "cpu")
            separate.update({f"{name}_{k}": v for k, v in extra.items() if isinstance(v, float)})
    leakage = fresh_probe_leakage(model, bundle["search"], bundle["test"], bundle.num_bias, seed=3, **probe,
                                  feature_batch_size=batch_size)
    separate["leakage"] = sum(leakage) / len(leakage)
    assert shared == separate


def test_the_evaluation_batch_size_changes_no_metric_on_a_cpu(smoke_model):
    """`eval_batch_size: auto` evaluates in batches of 100 on a CPU instead of 500: the bottleneck features and the
    predictions agree (bit for bit on the AVX-512 machine where it was measured; a kernel that blocks by batch may
    differ in the last bit elsewhere, hence the tolerance), so every accuracy metric is the same and the probe's
    leakage agrees."""
    from bise_cli.method.evaluate import evaluate_model

    bundle, model, probe = smoke_model.bundle, smoke_model.model, smoke_model.probe
    passes = {size: predict(model, bundle["test"], size, "cpu", features=True) for size in (100, 500, 37)}
    for size in (100, 37):
        assert torch.allclose(passes[size]["z"], passes[500]["z"], rtol=1e-5, atol=1e-6)
        assert torch.equal(passes[size]["pred"], passes[500]["pred"])
    metrics = {size: evaluate_model(model, bundle, batch_size=size, device="cpu", probe=probe, seed=3)
               for size in (100, 500)}
    accuracy = [k for k in metrics[500] if k.startswith(("acc", "val_acc"))]
    assert len(accuracy) > 5 and all(metrics[100][k] == metrics[500][k] for k in accuracy)
    assert abs(metrics[100]["leakage"] - metrics[500]["leakage"]) < 0.005
    assert 0 < metrics[100]["acc"] < 1 and 0 < metrics[100]["leakage"] <= 1  # real metrics, not empty ones


def test_eval_batch_size_auto_resolves_by_device_and_a_number_is_kept():
    """`auto` is 100 on a CPU and 500 on a GPU; a number the user gives is used as it is."""
    from bise_cli.core.precision import with_eval_batch

    assert with_eval_batch({"eval_batch_size": "auto"}, "cpu")["eval_batch_size"] == 100
    assert with_eval_batch({"eval_batch_size": "auto"}, torch.device("cuda"))["eval_batch_size"] == 500
    assert with_eval_batch({"eval_batch_size": 64}, "cpu")["eval_batch_size"] == 64
