"""Numeric precision and device settings shared by training, prediction and the mask search.

- `precision: fp32 | bf16` (config key `precision`): `bf16` runs forward passes under
  `torch.autocast(device_type, dtype=torch.bfloat16)` (CPU and CUDA); parameters, optimiser state, gradients
  of the parameters and every loss/metric accumulation stay in fp32 (callers cast logits with `.float()` before
  the loss). `fp32` is the default and is bit-identical to running without autocast (a null context).
  A run resolves it once into one `Autocast` object (`autocast(precision, device)`; nanoGPT's `ctx`) that every
  training loop enters with `with amp:`; `FP32` is the null one, the default of every loop.
- `configure_backends(device, deterministic)`: cuDNN autotuning (`torch.backends.cudnn.benchmark`) on CUDA
  when the run is not deterministic; `configure_determinism(deterministic)` sets `CUBLAS_WORKSPACE_CONFIG`
  before the first CUDA call, which deterministic cuBLAS matmuls need (torch only warns without it).
- `device_generator(generator, device)`: a generator that draws directly on the device, reproducible from the
  CPU generator that shuffles the batches (augmentation and MI subsets draw on the data's device).
- `data_placement(...)`: keep the dataset on the device or in host memory (`data_on_device: auto|always|never`).
- `reset_peak_memory(device)` / `peak_memory_mb(device)`: peak GPU memory of a stage for the records
  (`torch.cuda.max_memory_allocated`); None on the CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from bise_cli.core.errors import check_choice

PRECISIONS = ("fp32", "bf16")
DATA_PLACEMENTS = ("auto", "always", "never")
# cuBLAS's deterministic workspace setting (the CUDA documentation's value; ":16:8" saves memory, runs slower).
CUBLAS_DETERMINISTIC = ":4096:8"
# Kept free on the device beyond the estimated training memory (cuDNN workspaces, the allocator's fragmentation,
# transient buffers): the larger of 2 GiB and a tenth of the card. Erring towards host memory costs little (a
# pinned, non-blocking copy per batch); erring towards the device runs out of memory mid-run.
DEVICE_MARGIN_BYTES = 2 * 2**30
DEVICE_MARGIN_SHARE = 0.10
# The backward pass holds gradients of activations beside the saved activations: their peak is counted as half
# the saved ones again (an estimate, to be checked against peak_gpu_memory_mb on a GPU).
BACKWARD_FACTOR = 1.5
_DTYPES = {"bf16": torch.bfloat16}


# `eval_batch_size: auto`, by device type. On a CPU, batches of 100 keep a convolutional network's activations in
# cache: SimpleConvNet needs 30 % (width 0.25) and 10 % (width 1.0) less time per image than at 500, ResNet18 at
# 32 px 7 % more, the MLP the same, and every output bit-identical on the AVX-512 CPU where this was measured
# (benchmarks/results/eval_batch; other kernels may differ in the last bit); a GPU wants large batches.
EVAL_BATCH_AUTO = {"cpu": 100, "cuda": 500}


def with_eval_batch(cfg: dict, device) -> dict:
    """`cfg` with `eval_batch_size` resolved to a number for `device` (`auto`: EVAL_BATCH_AUTO, 500 for a device
    type it does not list)."""
    if cfg.get("eval_batch_size", "auto") != "auto":
        return cfg
    return {**cfg, "eval_batch_size": EVAL_BATCH_AUTO.get(_device_type(device), EVAL_BATCH_AUTO["cuda"])}


def check_precision(precision: str) -> str:
    """`precision` itself, or a one-line BiseError naming the allowed values."""
    check_choice("precision", precision, PRECISIONS)
    return precision


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


class Autocast:
    """The run's one autocast context for forward passes: `with amp:` is a null context for fp32 and
    torch.autocast(device_type, dtype=torch.bfloat16) for bf16. Reusable and re-entrant (each entry makes its own
    torch.autocast), so one object serves every loop of a run."""

    def __init__(self, precision: str = "fp32", device_type: str = "cpu"):
        self.precision, self.device_type = check_precision(precision), device_type
        self._entered: list = []

    @property
    def enabled(self) -> bool:
        return self.precision != "fp32"

    def __enter__(self) -> Autocast:
        inner = torch.autocast(self.device_type, dtype=_DTYPES[self.precision]) if self.enabled \
            else contextlib.nullcontext()
        inner.__enter__()
        self._entered.append(inner)
        return self

    def __exit__(self, *exc):
        return self._entered.pop().__exit__(*exc)

    def __eq__(self, other) -> bool:
        return isinstance(other, Autocast) and (self.precision, self.device_type) == (other.precision,
                                                                                         other.device_type)

    def __hash__(self) -> int:
        return hash((self.precision, self.device_type))

    def __repr__(self) -> str:
        return f"Autocast({self.precision!r}, {self.device_type!r})"


# The null context: every loop's default (fp32 runs exactly as without autocast, on any device).
FP32 = Autocast()


def autocast(precision: str, device) -> Autocast:
    """The autocast context for `precision` on `device` ("cpu", "cuda", "cuda:0" or a torch.device); a run
    builds it once (`Context.amp`)."""
    return Autocast(precision, _device_type(device))


def configure_backends(device, deterministic: bool) -> None:
    """cuDNN autotuning on CUDA unless the run asked for deterministic algorithms (the autotuner may pick
    different, non-deterministic kernels from run to run). A no-op on the CPU."""
    if _device_type(device) == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def configure_determinism(deterministic: bool) -> None:
    """With `deterministic`, set CUBLAS_WORKSPACE_CONFIG (unless the user set it) so that cuBLAS matmuls are
    deterministic; it must happen before the first cuBLAS call of the process, so the pipeline calls this first.
    Harmless on the CPU."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


def device_generator(generator: torch.Generator, device) -> torch.Generator | None:
    """A generator for drawing random numbers on `device` (where the data lives), reproducible from the CPU
    `generator`: on the CPU `generator` itself (the CPU stream is unchanged); elsewhere a new generator of that
    device seeded by one draw of `generator` (a CPU draw: the host never waits for the device). None on a
    device without generators (`meta`, used by the device tests), whose draws carry no values anyway."""
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return None


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by `tensors` (each distinct storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def training_memory_bytes(model: nn.Module, example: torch.Tensor) -> int | None:
    """Estimated device memory to train `model` on batches shaped like `example`: parameters x 4 (weights,
    gradients and two optimiser states, Adam's worst case) plus BACKWARD_FACTOR x the activations saved for the
    backward pass, counted during one forward pass of a copy on the `meta` device (no memory, no data). None
    when the model cannot run on `meta` (e.g. a Hugging Face model that inspects its attention mask)."""
    import copy

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if id(t) not in weights:  # a layer saves its weight for the backward pass: counted with the parameters
            saved[id(t)] = t.numel() * t.element_size()
        return t

    try:
        meta_model = copy.deepcopy(model).to("meta").train()
        for p in meta_model.parameters():
            p.requires_grad_(True)
        weights = {id(p) for p in meta_model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            meta_model(example.to("meta"))
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return int(4 * params + BACKWARD_FACTOR * sum(saved.values()))


def data_placement(mode: str, device, data_bytes: int, memory: tuple[int, int] | None, training_bytes: int | None,
                   two_models: bool) -> tuple[bool, str]:
    """Whether the data go onto `device` (True) or stay in host memory, with pinned, non-blocking batch copies
    (False), and why. `always` and `never` decide by themselves; on the CPU the data stay where they are. `auto`
    on an accelerator with `memory` = (free, total) bytes: on the device when data_bytes + room <= free, where
    room = the training memory of one model (two when `two_models`: LfF trains a biased and a debiased model at once)
    + max(DEVICE_MARGIN_BYTES, DEVICE_MARGIN_SHARE x total). Without a memory figure `auto` puts the data on the
    device; without a training estimate it counts a quarter of the free memory per model."""
    check_choice("data_on_device", mode, DATA_PLACEMENTS)
    device = torch.device(device)
    gb = 1e9
    if device.type == "cpu":
        return True, f"data_on_device={mode}: the CPU holds the data either way"
    if mode != "auto":
        return mode == "always", f"data_on_device={mode}"
    if memory is None:
        return True, "data_on_device=auto: no memory figure for this device, the data go onto it"
    free, total = memory
    models = 2 if two_models else 1
    training = training_bytes if training_bytes is not None else free // 4
    margin = max(DEVICE_MARGIN_BYTES, int(DEVICE_MARGIN_SHARE * total))
    room = models * training + margin
    fits = data_bytes + room <= free
    return fits, (f"data_on_device=auto: {data_bytes / gb:.2f} GB of data + {room / gb:.2f} GB for training "
                  f"({models} model{'s' if models > 1 else ''} at {training / gb:.2f} GB, {margin / gb:.2f} GB "
                  f"margin) {'<=' if fits else '>'} {free / gb:.2f} GB free of {total / gb:.2f} GB: "
                  f"{'on the device' if fits else 'pinned host memory, non-blocking batch copies'}")


def device_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA `device`; None elsewhere."""
    if _device_type(device) != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def reset_peak_memory(device) -> None:
    """Start a new peak-memory measurement on a CUDA `device` (no-op elsewhere)."""
    if _device_type(device) == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, in MiB; None on the CPU."""
    if _device_type(device) != "cuda" or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
