"""Where BISE's gates go in a model bise did not write (torchvision, timm, your own): the gate plan.

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
  pruning removes the channels from every layer of the group (Torch-Pruning's `group.prune`, in
  `bise_cli.models.auto_gates`).
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
- ungated, with the reason (`auto_gates.describe_gates` lists them): the logits, readers of a flatten or a
  concatenation (VGG's first linear layer, DenseNet, Inception), readers that are grouped convs (ResNeXt, RegNet),
  layers called more than once, groups whose index mapping Torch-Pruning cannot follow (Swin's window reshapes).

`residual_gates=shared` instead gives a residual stream one removable gate shared by all its readers, which
Torch-Pruning removes everywhere (fewer, coarser gates; smaller models).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.models.masking import GatePoint

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


def build_graph(net: nn.Module, example: torch.Tensor, record: dict | None = None):
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
    graph = build_graph(net, example, record)
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
