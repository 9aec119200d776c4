"""Reading a state dict the user brings (`vanilla_checkpoint=PATH`, `backbone.weights=PATH`) safely, and
explaining in one line why it does not fit a model.

A `.safetensors` file is read with the safetensors library (tensors only by construction); anything else with
`torch.load(weights_only=True)`, which refuses pickled code. A checkpoint may be a bare state dict or a dict
holding one under `state_dict` (what most training scripts save), optionally with a `module.` prefix
(DataParallel / DistributedDataParallel).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bise_cli.core.errors import BiseError

SHOW = 4  # key names shown per kind of mismatch; the count says how many there are


def read_state_dict(path: str | Path, what: str = "vanilla_checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of the state dict stored at `path` (on the CPU); a one-line BiseError naming `what` when
    the file is missing, unreadable or not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise BiseError(f"{what}={str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise BiseError(f"cannot read {what} {str(path)!r}: the file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, not a torch/safetensors file, truncated: the user's file
        lines = str(error).strip().splitlines()   # some errors (EOFError) have no message at all
        reason = lines[0][:200] if lines else type(error).__name__
        raise BiseError(f"cannot read {what} {str(path)!r}: {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BiseError(f"{what} {str(path)!r} is not a state dict (a mapping of parameter names to tensors); "
                        f"got {type(state).__name__}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOW])
    return f"{len(names)} ({shown}{', ...' if len(names) > SHOW else ''})"


def optional_keys(model: nn.Module) -> set[str]:
    """State-dict keys that `load_state_dict(strict=True)` fills in itself when a checkpoint lacks them: BatchNorm's
    `num_batches_tracked` (added in PyTorch 0.4.1; a state dict without version metadata, as every dict read
    here, may leave it out and gets the module's current count)."""
    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats}


def _kind(dtype: torch.dtype) -> str:
    """What a tensor holds, for the dtype check: load_state_dict converts between float precisions (a float16
    checkpoint into a float32 model is fine) but a cast between these kinds changes what the values mean."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def mismatch(model: nn.Module, state: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> str:
    """'' when `state` loads strictly into `model`; else which keys are missing, unexpected, of another shape or
    of another kind of dtype (integers or booleans where the model has floats, or the other way round). Keys
    starting with a prefix in `ignore` are left out on both sides; keys PyTorch fills in itself
    (`optional_keys`) may be missing."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    given = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(expected) - set(given) - optional_keys(model))
    unexpected = sorted(set(given) - set(expected))
    both = sorted(set(expected) & set(given))
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in both if given[k].shape != expected[k].shape]
    dtypes = [f"{k} {str(given[k].dtype).removeprefix('torch.')} vs {str(expected[k].dtype).removeprefix('torch.')}"
              for k in both if _kind(given[k].dtype) != _kind(expected[k].dtype)]
    parts = [f"missing keys {_listed(missing)}" if missing else "",
             f"unexpected keys {_listed(unexpected)}" if unexpected else "",
             f"shape mismatches {_listed(shapes)}" if shapes else "",
             f"dtype mismatches {_listed(dtypes)}" if dtypes else ""]
    return "; ".join(p for p in parts if p)


def align_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the model's wrapper prefix added when that makes its keys match: bise wraps user models
    (e.g. a torchvision ResNet as `net`, a Hugging Face model as `model`), while users save the plain model's
    state dict. Unchanged when the keys already match or the prefix does not help."""
    expected = set(model.state_dict())
    if set(state) & expected:
        return state
    heads = {key.split(".", 1)[0] for key in expected}
    if len(heads) == 1:
        prefix = f"{heads.pop()}."
        prefixed = {prefix + k: v for k, v in state.items()}
        if set(prefixed) & expected:
            return prefixed
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load `state` into `model` (strict except for keys under `ignore`; the model's wrapper prefix added when
    needed), or a one-line BiseError that names what does not match."""
    state = align_prefix(model, state)
    problem = mismatch(model, state, ignore)
    if problem:
        raise BiseError(f"{what} does not match the model: {problem}")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(ignore)}, strict=not ignore)
