"""SoftCon and BiasCon + BiasBal (Hong & Yang, NeurIPS 2021): the losses against their formulas on hand-made
batches, BiasBal's logit adjustment, the sampler weights, and the stages through the pipeline and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bise_cli.baselines import contrastive as con
from bise_cli.core.errors import BiseError
from bise_cli.run import pipeline

from conftest import TINY_OVERRIDES, compose_config

# The stages at smoke size: one epoch, small batches (the smoke split has 300 samples).
TINY_CONTRASTIVE = [f"baselines.{stage}.{key}" for stage in ("softcon", "bcon_bbal")
                    for key in ("epochs=1", "batch_size=64", "contrastive_batch_size=16")]


def _loss_by_loops(features, labels, weights, temperature):
    """The bias-contrastive loss written out anchor by anchor from its formula (no row-max shift)."""
    batch, views, _ = features.shape
    flat = [(i, v) for v in range(views) for i in range(batch)]
    total = 0.0
    for a, (i, v) in enumerate(flat):
        others = [k for k in range(len(flat)) if k != a]
        denominator = sum(math.exp(float(features[i, v] @ features[flat[k][0], flat[k][1]]) / temperature)
                          for k in others)
        numerator, weight_sum = 0.0, 0.0
        for k in others:
            j = flat[k][0]
            w = float(weights[i, j]) * float(labels[i] == labels[j])
            if w:
                s = float(features[i, v] @ features[j, flat[k][1]]) / temperature
                numerator += w * (s - math.log(denominator))
                weight_sum += w
        total += -numerator / (weight_sum if weight_sum else 1.0)
    return total / len(flat)


def _batch(seed=0, batch=6, dim=5):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, 2, dim, generator=g), dim=2)


def test_biascon_positives_are_same_class_other_bias_and_the_loss_matches_its_formula():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    bias = torch.tensor([0, 1, 0, 1, 1, 0])
    weights = con.biascon_pair_weights(bias)
    # Sample 0 (class 0, bias 0): its only positive is sample 1 (class 0, bias 1); sample 2 shares its bias and its
    # own second view shares everything, so neither is a positive.
    positives = (weights * (labels.view(-1, 1) == labels.view(1, -1)))[0]
    assert positives.tolist() == [0, 1, 0, 0, 0, 0]
    features = _batch()
    loss = con.bias_contrastive_loss(features, labels, weights, temperature=0.5)
    assert loss.item() == pytest.approx(_loss_by_loops(features, labels, weights, 0.5), rel=1e-5)


def test_an_anchor_without_positives_counts_zero_in_the_mean():
    features = _batch(1, batch=2)
    labels, bias = torch.tensor([0, 1]), torch.tensor([0, 1])   # different classes: no positives at all
    assert con.bias_contrastive_loss(features, labels, con.biascon_pair_weights(bias)).item() == 0.0


def test_softcon_weights_are_one_minus_cosine_and_soften_the_loss():
    bias_features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    weights = con.softcon_pair_weights(bias_features)
    for i in range(4):
        for j in range(4):
            cos = float(bias_features[i] @ bias_features[j] / bias_features[i].norm() / bias_features[j].norm())
            assert weights[i, j].item() == pytest.approx(1 - cos, abs=1e-6)
    assert weights[0, 3].item() == pytest.approx(0.0, abs=1e-6)   # same bias direction: not a positive
    labels = torch.tensor([0, 0, 1, 0])
    features = _batch(2, batch=4)
    loss = con.bias_contrastive_loss(features, labels, weights, temperature=0.07)
    assert loss.item() == pytest.approx(_loss_by_loops(features, labels, weights, 0.07), rel=1e-5)


def test_biasbal_adds_the_log_class_given_bias_prior():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    b = torch.tensor([0, 0, 0, 1, 1, 1])
    prior = con.class_given_bias_prior(y, b, num_classes=3, num_bias=2)
    # P(y | b): bias 0 -> classes 0, 0, 1; bias 1 -> classes 1, 1, 2.
    assert torch.allclose(prior, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 2 / 3, 1 / 3]]))
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 0.0]])
    adjusted = con.bias_balanced_logits(logits, torch.tensor([0, 1]), prior)
    expected = logits + torch.log(torch.stack([prior[0], prior[1]]) + 1e-9)
    assert torch.allclose(adjusted, expected)
    assert adjusted[0, 2].item() == pytest.approx(3.0 + math.log(1e-9))   # a class bias 0 never shows: ~ -inf


def test_sampler_weights_joint_bias_and_ratio_cap():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    b = torch.tensor([0, 0, 0, 1, 1, 0])
    weights = con.biascon_sampler_weights(y, b, num_classes=2, num_bias=2)
    assert weights.tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 4.0, 2.0, 2.0])   # 1 / P(b | y)
    assert con.clip_ratio(weights, 2).tolist() == pytest.approx([4 / 3] * 3 + [8 / 3, 2.0, 2.0])
    assert torch.equal(con.clip_ratio(weights, 0), weights)
    two = torch.tensor([[0, 1], [2, 2], [1, 0]])
    assert con.joint_bias(two, num_bias=3).tolist() == [1, 8, 3]
    # SoftCon's marginal with every class member as a reference: each sample's sum of 1 - cos within its class.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    marginal = con.softcon_sampler_weights(feats, y, 2, torch.Generator().manual_seed(0))
    cos = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T
    expected = [float((1 - cos[i, y == y[i]]).sum()) for i in range(6)]
    assert marginal.tolist() == pytest.approx(expected, abs=1e-6)


# Smoke-size stages with the slow extras of evaluation off (bootstrap, the fresh probe): they are not tested here.
SMOKE = [*TINY_OVERRIDES, *TINY_CONTRASTIVE, "bootstrap.n=0", "leakage_probe.epochs=0"]


def test_cli_runs_both_stages_and_their_caches_key_what_they_read(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    stages = "stages=[vanilla,softcon,bcon_bbal]"
    command = [sys.executable, "-m", "bise_cli", "run", *SMOKE, stages, f"output_root={out}"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = out.glob("runs/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["stage"] for r in records] == ["vanilla", "softcon", "bcon_bbal"]
    for record in records[1:]:
        assert {"dataset", "backbone", "rho", "seed"} <= set(record["keys"])
        assert 0 <= record["acc_unbiased"] <= 1 and record["macs"] == records[0]["macs"]
        assert record["best_epoch"] == 1 and record["data_sha256"] == records[0]["data_sha256"]
        history = json.loads((metrics.parent / f"{record['stage']}_history.json").read_text())
        assert [row["epoch"] for row in history] == [1] and history[0]["loss_contrastive"] > 0

    # The same settings in-process, on the cache the CLI run filled: which stages train again.
    trained = []
    real = con.train_contrastive

    def counting(*args, **kwargs):
        trained.append(kwargs["description"])
        return real(*args, **kwargs)

    monkeypatch.setattr(con, "train_contrastive", counting)

    def run(folder, *extra):
        return pipeline.run(compose_config([*SMOKE, stages, f"output_root={out}", *extra]), tmp_path / folder)

    again = run("a")
    assert trained == [] and [r["acc_unbiased"] for r in again] == [r["acc_unbiased"] for r in records]
    run("b", "baselines.bcon_bbal.temperature=0.1")
    assert trained == ["bcon_bbal"]                # its own setting: only it recomputes
    run("c", "train.lr=0.05")
    # A new vanilla model is a new bias-capturing model for SoftCon; every stage's key holds its parent's (the
    # vanilla's, with its recipe), so BiasCon + BiasBal, which does not read that recipe, recomputes too (a
    # conservative miss, never a stale hit).
    assert trained == ["bcon_bbal", "softcon", "bcon_bbal"]


def test_bcon_bbal_refuses_pseudo_labels_for_several_attributes(tmp_path):
    cfg = compose_config(["dataset=multicolor_mnist", "backbone=mlp", "dataset.source=embedded",
                          "dataset.max_samples=300", "train.epochs=1", "leakage_probe.epochs=0", "latency.repeats=1",
                          "latency.warmup=0", "bootstrap.n=0", "bias_labels=identification", *TINY_CONTRASTIVE,
                          "stages=[vanilla,bcon_bbal]", f"output_root={tmp_path / 'outputs'}"])
    with pytest.raises(BiseError, match="bcon_bbal with bias_labels=identification needs one bias attribute"):
        pipeline.run(cfg, tmp_path / "run")


def test_the_authors_schedule_never_decays_before_the_first_step():
    """lr / 10 after a third and two thirds of the epochs; their formula's milestone 0 (under 3 epochs) would make
    MultiStepLR start at lr / 100 (1 epoch), so a smoke-size run trains at the configured rate."""
    from bise_cli.baselines.contrastive import contrastive_recipe, default_milestones
    from bise_cli.method.train import recipe_optimizer, recipe_scheduler

    assert default_milestones(80) == [26, 53] and default_milestones(40) == [13, 26] and default_milestones(3) == [1, 2]
    assert default_milestones(2) == [1] and default_milestones(1) == []
    for epochs in (1, 2, 3):
        recipe = contrastive_recipe({"epochs": epochs, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0,
                                     "milestones": "auto"}, "baselines.softcon")
        opt = recipe_optimizer(recipe, [torch.nn.Parameter(torch.zeros(1))])
        recipe_scheduler(recipe, opt, 1)
        assert opt.param_groups[0]["lr"] == 1e-3, epochs
