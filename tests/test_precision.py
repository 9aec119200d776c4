"""precision: fp32 | bf16 (bise_cli.core.precision): bf16 autocast stays close to fp32, fp32 is exactly the plain
path, bad names fail in one line; Split.to keeps batching on the split's device."""

from __future__ import annotations

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.core.precision import autocast, check_precision, configure_backends, peak_memory_mb
from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone

RECIPE = TrainRecipe(epochs=1, batch_size=16)


def _split(n: int = 64, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y, y.clone(), lambda t: t.float().div(127.5).sub(1))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return freeze(build_backbone("simple_convnet", 10, width=0.25))


def test_bf16_logits_close_to_fp32():
    model, x = _model(), torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)
        with autocast("bf16", "cpu"):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.1, rtol=0.05), (low.float() - ref).abs().max()


def test_fp32_is_the_plain_path_bit_for_bit():
    model, x = _model(), torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        ref = model(x)
        with autocast("fp32", "cpu"):
            same = model(x)
    assert torch.equal(same, ref)

    # fit: the default and an explicit fp32 context give identical weights
    states = []
    for kwargs in ({}, {"amp": autocast("fp32", "cpu")}):
        torch.manual_seed(0)
        net = build_backbone("simple_convnet", 10, width=0.25)
        fit(net, _split(), RECIPE, seed=0, **kwargs)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bf16_fit_and_predict_run_and_keep_fp32_outputs():
    torch.manual_seed(0)
    net = build_backbone("simple_convnet", 10, width=0.25)
    history = fit(net, _split(), RECIPE, seed=0, amp=autocast("bf16", "cpu"))
    assert isinstance(history[0]["loss"], float) and history[0]["loss"] > 0
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out = predict(net, _split(32, 1), 16, features=True, amp=autocast("bf16", "cpu"))
    ref = predict(net, _split(32, 1), 16, features=True)
    assert out["z"].dtype == torch.float32 and out["z"].shape == ref["z"].shape
    assert (out["pred"] == ref["pred"]).float().mean() >= 0.8
    assert torch.allclose(out["z"], ref["z"], atol=0.1, rtol=0.05)


def test_unknown_precision_is_a_one_line_error():
    for call in (lambda: check_precision("fp16"), lambda: autocast("half", "cpu")):
        with pytest.raises(BiseError, match="precision") as info:
            call()
        assert "\n" not in str(info.value) and "fp32" in str(info.value)


def test_cpu_helpers_are_noops():
    configure_backends("cpu", deterministic=False)
    assert peak_memory_mb("cpu") is None


def test_split_to_keeps_batches_on_its_device():
    split = _split(10)
    assert split.to("cpu") is split
    device = "cuda" if torch.cuda.is_available() else "meta"
    if device == "meta":
        pytest.skip("no CUDA device")
    moved = split.to(device)
    assert moved.x.device.type == "cuda" and moved.y.device.type == "cuda"
    batches = list(moved.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0), device=device))
    reference = list(split.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    for (x, y, b), (rx, ry, rb) in zip(batches, reference, strict=True):
        assert x.is_cuda and torch.equal(y.cpu(), ry) and torch.equal(x.cpu(), rx) and torch.equal(b.cpu(), rb)
