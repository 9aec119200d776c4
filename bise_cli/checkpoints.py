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

from bise_cli.errors import BiseError

SHOW = 4  # key names shown per kind of mismatch; the count says how many there are


def read_state_dict(path: str | Path, what: str = "vanilla_checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of the state dict stored at `path` (on the CPU); a one-line BiseError naming `what` when
    the file is missing, unreadable or not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise BiseError(f"{what}={str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, not a torch/safetensors file, truncated: the user's file
        raise BiseError(f"cannot read {what} {str(path)!r}: {str(error).splitlines()[0][:200]}") from None
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


def mismatch(model: nn.Module, state: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> str:
    """'' when `state` loads strictly into `model`; else which keys are missing, unexpected or of another shape.
    Keys starting with a prefix in `ignore` are left out on both sides."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    given = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if given[k].shape != expected[k].shape]
    parts = [f"missing keys {_listed(missing)}" if missing else "",
             f"unexpected keys {_listed(unexpected)}" if unexpected else "",
             f"shape mismatches {_listed(shapes)}" if shapes else ""]
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
