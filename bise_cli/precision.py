"""Numeric precision and device-speed settings shared by training, prediction and the mask search.

- `precision: fp32 | bf16` (config key `precision`): `bf16` runs forward passes under
  `torch.autocast(device_type, dtype=torch.bfloat16)` (CPU and CUDA); parameters, optimiser state, gradients
  of the parameters and every loss/metric accumulation stay in fp32 (callers cast logits with `.float()` before
  the loss). `fp32` is the default and is bit-identical to running without autocast (a null context).
- `configure_backends(device, deterministic)`: cuDNN autotuning (`torch.backends.cudnn.benchmark`) on CUDA
  when the run is not deterministic.
- `reset_peak_memory(device)` / `peak_memory_mb(device)`: peak GPU memory of a stage for the records
  (`torch.cuda.max_memory_allocated`); None on the CPU.
"""

from __future__ import annotations

import contextlib

import torch

from bise_cli.errors import check_choice

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """`precision` itself, or a one-line BiseError naming the allowed values."""
    check_choice("precision", precision, PRECISIONS)
    return precision


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """A context manager for forward passes in `precision` on `device` ("cpu", "cuda", "cuda:0" or a
    torch.device): a null context for fp32, torch.autocast(device_type, dtype=torch.bfloat16) for bf16."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=_DTYPES[precision])


def configure_backends(device, deterministic: bool) -> None:
    """cuDNN autotuning on CUDA unless the run asked for deterministic algorithms (the autotuner may pick
    different, non-deterministic kernels from run to run). A no-op on the CPU."""
    if _device_type(device) == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def reset_peak_memory(device) -> None:
    """Start a new peak-memory measurement on a CUDA `device` (no-op elsewhere)."""
    if _device_type(device) == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, in MiB; None on the CPU."""
    if _device_type(device) != "cuda" or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
