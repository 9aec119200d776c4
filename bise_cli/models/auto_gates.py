"""Automatic BISE gates and exact physical pruning for models bise did not write (torchvision, timm, your own).

BISE (CVPR 2026) gates structured units of a frozen model and then prunes them physically, so that the pruned
logits equal the gated logits. The hand-written backbones say where their gates go; here the places are found
by tracing the model with Torch-Pruning's dependency graph (DepGraph: Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023), which groups the channels that must be removed together: a conv's filters, the
BatchNorm after it, a depthwise conv, a squeeze-excitation block, the input columns of every layer reading them.

Exact-gate principle: a gate sits at the INPUT of every channel-mixing layer (a conv with groups=1 or a linear
layer) that reads the group: zeroing a channel there is what removing it does to that layer, and everything
upstream of those layers (BatchNorm, depthwise conv, activations, squeeze-excitation scaling, pooling) is
per-channel, so the rest of the network never sees the channel. One gate vector may sit at several layers
(`GatePoint.also`: an expansion read by the SE block's first conv and by the projection conv).

Each channel group becomes one of:
- removable: every op in the group is per-channel and the readers see the channels one to one. Physical
  pruning removes the channels from every layer of the group (Torch-Pruning's `group.prune`).
- a residual stream (`residual_gates=per_block`, the default): channels tied across blocks by residual
  additions are gated where the paper gates ResNet-18's (BISE, CVPR 2026): on the OUTPUT of each block that ends
  with a residual addition, after its final activation where one follows the addition (the tensor after the
  addition, before anything reads it), one masked-not-removed gate per block. A switched-off channel is then zero
  on every path, identity shortcuts included. The block is the deepest module called once that returns that
  tensor and holds a conv/linear layer (a BasicBlock, Bottleneck, inverted residual, MBConv, CNBlock, ViT encoder
  block; an addition no module returns, such as the one after a transformer's attention, is not gated). The
  pruned model keeps the stream's width: the block's output is multiplied by the fixed mask (`MaskedOutput`),
  and the layers that read it through zero-preserving ops only (the next block's first conv and shortcut
  conv, the classifier after pooling: `GatePlan.covered`) read only the kept channels. The stream's value before
  its first block output (ResNet-18's stem output, which the paper leaves unmasked; a non-residual block's
  projection) and normalised or depthwise-filtered copies of it (ConvNeXt's and transformers' pre-norm inputs,
  a head's LayerNorm) get no gate of their own (listed as ungated, with the reason). The gate's `producer` is the
  block's last conv/linear layer that does not read the block input (conv2, not the downsample).
- masked-not-removed (`removable=False`) at the readers: other channels that cannot be removed (a LayerNorm
  normalises over them, a residual stream that no module returns, ...): each tensor of the group that a layer
  reads gets its own gate at the layers reading it; the pruned model keeps the full width upstream and those
  layers read only the kept channels (index_select + sliced weights), which is exact whatever happens upstream.
  The gate's `producer` is the group's conv/linear that ran last before the readers (its weight rows compute the
  stream's latest update; used by magnitude pruning).
- ungated, with the reason (`describe_gates`): the logits, readers of a flatten or a concatenation (VGG's
  first linear layer, DenseNet, Inception), readers that are grouped convs (ResNeXt, RegNet), layers called more
  than once, groups whose index mapping Torch-Pruning cannot follow (Swin's window reshapes).

`residual_gates=shared` instead gives a residual stream one removable gate shared by all its readers, which
Torch-Pruning removes everywhere (fewer, coarser gates; smaller models).

A layer whose gate is emptied keeps one dummy channel whose readers' weights are zeroed, as in
`bise_cli.models.slicing`. Every pruning ends with a check: pruned and gated logits are compared on a random
input, and a mismatch is a one-line BiseError naming the model (so a family whose ops this module misreads can
never yield a silently different model). At construction the same check runs once with random masks; groups
that fail it are demoted to masked-not-removed gates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.models.base import Backbone
from bise_cli.models.masking import GatePoint, GateSet, capture_input

log = logging.getLogger(__name__)

RESIDUAL_MODES = ("per_block", "shared")

# Ops (autograd function names without "Backward<n>", lower case) that act on each channel separately or only
# move data around; a group containing any other op is not removed physically.
PER_CHANNEL_OPS = frozenset({
    "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "tanh", "leakyrelu",
    "elu", "selu", "celu", "softplus", "mish", "threshold", "clamp", "clampmin", "clampmax", "logsigmoid",
    "add", "sub", "rsub", "mul", "div", "neg", "mean", "adaptiveavgpool2d", "adaptiveavgpool1d", "avgpool2d",
    "avgpool1d", "maxpool2dwithindices", "adaptivemaxpool2d", "maxpool2d", "maxpool1d", "permute", "transpose",
    "t", "clone", "view", "unsafeview", "reshapealias", "squeeze", "unsqueeze", "expand", "tocopy", "asstrided",
    "nativebatchnorm", "cudnnbatchnorm", "nativedropout", "select", "alias", "identity", "stochasticdepth"})
# Matrix products are per-channel only as the inner op of an nn.Linear applied to a >2-d input.
LINEAR_INNER_OPS = frozenset({"addmm", "mm", "bmm", "matmul"})
# Activations: a residual addition followed only by one of these ends its block after it (ResNet's final ReLU).
ACTIVATION_OPS = frozenset({
    "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "tanh", "leakyrelu",
    "elu", "selu", "celu", "softplus", "mish"})
# Ops that map a channel that is zero everywhere to a channel that is zero everywhere, and move no other
# channel into it: a layer reading a gated stream through them (ResNet's classifier after pooling) sees the
# switched-off channels as zeros and reads only the kept ones once pruned.
ZERO_PRESERVING_OPS = frozenset({
    "relu", "relu6", "hardtanh", "hardswish", "silu", "gelu", "tanh", "leakyrelu", "elu", "selu", "celu", "mish",
    "adaptiveavgpool2d", "adaptiveavgpool1d", "avgpool2d", "avgpool1d", "maxpool2dwithindices", "adaptivemaxpool2d",
    "maxpool2d", "maxpool1d", "mean", "permute", "transpose", "t", "clone", "view", "unsafeview", "reshapealias",
    "squeeze", "unsqueeze", "tocopy", "select", "slice", "alias", "identity", "expand"})
RESIDUAL_TIE = "tied across blocks by a residual addition"
STREAM_NOTE = "residual stream at the block output: zero on every path (the stream keeps its width)"
STREAM_READER = ("reads the residual stream before its first block output (a stem's) or a normalised/depthwise "
                 "copy of it: the stream is gated at block outputs only (as the paper's ResNet-18)")


# --------------------------------------------------------------------------------------------- the plan

@dataclass
class GatePlan:
    """Where the gates of one architecture go (module names relative to the traced network)."""

    gates: list[GatePoint] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)     # gate name -> why it is masked-not-removed
    ungated: list[dict] = field(default_factory=list)       # {"name", "module", "units", "reason"}
    # stream gate name -> [(reader, dim)]: layers that read the gated block output (through zero-preserving ops
    # only) and, once pruned, read only its kept channels
    covered: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def _fn_op(grad_fn) -> str:
    """An autograd node's op, lower case, without "Backward<n>" ("AddBackward0" -> "add")."""
    name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else "unknown"
    return re.sub(r"backward\d*$", "", name.lower())


def _op_name(node) -> str:
    return _fn_op(getattr(node, "grad_fn", None))


def _is_mixing(module) -> bool:
    """A channel-mixing layer: an nn.Linear or a conv with groups=1 (a gate at its input is exact)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1


def _is_depthwise(module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _in_units(module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_units(module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _gate_dim(module, x) -> int:
    # Convs read channels on dimension 1, nn.Linear its features on the last one (channels-last blocks, tokens);
    # on a (batch, features) input that is dimension 1 too, so a classifier can share a gate with convs.
    if isinstance(module, nn.Linear) and not (isinstance(x, torch.Tensor) and x.dim() == 2):
        return -1
    return 1


@contextlib.contextmanager
def _traceable(net: nn.Module):
    """Torch-Pruning traces through autograd (needs parameters that require grad) and switches to eval mode;
    both are restored afterwards, so tracing a frozen model in training leaves it as it was."""
    modes = {m: m.training for m in net.modules()}
    flags = {p: p.requires_grad for p in net.parameters()}
    try:
        for p in net.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


class _IndexBudgetExceeded(Exception):
    """A channel group's index mapping grew past the budget (see `_index_budget`)."""


# Torch-Pruning maps channel indices through reshapes by multiplying them out (one channel of a flatten is
# stride indices); through window attention (Swin) that multiplication cycles and would fill the memory. A group
# whose mapping creates more indices than this is left ungated instead.
INDEX_BUDGET = 500_000


@contextlib.contextmanager
def _index_budget(limit: int):
    """Raise _IndexBudgetExceeded once Torch-Pruning's flatten index mappings have produced `limit` indices
    (within this context only: the original mapping is restored afterwards; not thread-safe, like tracing)."""
    from torch_pruning.dependency import index_mapping

    mapping = index_mapping._FlattenIndexMapping
    original, produced = mapping.__call__, [0]

    def counted(self, idxs):
        result = original(self, idxs)
        produced[0] += len(result)
        if produced[0] > limit:
            raise _IndexBudgetExceeded
        return result

    mapping.__call__ = counted
    try:
        yield
    finally:
        mapping.__call__ = original


def _build_graph(net: nn.Module, example: torch.Tensor, record: dict | None = None):
    """Torch-Pruning's dependency graph of `net`, traced on `example`.

    With `record`, also notes each conv/linear layer's first input tensor, call order and call count."""
    import torch_pruning as tp

    handles = []
    if record is not None:
        record.update(order={}, inputs={}, calls={}, module_calls={}, start={}, end={}, in_fn={}, out_fn={},
                      out_shape={})
        events = iter(range(1 << 62))  # one clock for the start and the end of every module call

        def before(_m, args, name):
            record["module_calls"][name] = record["module_calls"].get(name, 0) + 1
            record["start"].setdefault(name, next(events))
            first = args[0] if args else None
            record["in_fn"].setdefault(name, getattr(first, "grad_fn", None))

        def after(_m, _args, out, name):
            record["end"].setdefault(name, next(events))
            if name not in record["out_fn"]:
                # The output's autograd node as it is now: a parent's later in-place op (`result += input`)
                # gives the same tensor another node, which is how a block's output is told from its branch's.
                tensor = out if isinstance(out, torch.Tensor) else None
                record["out_fn"][name] = getattr(tensor, "grad_fn", None)
                record["out_shape"][name] = tuple(tensor.shape) if tensor is not None else None

        for name, module in net.named_modules():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(functools.partial(before, name=name)))
            handles.append(module.register_forward_hook(functools.partial(after, name=name)))
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                def hook(_m, args, name=name):
                    record["calls"][name] = record["calls"].get(name, 0) + 1
                    if name not in record["order"]:
                        record["order"][name] = len(record["order"])
                        record["inputs"][name] = args[0] if args else None
                handles.append(module.register_forward_pre_hook(hook))
    try:
        with _traceable(net), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning's shape-inference notes say nothing to bise users
            # verbose=False: unwrapped parameters (ConvNeXt's layer_scale, ViT's class token) are pruned along
            # their last non-singleton dimension, which is the channel one for these per-channel scales; the
            # exactness check catches any model where that guess is wrong.
            return tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    finally:
        for handle in handles:
            handle.remove()


def _all_groups(graph) -> tuple[list, list]:
    """Every channel group rooted at a conv/linear layer's outputs (Torch-Pruning's `get_all_groups`, with the
    index budget per group), and the root layers whose group exceeded the budget."""
    groups, too_large, visited = [], [], set()
    for module in list(graph.module2node):
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        try:
            with _index_budget(INDEX_BUDGET), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(pruner.get_out_channels(module))))
        except _IndexBudgetExceeded:
            too_large.append(module)
            visited.add(module)
            continue
        visited.update(dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler))
        groups.append(group)
    return groups, too_large


def _classify(graph, group, names: dict, residual: str):
    """Split one Torch-Pruning group into readers, producers, the reasons it cannot be removed and (with
    residual="per_block") the residual additions that tie it across blocks (Torch-Pruning nodes)."""
    from torch_pruning import ops

    size = len(group[0].idxs)
    readers, producers, problems, bad_readers, additions = [], [], [], [], []
    for item in group:
        dep = item.dep
        node, module = dep.target, dep.target.module
        out = graph.is_out_channel_pruning_fn(dep.handler)
        identity = list(item.idxs) == list(range(size)) and list(item.root_idxs) == list(range(size))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            name = names.get(module, "?")
            if _is_depthwise(module):
                continue  # per channel: removed with the group
            if not _is_mixing(module):  # a grouped conv: its groups need equal widths, so nothing is removed
                problems.append("grouped convolution")
                if not out:
                    bad_readers.append((name, "read by a grouped convolution"))
                elif identity and _out_units(module) == size:
                    producers.append(name)  # its weight rows still compute the channels one to one
                continue
            if out:
                if identity and _out_units(module) == size:
                    producers.append(name)
                else:
                    problems.append(f"{name} computes the channels in another order")
            elif identity and _in_units(module) == size:
                readers.append(name)
            else:
                problems.append(f"{name} reads them through a flatten or concatenation")
                bad_readers.append((name, "reads the channels through a flatten or concatenation"))
        elif node.type in (ops.OPTYPE.BN, ops.OPTYPE.IN, ops.OPTYPE.PRELU, ops.OPTYPE.PARAMETER):
            continue  # per-channel parameters: sliced with the group
        elif node.type == ops.OPTYPE.RESHAPE:
            if not identity:
                problems.append("a reshape changes the channel indexing")
        elif node.type == ops.OPTYPE.ELEMENTWISE:
            op = _op_name(node)
            if op in ("add", "sub") and len(node.inputs) >= 2 and residual == "per_block":
                problems.append(RESIDUAL_TIE)
                additions.append(node)
            elif op in LINEAR_INNER_OPS:
                if not node.outputs or not all(isinstance(o.module, nn.Linear) for o in node.outputs):
                    problems.append(f"matrix product ({op})")
            elif op in ("nativelayernorm", "nativegroupnorm"):
                problems.append("normalisation across channels")
            elif op not in PER_CHANNEL_OPS:
                problems.append(f"op {op} (not known to be per-channel)")
        elif node.type in (ops.OPTYPE.LN, ops.OPTYPE.GN):
            problems.append("normalisation across channels")
        elif node.type in (ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND, ops.OPTYPE.SLICE,
                           ops.OPTYPE.EXPAND):
            problems.append("concatenation or split")
        elif node.type == ops.OPTYPE.OUTPUT:
            problems.append("part of the model output")
        else:
            problems.append(f"{node.type.name.lower()} layer")
    return size, readers, producers, list(dict.fromkeys(problems)), bad_readers, additions


def _block_of(net: nn.Module, record: dict, grad_fn) -> str | None:
    """The block whose output is the tensor computed by `grad_fn`: the deepest module called once that returns
    it and contains a conv or linear layer (a BasicBlock rather than its ReLU or the stage holding it)."""
    layers = (nn.modules.conv._ConvNd, nn.Linear)
    candidates = [name for name, fn in record["out_fn"].items()
                  if fn is grad_fn and record["module_calls"].get(name) == 1
                  and any(isinstance(m, layers) for m in net.get_submodule(name).modules())]
    return max(candidates, key=lambda name: name.count("."), default=None)


def _stream_producer(net: nn.Module, record: dict, block: str, producers: list[str], size: int) -> str | None:
    """The stream's conv/linear layer whose weight rows compute the block's update (used by magnitude pruning):
    the last one inside the block that does not read the block's input (conv2, not the downsample shortcut).
    Where the dependency graph maps no layer of the block one to one (Swin's window reshapes), the block's last
    conv/linear layer with `size` outputs; only magnitude pruning reads it, never pruning itself."""
    start = record["start"]

    def last(names):
        names = [n for n in names if n.startswith(f"{block}.") and start.get(n, 0) < record["end"][block]
                 and record["in_fn"].get(n) is not record["in_fn"].get(block)]
        return max(names, key=lambda n: start.get(n, 0), default=None)

    layers = [n for n, m in net.named_modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and _out_units(m) == size]
    return last(producers) or last(layers)


def _stream_dim(shape: tuple | None, size: int) -> int | None:
    """The dimension of a block output that holds the stream's `size` channels: 1 (NCHW, or (batch, features)) or
    -1 (channels last: tokens). If both fit, 4-d tensors are taken as NCHW and 3-d ones as tokens."""
    if not shape or len(shape) < 2:
        return None
    first, last = shape[1] == size, shape[-1] == size
    if first and (not last or len(shape) != 3):
        return 1
    return -1 if last else None


def _covering(grad_fn, streams: dict, steps: int = 64) -> str | None:
    """The stream gate (of `streams`: block-output autograd node -> gate name) whose switched-off channels are
    still exactly zero in the tensor computed by `grad_fn` (reached back through ZERO_PRESERVING_OPS; through a
    product, from any factor); None if there is none."""
    while grad_fn is not None and steps > 0:
        if grad_fn in streams:
            return streams[grad_fn]
        op = _fn_op(grad_fn)
        sources = [f for f, _ in getattr(grad_fn, "next_functions", ())
                   if f is not None and "accumulategrad" not in _fn_op(f)]
        if op == "mul":  # zero times anything (finite) is zero
            return next((g for g in (_covering(f, streams, steps - 1) for f in sources) if g), None)
        if op not in ZERO_PRESERVING_OPS or len(sources) != 1:
            return None
        grad_fn, steps = sources[0], steps - 1
    return None


def _stream_gates(net: nn.Module, record: dict, size: int, producers: list[str], additions: list) -> list:
    """The paper's residual-stream gates of one channel group: one masked-not-removed gate on the output of each
    block that ends with a residual addition (after its final activation, where one follows the addition alone),
    as BISE's ResNet-18 gates each BasicBlock's output. Returns [(GatePoint, the output's autograd node)]."""
    blocks: dict[str, object] = {}
    for node in additions:
        nodes = [node]
        if len(node.outputs) == 1 and _op_name(node.outputs[0]) in ACTIVATION_OPS:
            nodes.insert(0, node.outputs[0])  # the tensor after the activation, if a block returns it
        for candidate in nodes:
            block = _block_of(net, record, candidate.grad_fn)
            if block is not None:
                blocks.setdefault(block, candidate.grad_fn)
                break
    points = []
    for block, grad_fn in blocks.items():
        producer = _stream_producer(net, record, block, producers, size)
        dim = _stream_dim(record["out_shape"].get(block), size)
        if producer is None or dim is None:
            continue
        points.append((GatePoint(f"{block}.out", block, size, where="output", dim=dim, producer=producer,
                                 removable=False), grad_fn))
    return points


def plan_gates(net: nn.Module, example: torch.Tensor, residual: str = "per_block",
               force_masked: frozenset[str] = frozenset()) -> GatePlan:
    """Trace `net` on `example` and decide every gate (see the module docstring). `force_masked`: producer
    names whose groups get masked-not-removed gates even if they look removable (set by the exactness check)."""
    if residual not in RESIDUAL_MODES:
        raise BiseError(f"unknown residual_gates {residual!r}; allowed: {', '.join(RESIDUAL_MODES)}")
    names = {m: n for n, m in net.named_modules()}
    record: dict = {}
    graph = _build_graph(net, example, record)
    groups, too_large = _all_groups(graph)
    order, inputs, calls = record["order"], record["inputs"], record["calls"]
    plan = GatePlan()
    for module in too_large:
        plan.ungated.append({"name": f"{names[module]}.out", "module": names[module], "units": _out_units(module),
                             "reason": "its channels are reshaped beyond what the dependency graph can follow"})
    used: set[str] = set()
    for group in groups:
        size, readers, producers, problems, bad, additions = _classify(graph, group, names, residual)
        root = names.get(group[0].dep.target.module, "?")
        for reader, reason in bad:
            plan.ungated.append({"name": f"{reader}.in", "module": reader, "units": size,
                                 "reason": reason})
        reused = [r for r in readers if calls.get(r, 0) != 1]
        for reader in reused:
            plan.ungated.append({"name": f"{reader}.in", "module": reader, "units": size,
                                 "reason": "layer called more than once per forward pass"})
        readers = sorted((r for r in readers if r not in reused and r not in used), key=lambda r: order.get(r, 0))
        producers = sorted(producers, key=lambda p: order.get(p, 0))
        stream = _stream_gates(net, record, size, producers, additions) if RESIDUAL_TIE in problems else []
        if stream:
            # The stream is gated where it leaves each block; its readers need no gate of their own.
            gate_of = {grad_fn: point.name for point, grad_fn in stream}
            for point, _ in stream:
                plan.gates.append(point)
                plan.notes[point.name] = STREAM_NOTE
            for reader in readers:
                gate = _covering(record["in_fn"].get(reader), gate_of)
                if gate is None:
                    plan.ungated.append({"name": f"{reader}.in", "module": reader, "units": size,
                                         "reason": STREAM_READER})
                    continue
                used.add(reader)
                plan.covered.setdefault(gate, []).append((reader, _gate_dim(net.get_submodule(reader),
                                                                            inputs.get(reader))))
            continue
        if not readers:
            if not bad and not reused:
                plan.ungated.append({"name": f"{root}.out", "module": root, "units": size,
                                     "reason": "no conv/linear layer reads these channels (the logits or a "
                                               "model output)"})
            continue
        dims = {_gate_dim(net.get_submodule(r), inputs.get(r)) for r in readers}
        if len(dims) > 1 and not problems:  # one gate vector, one dimension: a gate per reader instead
            problems.append("read by both conv and linear layers")
        if not producers:
            problems.append("no conv/linear layer computes the channels one to one")
        elif producers[0] in force_masked:
            problems.append("failed the exactness check")
        removable = not problems and not bad and not reused
        if removable:
            used.update(readers)
            plan.gates.append(GatePoint(f"{producers[0]}.out", readers[0], size, where="input", dim=dims.pop(),
                                        producer=producers[0], removable=True, also=tuple(readers[1:])))
            continue
        reason = "; ".join(problems or ["a reader is left ungated"])
        # One gate per tensor read: readers of the same tensor (a block's conv1 and its downsample conv) share it.
        buckets: dict[int, list[str]] = {}
        for reader in readers:
            buckets.setdefault(id(inputs.get(reader)), []).append(reader)
        for bucket in buckets.values():
            first = bucket[0]
            before = [p for p in producers if order.get(p, 0) < order[first]]
            producer = (before or producers or [None])[-1]
            if producer is None:
                plan.ungated.append({"name": f"{first}.in", "module": first, "units": size,
                                     "reason": f"no conv/linear layer computes the channels ({reason})"})
                continue
            used.update(bucket)
            name = f"{first}.in"
            dim = _gate_dim(net.get_submodule(first), inputs.get(first))
            plan.gates.append(GatePoint(name, first, size, where="input", dim=dim, producer=producer,
                                        removable=False, also=tuple(bucket[1:])))
            plan.notes[name] = reason
    # In forward order: a gate at a layer's input when the layer starts, one on a block's output when it ends.
    start, end = record["start"], record["end"]
    plan.gates.sort(key=lambda p: (start if p.where == "input" else end).get(p.module, 0))
    # A reader of a concatenation appears in every concatenated group: listed once.
    plan.ungated = list({(row["name"], row["reason"]): row for row in plan.ungated}.values())
    return plan


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
    graph = _build_graph(pruned, example)
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
