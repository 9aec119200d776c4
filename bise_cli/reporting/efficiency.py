"""Size and speed of dense vs pruned models: parameters, weight sparsity, MACs and measured latency.

- weights counted for sparsity: the `.weight` tensors of conv and linear layers (FFW's convention; BN
  parameters and biases are left out).
- MACs: torch.utils.flop_counter on one input (FLOPs / 2), i.e. the multiply-accumulates of convs, linears
  and matmuls, fvcore-style.
- latency: median time per forward pass in inference mode, measured with torch.utils.benchmark.Timer
  (`blocked_autorange`: blocks of enough calls that the timer's overhead is negligible, the median over about
  `repeats` blocks; CUDA is synchronised by the Timer) after `warmup` untimed passes (which also let cuDNN
  autotune).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bise_cli.models.masking import kept_units, unit_sparsity


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_weights(model: nn.Module) -> int:
    """Number of elements in the weights of conv and linear layers."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))


def weight_sparsity(dense: nn.Module, pruned: nn.Module) -> float:
    """Fraction of conv/linear weights removed: 1 - pruned / dense."""
    return 1.0 - prunable_weights(pruned) / prunable_weights(dense)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (pass a batch of one for per-input MACs)."""
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


def _benchmark_module():
    """torch.utils.benchmark, imported on first use: it pulls in torch.utils.cpp_extension (0.2 s at start-up
    of every command otherwise), whose import logs "No CUDA runtime is found" on CPU-only machines with a CUDA
    build of torch; that warning says nothing about bise and is silenced."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_log.setLevel(level)
    return benchmark


def measure_latency(model: nn.Module, example: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds per forward pass on `example` (inference mode, on the current torch thread count)."""
    benchmark = _benchmark_module()
    model.eval()
    timer = benchmark.Timer(stmt="model(example)", globals={"model": model, "example": example},
                            num_threads=torch.get_num_threads())
    with torch.inference_mode():  # thread-local, and the Timer runs the statement in this thread
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            model(example)
        if example.is_cuda:
            torch.cuda.synchronize(example.device)
        per_call = (time.perf_counter() - start) / max(1, warmup)
        # About `repeats` timed blocks: the Timer stops once min_run_time is spent (at least one block).
        measurement = timer.blocked_autorange(min_run_time=max(1, repeats) * per_call)
    return measurement.median * 1000


def _batch(example: torch.Tensor, size: int) -> torch.Tensor:
    return example[:1].repeat(size, *([1] * (example.dim() - 1)))


def efficiency_report(dense: nn.Module, pruned: nn.Module, masks: dict[str, torch.Tensor] | None,
                      example: torch.Tensor, device, repeats: int = 10, warmup: int = 2) -> dict:
    """Every efficiency metric of `pruned` (and the dense reference) for one input `example` (batch of one)."""
    example = example.to(device)
    models = {"": pruned} if dense is pruned else {"": pruned, "_dense": dense}
    report = {"sparsity_units": unit_sparsity(masks) if masks else 0.0,
              "sparsity_weights": weight_sparsity(dense, pruned), "params": count_params(pruned),
              "params_dense": count_params(dense), "macs": count_macs(pruned, _batch(example, 1)),
              "macs_dense": count_macs(dense, _batch(example, 1))}
    for suffix, model in models.items():
        for batch in (1, 100):
            report[f"latency_ms_b{batch}{suffix}"] = measure_latency(model, _batch(example, batch), repeats, warmup)
    if dense is pruned:
        report.update(latency_ms_b1_dense=report["latency_ms_b1"], latency_ms_b100_dense=report["latency_ms_b100"])
    if masks:
        report["kept_units"] = {name: list(pair) for name, pair in kept_units(masks).items()}
    return report
