"""Automatic BISE gates and exact physical pruning for models bise did not write (torchvision, timm, your own).

Where the gates go is planned in `bise_cli.models.gate_plan` (Torch-Pruning's dependency graph, DepGraph:
Fang et al., CVPR 2023; the exact-gate principle and the kinds of gates are described there). This module
prunes a model physically by its plan (`prune_planned`, checked for exactness: `verified_plan`), wraps a
user model as a bise backbone (`AutoGatedNet`, `PrunedAutoNet`) and describes the gates of any backbone
(`describe_gates`, for `bise gates`); it is the import point of automatic gates for the rest of bise.

A layer whose gate is emptied keeps one dummy channel whose readers' weights are zeroed, as in
`bise_cli.models.slicing`. Every pruning ends with a check: pruned and gated logits are compared on a random
input, and a mismatch is a one-line BiseError naming the model (so a family whose ops this module misreads can
never yield a silently different model). At construction the same check runs once with random masks; groups
that fail it are demoted to masked-not-removed gates.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import warnings

import torch
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.models.base import Backbone
from bise_cli.models.gate_plan import GatePlan, build_graph, plan_gates
from bise_cli.models.masking import GatePoint, GateSet, capture_input

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ pruning

class KeptInput(nn.Module):
    """A layer that reads only the kept units (`index`) of its input along `dim`: the physical form of a
    masked-not-removed gate (the tensor keeps its width, the reader's weights lose the pruned columns)."""

    def __init__(self, layer: nn.Module, kept: int, dim: int):
        super().__init__()
        self.layer = layer
        self.dim = dim
        self.register_buffer("index", torch.arange(kept))  # filled by prune_planned or load_state_dict

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.layer(x.index_select(self.dim, self.index), *args, **kwargs)


class MaskedOutput(nn.Module):
    """A block whose output keeps its width with the switched-off channels zeroed (`mask` along `dim`): the
    physical form of a residual-stream gate, as the paper's pruned ResNet-18 keeps a fixed mask on each block."""

    def __init__(self, block: nn.Module, mask: torch.Tensor, dim: int):
        super().__init__()
        self.block = block
        self.dim = dim
        self.register_buffer("mask", mask.detach().float().reshape(-1).clone())

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        shape = [1] * out.dim()
        shape[self.dim] = -1
        return out * self.mask.to(out).view(shape)  # the gate's own product (masking.Gate.apply)


def _strip_hooks(net: nn.Module) -> None:
    """Remove forward hooks from a deep copy: gate hooks copied with the model would still call the original
    gates (a deep copy shares the hook closures)."""
    for module in net.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(module, attr, {}).clear()


def _zero_input_column(layer: nn.Module, column: int) -> None:
    """Make `layer` ignore input unit `column` (the dummy unit left by an emptied gate)."""
    with torch.no_grad():
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
            layer.weight[column] = 0
        else:
            layer.weight[:, column] = 0


def _remove_input_units(layer: nn.Module, drop: list[int]) -> nn.Module:
    import torch_pruning as tp

    if drop:
        fn = tp.prune_linear_in_channels if isinstance(layer, nn.Linear) else tp.prune_conv_in_channels
        fn(layer, drop)
    return layer


def _split(mask: torch.Tensor) -> tuple[list[int], list[int], bool]:
    """(kept, dropped, emptied) unit indices; an emptied mask keeps unit 0 as a dummy."""
    mask = mask.detach().bool().cpu().reshape(-1)
    kept = torch.nonzero(mask).flatten().tolist()
    emptied = not kept
    if emptied:
        kept = [0]
    dropped = sorted(set(range(mask.numel())) - set(kept))
    return kept, dropped, emptied


def check_in_float64(device: torch.device) -> bool:
    """Whether the exactness check runs in float64 on `device`: on CUDA, where TF32 kernels differ by ~1e-3
    between the gated and the pruned model; not on CPUs (no TF32, and float64 convolutions are tens of times
    slower) nor on MPS (no float64)."""
    return device.type == "cuda"


def tolerance(device: torch.device) -> float:
    """The largest relative gap `prune_planned` accepts as exact: summation-order noise only (~1e-15 in the
    float64 check, ~1e-7 in float32)."""
    return 1e-6 if check_in_float64(device) else 1e-4


def prune_planned(net: nn.Module, plan: GatePlan, masks: dict[str, torch.Tensor], example: torch.Tensor,
                  check: bool = False) -> tuple[nn.Module, float | None]:
    """A pruned deep copy of `net` (no hooks, eval mode): removable gates remove their group with
    Torch-Pruning's `group.prune`, masked-not-removed gates make their readers read only the kept units.

    With `check`, also the exactness gap: the largest |pruned - gated| logit on `example` relative to 1 + the
    largest gated logit (the gated logits come from the same copy, gated by hooks, before it is pruned). Where
    `check_in_float64`, the copy is checked in float64 and converted back (float32 -> float64 -> float32 is
    lossless)."""
    pruned = copy.deepcopy(net)
    _strip_hooks(pruned)
    pruned.eval()
    parameter = next(pruned.parameters())
    dtype, example = parameter.dtype, example.to(parameter.device)
    in_float64 = check and check_in_float64(example.device)
    if in_float64:
        pruned.double()
        example = example.double()
    gated = None
    if check:
        gates = GateSet(plan.gates).to(example.device).attach(pruned)
        gates.load_binary_masks(masks)
        gates.set_mode("fixed")
        with torch.no_grad():
            gated = pruned(example)
        gates.detach()
    graph = build_graph(pruned, example)
    dead_columns = []
    for point in plan.gates:
        if not point.removable:
            continue
        kept, dropped, emptied = _split(masks[point.name])
        if dropped:
            producer = pruned.get_submodule(point.producer)
            pruner = graph.get_pruner_of_module(producer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = graph.get_pruning_group(producer, pruner.prune_out_channels, dropped)
            group.prune(record_history=False)
        if emptied:
            dead_columns.extend(point.modules)
    for name in dead_columns:
        _zero_input_column(pruned.get_submodule(name), 0)
    streams = []
    for point in plan.gates:
        if point.removable:
            continue
        kept, dropped, emptied = _split(masks[point.name])
        if not dropped and not emptied:
            continue  # every unit kept: the readers (and the block) stay as they are
        if point.where == "output":  # a stream gate: its block zeroes them, the layers reading it skip them
            readers = plan.covered.get(point.name, [])
            streams.append(point)
        else:
            readers = [(name, point.dim) for name in point.modules]
        for name, dim in readers:
            layer = _remove_input_units(pruned.get_submodule(name), dropped)
            if emptied:
                _zero_input_column(layer, 0)
            wrapper = KeptInput(layer, len(kept), dim)
            wrapper.index.copy_(torch.tensor(kept, dtype=torch.long))
            pruned.set_submodule(name, wrapper.to(layer.weight.device))
    # Blocks are wrapped once every reader is replaced (a wrapper moves the names below it), innermost first.
    for point in sorted(streams, key=lambda p: -p.module.count(".")):
        block = pruned.get_submodule(point.module)
        mask = masks[point.name].detach().reshape(-1).cpu()
        pruned.set_submodule(point.module, MaskedOutput(block, mask, point.dim).to(parameter.device))
    # Torch-Pruning's new parameters require grad; the copy follows the original (frozen or trainable) instead.
    trainable = any(p.requires_grad for p in net.parameters())
    for param in pruned.parameters():
        param.requires_grad_(trainable)
    pruned.eval()
    if gated is None:
        return pruned, None
    with torch.no_grad():
        out = pruned(example)
    gap = float("inf") if out.shape != gated.shape else float((out - gated).abs().max() / (1 + gated.abs().max()))
    if in_float64:
        pruned.to(dtype)
    return pruned, gap




def random_masks(points: list[GatePoint], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random masks keeping about half of each gate's units (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for p in points:
        mask = torch.rand(p.units, generator=generator) > 0.5
        mask[int(torch.randint(p.units, (1,), generator=generator))] = True
        masks[p.name] = mask
    return masks


def _exact(net: nn.Module, plan: GatePlan, masks: dict[str, torch.Tensor], example: torch.Tensor,
           names: list[str]) -> bool:
    """Whether pruning with `masks` on the gates `names` (every other gate all kept) gives the gated logits."""
    subset = {n: (m if n in names else torch.ones_like(m)) for n, m in masks.items()}
    return prune_planned(net, plan, subset, example, check=True)[1] <= tolerance(example.device)


def _bisect(names: list[str], exact) -> list[str]:
    """The names whose random masks alone break exactness (halving the set; interactions are not searched)."""
    if not names or exact(names):
        return []
    if len(names) == 1:
        return names
    half = len(names) // 2
    return _bisect(names[:half], exact) + _bisect(names[half:], exact)


def verified_plan(net: nn.Module, example: torch.Tensor, residual: str, family: str) -> tuple[GatePlan, list]:
    """`plan_gates`, then one pruning with random masks checked against the gated model; removable groups that
    break exactness (found by bisection) are demoted to masked-not-removed gates, which are exact by
    construction. Returns the plan and the producers of the demoted groups (sorted; usually none)."""
    forced: set[str] = set()
    plan = plan_gates(net, example, residual)
    for _ in range(3):  # each round demotes at least one group; a second round is already rare
        masks = random_masks(plan.gates)
        exact = functools.partial(_exact, net, plan, masks, example)
        if exact([p.name for p in plan.gates]):
            return plan, sorted(forced)
        culprits = _bisect([p.name for p in plan.gates if p.removable], exact)
        if not culprits:
            break
        log.warning("%s: %d channel group(s) failed the exactness check and get masked-not-removed gates: %s",
                    family, len(culprits), ", ".join(culprits[:5]))
        producers = {p.name: p.producer for p in plan.gates}
        forced |= {producers[name] for name in culprits}
        plan = plan_gates(net, example, residual, force_masked=frozenset(forced))
    raise BiseError(f"{family}: physical pruning with automatic gates is not exact for this model (pruned and "
                    f"gated logits differ); use a hand-written backbone for it")


# ---------------------------------------------------------------------------------------------- backbones

def find_classifier(net: nn.Module, example: torch.Tensor) -> str:
    """Name of the final nn.Linear whose output is the model's output (the logits)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
               for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            training = net.training
            net.eval()
            result = net(example)
            net.train(training)
    finally:
        for handle in handles:
            handle.remove()
    for name, out in outputs.items():
        if out is result:
            return name
    if outputs:  # output post-processed (e.g. a copy): the last linear layer that ran
        return list(outputs)[-1]
    raise BiseError("the model has no final nn.Linear classifier (bise reads the bottleneck at its input)")


def replace_classifier(net: nn.Module, name: str, num_classes: int) -> nn.Linear:
    """Put a fresh nn.Linear with `num_classes` outputs in place of the classifier `name`."""
    old = net.get_submodule(name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight)
    net.set_submodule(name, new)
    return new


def load_backbone_weights(net: nn.Module, path: str, classifier: str, family: str) -> None:
    """Load the state dict at `path` (bise_cli.models.checkpoints: torch.load(weights_only=True) or .safetensors) into
    `net`, whose classifier `classifier` was already replaced: the file's classifier keys load only when they fit
    the new classifier (a head trained for another number of classes is dropped); any other missing,
    unexpected or mis-shaped key is a one-line BiseError."""
    from bise_cli.models.checkpoints import mismatch, read_state_dict

    state = read_state_dict(path, "backbone.weights")
    own, head = net.state_dict(), f"{classifier}."
    head_keys = [k for k in state if k.startswith(head)]
    head_fits = bool(head_keys) and all(k in own and own[k].shape == state[k].shape for k in head_keys)
    ignore = () if head_fits else (head,)
    problem = mismatch(net, state, ignore)
    if problem:
        raise BiseError(f"backbone.weights {str(path)!r} do not fit {family}: {problem}")
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith(ignore)}, strict=not ignore)


class _WrappedNet:
    """Forward and bottleneck of a wrapped model `self.net` whose final layer is `self.classifier`."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input wherever the model computes it (captured, not re-implemented; in a pruned
        model only the kept units where the classifier reads a subset)."""
        with capture_input(self.classifier) as tap:
            self.net(x)
        return tap["z"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AutoGatedNet(_WrappedNet, Backbone):
    """A model with automatically placed BISE gates: `net` is the wrapped model, `classifier_name` the path of
    its final nn.Linear (replaced to have `num_classes` outputs). Subclasses build `net` (torchvision, timm)
    and set `pruned_class`; `family` names the model in messages ("torchvision resnet50")."""

    arch_name = ""  # a dense model is not a pruned checkpoint: prune it first (bise_cli.method.prune.save_pruned)
    pruned_class: type = None

    def __init__(self, net: nn.Module, num_classes: int, input_size, residual_gates: str = "per_block",
                 spec: dict | None = None, family: str = "model", weights_path: str | None = None,
                 verify: bool = True, force_masked=()):
        super().__init__()
        self.family = family
        self.input_size = tuple(int(v) for v in input_size)
        example = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0))
        self.classifier_name = find_classifier(net, example)
        replace_classifier(net, self.classifier_name, num_classes)
        if weights_path is not None:  # after the head is replaced: its keys load only if they fit num_classes
            load_backbone_weights(net, weights_path, self.classifier_name, family)
        self.net = net
        self.residual_gates = residual_gates
        # verify=False (rebuilding a saved pruned model) re-plans with the groups that the check demoted then.
        try:
            if verify:
                self.plan, forced = verified_plan(net, self.example_input(2), residual_gates, family)
            else:
                forced = sorted(force_masked)
                self.plan = plan_gates(net, self.example_input(1), residual_gates, frozenset(forced))
        except BiseError:
            raise
        except Exception as error:  # Torch-Pruning cannot trace or prune this model (e.g. channel shuffles)
            detail = " ".join(str(error).split())[:200]
            raise BiseError(f"{family}: automatic gates are not available for this model: Torch-Pruning's "
                            f"dependency graph fails ({type(error).__name__}: {detail})") from None
        self.spec = {**(spec or {}), "num_classes": num_classes, "input_size": list(self.input_size),
                     "residual_gates": residual_gates, "force_masked": list(forced)}

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A fixed random input of `input_size` (tracing and the exactness check), on the model's device."""
        parameter = next(self.net.parameters())
        x = torch.randn(batch, *self.input_size, generator=torch.Generator().manual_seed(0))
        return x.to(device=parameter.device, dtype=parameter.dtype)

    @property
    def classifier(self) -> nn.Linear:
        return self.net.get_submodule(self.classifier_name)

    def gate_points(self) -> list[GatePoint]:
        """The planned gates, with module names relative to this backbone (`net.` + the model's own names)."""
        def prefixed(name: str) -> str:
            return f"net.{name}" if name else name

        return [dataclasses.replace(p, module=prefixed(p.module), also=tuple(prefixed(a) for a in p.also),
                                    producer=prefixed(p.producer)) for p in self.plan.gates]

    def ungated_groups(self) -> list[dict]:
        """Channel groups left without a gate, with the reason (module names as in gate_points)."""
        return [{**g, "module": f"net.{g['module']}"} for g in self.plan.ungated]

    def gate_notes(self) -> dict[str, str]:
        """Gate name -> why its units are masked rather than removed."""
        return dict(self.plan.notes)

    def pruned_copy(self, masks: dict[str, torch.Tensor], check: bool = True) -> PrunedAutoNet:
        """The physically pruned model (see the module docstring); with `check`, pruned == gated is verified on
        a random input and a mismatch is a BiseError."""
        example = self.example_input(2)
        net, gap = prune_planned(self.net, self.plan, masks, example, check=check)
        if check and gap > tolerance(example.device):
            raise BiseError(f"{self.family}: pruning with automatic gates is not exact for this model "
                            f"(relative logit gap {gap:.1e}); use a hand-written backbone for it")
        spec = {**self.spec, "masks": {p.name: [bool(v) for v in masks[p.name].reshape(-1).tolist()]
                                       for p in self.plan.gates}}
        return self.pruned_class(net, self.classifier_name, spec)


class PrunedAutoNet(_WrappedNet, nn.Module):
    """A physically pruned AutoGatedNet: the pruned network plus the plain data that rebuilds it
    (`constructor_kwargs`: the architecture, its options and the masks, re-applied deterministically)."""

    arch_name = ""

    def __init__(self, net: nn.Module, classifier_name: str, spec: dict):
        super().__init__()
        self.net, self.classifier_name, self.spec = net, classifier_name, spec

    @property
    def classifier(self) -> nn.Linear:
        layer = self.net.get_submodule(self.classifier_name)
        return layer.layer if isinstance(layer, KeptInput) else layer

    def constructor_kwargs(self) -> dict:
        """Plain data (architecture, options, masks as lists of bools) that rebuilds this architecture."""
        return copy.deepcopy(self.spec)


def rebuild_pruned(dense_class, spec: dict) -> PrunedAutoNet:
    """Rebuild a pruned architecture from `constructor_kwargs` (random weights, for load_state_dict): the dense
    model is built without weights and pruned with the saved masks (the global RNG is left untouched)."""
    spec = dict(spec)
    masks = {k: torch.tensor(v, dtype=torch.bool) for k, v in spec.pop("masks").items()}
    with torch.random.fork_rng(devices=[]):
        dense = dense_class(**{**spec, "weights": "none", "verify": False})
    expected = [p.name for p in dense.plan.gates]
    if sorted(masks) != sorted(expected):  # e.g. pruned before residual streams were gated at block outputs
        unknown = sorted(set(masks) - set(expected))[:3] or sorted(set(expected) - set(masks))[:3]
        raise BiseError(f"this pruned {dense.family} checkpoint has gates that this version of bise does not place "
                        f"({len(masks)} saved, {len(expected)} now; e.g. {', '.join(unknown)}): prune the dense "
                        f"model again")
    return dense.pruned_copy(masks, check=False)


# ------------------------------------------------------------------------------------------- description

def describe_gates(model: nn.Module) -> list[dict]:
    """One row per gate of any bise backbone, then one per channel group left ungated (for `bise gates`).

    Keys: name, module, also (further hooked modules), units, where, dim, producer, removable, status
    ("removed", "masked-not-removed" or "ungated") and reason (why masked or ungated; "" otherwise)."""
    notes = model.gate_notes() if hasattr(model, "gate_notes") else {}
    rows = []
    for p in model.gate_points():
        rows.append({"name": p.name, "module": p.module, "also": list(p.also), "units": p.units,
                     "where": p.where, "dim": p.dim, "producer": p.producer or p.module, "removable": p.removable,
                     "status": "removed" if p.removable else "masked-not-removed",
                     "reason": notes.get(p.name, "" if p.removable else "tied by a residual addition")})
    for group in (model.ungated_groups() if hasattr(model, "ungated_groups") else []):
        rows.append({"name": group["name"], "module": group["module"], "also": [], "units": group["units"],
                     "where": "", "dim": None, "producer": "", "removable": False, "status": "ungated",
                     "reason": group["reason"]})
    return rows
