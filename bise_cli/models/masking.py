"""Structured gates: one learnable scalar per channel or neuron, attached to a frozen model with hooks.

Gate (BISE, CVPR 2026, and the official BISE code): parameter m per unit, forward always hard g = 1[m >= 0]
(= 1[sigmoid(m/tau) >= 0.5]), backward straight-through with dg/dm = sigmoid'(m/tau)/tau. The trick
`hard + (soft - soft.detach())` gives exactly the hard value in the forward pass (x - x == 0 in floating point)
and the soft derivative backwards.

Hard concrete (an option, Louizos et al., "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018):
while a logistic sample L is drawn (GateSet.sample_noise) and `concrete_beta` is set, the forward gate is the
stretched and clamped binary concrete z = clamp(sigmoid((m + L)/beta) (zeta - gamma) + gamma, 0, 1), with
(gamma, zeta) = HARD_CONCRETE_STRETCH, and the gradient flows through z itself (reparameterisation, no
straight-through); evaluation, pruning and the recorded masks stay the deterministic 1[m >= 0] (the median gate).

Modes: `vanilla` (gates are skipped, the model is untouched), `masked` (the above), `fixed` (hard binary
values, no gradient). `masked` and `fixed` produce identical forward outputs.

Where a gate sits is described by a `GatePoint` (the backbone declares its own list): the output or the input
of a named submodule, and which tensor dimension holds the units. Hooks keep the backbone code unaware of
gates, so the same mechanism serves convnets, ResNets and BERT.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# `pruning.round_to` warns when rounding gives back more than this share of the units the search switched off
# (e.g. 2.5 % of the units off -> 0 % with round_to=1000); documented in conf/pruning/bise.yaml.
ROUND_TO_WARN_SHARE = 0.5

GATE_MODES = ("vanilla", "masked", "fixed")
# The stretch interval (gamma, zeta) of the hard concrete gate, Louizos et al. (ICLR 2018)'s values: a sample
# lands exactly on 0 or 1 with non-zero probability.
HARD_CONCRETE_STRETCH = (-0.1, 1.1)


@dataclass(frozen=True)
class GatePoint:
    """A gate position: `where` is "output" or "input" of submodule `module`; units along `dim`.

    `producer` names the conv/linear layer whose weight row i computes unit i (used by magnitude pruning);
    empty means `module` itself. `removable` is False for units that physical pruning masks but cannot remove
    (channels tied by a residual addition keep their width; `bise gates` reports them as masked-not-removed).

    `also` names further submodules that get the same gate vector at the same position (`where`, `dim`): one
    channel group read by several layers (an expansion read by a squeeze-excitation block and a projection conv)
    is gated once, at every layer that reads it (bise_cli.models.auto_gates)."""

    name: str
    module: str
    units: int
    where: str = "output"
    dim: int = 1
    producer: str = ""
    removable: bool = True
    also: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        """Every submodule this gate is hooked on: `module` first, then `also`."""
        return (self.module, *self.also)


class Gate(nn.Module):
    """One gate layer: a vector of `units` parameters applied along dimension `dim` of a tensor."""

    def __init__(self, units: int, init: float = 0.0, dim: int = 1):
        super().__init__()
        self.logits = nn.Parameter(torch.full((units,), float(init)))
        self.dim = dim
        self.tau = 1.0
        self.mode = "masked"
        # Per-unit offset added to the logits in masked mode (a stochastic, Gumbel-sigmoid gate; None = the
        # paper's deterministic gate). Set per batch by GateSet.sample_noise.
        self.noise: torch.Tensor | None = None
        # Hard concrete temperature beta (GateSet.set_hard_concrete); None: the noise, if any, is Gumbel-sigmoid
        # straight-through.
        self.concrete_beta: float | None = None
        # Per-unit max |h| over the tensors this gate multiplied while `recording` (GateSet.record_peaks),
        # kept on the device; `calls` counts those tensors (a gate never applied has seen nothing).
        self.recording = False
        self.peak: torch.Tensor | None = None
        self.calls = 0

    def hard(self) -> torch.Tensor:
        """The binary mask 1[m >= 0] as a float tensor (no gradient)."""
        return (self.logits.detach() >= 0).to(self.logits.dtype)

    def support(self) -> torch.Tensor:
        """The units whose gate is non-zero in this forward pass, as a float 0/1 tensor (no gradient): the forward
        value of `values()` (1[m >= 0] without noise, 1[m + noise >= 0] for a Gumbel-sigmoid draw, z > 0 for a
        hard concrete draw), 1[m >= 0] in vanilla mode. What mask-dependent layers (BERT's mask-aware LayerNorm)
        normalise over."""
        with torch.no_grad():
            gate = self.values()
        return self.hard() if gate is None else (gate > 0).to(self.logits.dtype)

    def values(self) -> torch.Tensor | None:
        """Gate values for the current mode; None in vanilla mode."""
        if self.mode == "vanilla":
            return None
        if self.mode == "fixed":
            return self.hard()
        if self.noise is None:
            soft = torch.sigmoid(self.logits / self.tau)
            # Parenthesised on purpose: (soft - soft) is exactly 0, so the forward value is exactly the hard gate.
            return self.hard() + (soft - soft.detach())
        noisy = self.logits + self.noise
        if self.concrete_beta is not None:
            low, high = HARD_CONCRETE_STRETCH
            return (torch.sigmoid(noisy / self.concrete_beta) * (high - low) + low).clamp(0.0, 1.0)
        # Gumbel-sigmoid straight-through: hard 1[m + noise >= 0] forward, sigmoid'((m + noise)/tau)/tau back.
        soft = torch.sigmoid(noisy / self.tau)
        return (noisy.detach() >= 0).to(self.logits.dtype) + (soft - soft.detach())

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """Multiply `h` unit-wise by the gate values (broadcast over every other dimension)."""
        if self.recording:
            self._record(h)
        g = self.values()
        if g is None:
            return h
        shape = [1] * h.dim()
        shape[self.dim] = -1
        return h * g.to(h).view(shape)  # to(h): same dtype and device as the activations

    def _record(self, h: torch.Tensor) -> None:
        # The tensor the gate multiplies is what dJ/dg sums over (dJ/dg = sum dJ/dout * h); NaN propagates
        # through amax and maximum, so a NaN never reads as zero.
        unit_dim = self.dim % h.dim()
        others = [d for d in range(h.dim()) if d != unit_dim]
        largest = h.detach().abs()
        largest = largest.amax(dim=others) if others else largest
        self.peak = torch.maximum(self.peak, largest.to(self.peak.dtype))
        self.calls += 1


def _key(name: str) -> str:
    # ModuleDict keys may not contain dots.
    return name.replace(".", "__")


class GateSet(nn.Module):
    """All gates of one model, attached through forward hooks; detach() restores the plain model."""

    def __init__(self, points: list[GatePoint], init: float = 0.0):
        super().__init__()
        if not points:
            raise ValueError("a GateSet needs at least one gate point")
        self.points = list(points)
        self.gates = nn.ModuleDict({_key(p.name): Gate(p.units, init, p.dim) for p in self.points})
        self._handles: list = []

    def __iter__(self):
        return iter(self.points)

    def gate(self, name: str) -> Gate:
        return self.gates[_key(name)]

    def attach(self, model: nn.Module) -> GateSet:
        """Register one hook per gate point and hooked module (`module` and `also`) on `model` (idempotent:
        re-attaching detaches first)."""
        self.detach()
        for point in self.points:
            if point.where not in ("output", "input"):
                raise ValueError(f"gate point {point.name}: where must be 'output' or 'input', not {point.where!r}")
            gate = self.gate(point.name)
            for name in point.modules:
                module = model.get_submodule(name)
                if point.where == "output":
                    handle = module.register_forward_hook(lambda _m, _i, out, g=gate: g.apply(out))
                else:
                    handle = module.register_forward_pre_hook(
                        lambda _m, args, g=gate: (g.apply(args[0]),) + tuple(args[1:]))
                self._handles.append(handle)
        # Backbones with mask-dependent layers (BERT's mask-aware LayerNorm) are told about the gates.
        if hasattr(model, "bind_gates"):
            model.bind_gates(self)
        object.__setattr__(self, "_model", model)  # a plain reference, not a registered submodule
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self.__dict__.pop("_model", None)
        if model is not None and hasattr(model, "bind_gates"):
            model.bind_gates(None)

    def set_mode(self, mode: str) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r}; allowed: {', '.join(GATE_MODES)}")
        for gate in self.gates.values():
            gate.mode = mode

    @contextmanager
    def mode(self, mode: str):
        """Temporarily switch every gate to `mode`."""
        previous = next(iter(self.gates.values())).mode
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.set_mode(previous)

    def set_tau(self, tau: float) -> None:
        for gate in self.gates.values():
            gate.tau = float(tau)

    def sample_noise(self, scale: float, generator: torch.Generator) -> None:
        """Draw a fresh logistic offset scale * (log u - log(1 - u)), u ~ U(0, 1), for every unit (one draw per
        batch, shared by its samples); scale 0 removes the noise (the paper's deterministic gate)."""
        for gate in self.gates.values():
            if scale <= 0:
                gate.noise = None
                continue
            u = torch.rand(gate.logits.shape, generator=generator).clamp_(1e-6, 1 - 1e-6)
            gate.noise = (scale * (torch.log(u) - torch.log1p(-u))).to(gate.logits.device)

    def set_hard_concrete(self, beta: float | None) -> None:
        """Hard concrete gates of temperature `beta` while noise is drawn (module docstring); None: the
        straight-through gates."""
        for gate in self.gates.values():
            gate.concrete_beta = None if beta is None else float(beta)

    def record_peaks(self, on: bool) -> None:
        """Start recording (from zero), or stop, for every unit the largest |h| of the tensors its gate
        multiplies, on the device (no value is read back); `peaks()` returns them, also after the stop."""
        for gate in self.gates.values():
            if on:
                gate.peak, gate.calls = torch.zeros_like(gate.logits.detach()), 0
            gate.recording = on

    def peaks(self) -> dict[str, torch.Tensor | None]:
        """{gate name: per-unit max |h| of the last recording, or None for a gate that multiplied nothing}."""
        return {p.name: self.gate(p.name).peak if self.gate(p.name).calls else None for p in self.points}

    def soft_fraction(self) -> torch.Tensor:
        """A differentiable stand-in for the kept fraction: the mean of sigmoid(m / tau) over every unit, or with
        hard concrete gates the mean probability that a gate is non-zero, sigmoid(m - beta log(-gamma / zeta))
        (the expected L0 norm of Louizos et al., ICLR 2018, divided by the unit count)."""
        low, high = HARD_CONCRETE_STRETCH
        soft = [torch.sigmoid(gate.logits / gate.tau) if gate.concrete_beta is None
                else torch.sigmoid(gate.logits - gate.concrete_beta * math.log(-low / high))
                for gate in self.gates.values()]
        return torch.cat(soft).mean()

    def binary_masks(self) -> dict[str, torch.Tensor]:
        """{gate name: bool tensor of kept units}."""
        return {p.name: self.gate(p.name).hard().bool().cpu() for p in self.points}

    def load_binary_masks(self, masks: dict[str, torch.Tensor], on: float = 1.0, off: float = -1.0) -> None:
        """Set the parameters so that the hard gates equal `masks` (kept -> `on`, pruned -> `off`)."""
        for point in self.points:
            mask = masks[point.name].to(torch.bool)
            if mask.numel() != point.units:
                raise ValueError(f"mask {point.name} has {mask.numel()} units, expected {point.units}")
            with torch.no_grad():
                self.gate(point.name).logits.copy_(torch.where(mask, on, off).to(torch.float32))

    def logits_snapshot(self) -> dict[str, torch.Tensor]:
        return {p.name: self.gate(p.name).logits.detach().cpu().clone() for p in self.points}


def unit_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of gated units that are switched off."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def kept_units(masks: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """{gate name: (kept, total)}."""
    return {name: (int(m.sum()), m.numel()) for name, m in masks.items()}


@contextmanager
def capture_input(module: nn.Module):
    """Record the input of `module` (e.g. the final classifier, i.e. the bottleneck features) on each forward.

    Yields a dict whose "z" entry holds the latest captured tensor (not detached: gradients may flow)."""
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda _m, args: store.__setitem__("z", args[0]))
    try:
        yield store
    finally:
        handle.remove()


def rounding_effect(unrounded: dict[str, torch.Tensor], rounded: dict[str, torch.Tensor], multiple: int) -> dict:
    """{"sparsity_units_unrounded", "sparsity_units_rounded"} of masks before and after `round_masks`, with a
    warning when rounding to `multiple` units gives back more than ROUND_TO_WARN_SHARE of the units the search
    switched off."""
    before, after = unit_sparsity(unrounded), unit_sparsity(rounded)
    if before > 0 and before - after > ROUND_TO_WARN_SHARE * before:
        log.warning("pruning.round_to=%d takes the units switched off from %.1f %% to %.1f %%: rounding keeps most "
                    "of what the search removed; use a smaller round_to (e.g. 8 or 16) or none (1)", multiple,
                    100 * before, 100 * after)
    return {"sparsity_units_unrounded": before, "sparsity_units_rounded": after}


def round_masks(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                multiple: int) -> dict[str, torch.Tensor]:
    """Masks whose per-layer kept-unit counts are rounded UP to a multiple of `multiple` (e.g. 8 or 16, the
    channel granularity fast kernels like), so that a physically pruned model runs at the speed its MACs promise.

    Per layer: k kept units become min(ceil(k / multiple) * multiple, units); the extra units are the pruned
    ones with the highest `scores` (BISE's gate logits m; ties go to the lower index), so the result is
    deterministic and contains the original mask. A layer with no kept unit stays empty (re-opening it would
    change what the emptied layer means: a constant output). multiple=1 returns copies of `masks`."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"round_masks: multiple must be an integer >= 1, got {multiple!r}")
    rounded = {}
    for name, mask in masks.items():
        mask = mask.detach().to(torch.bool).cpu().reshape(-1)
        if name not in scores:
            raise ValueError(f"round_masks: no scores for mask {name!r}")
        score = scores[name].detach().float().cpu().reshape(-1)
        if score.numel() != mask.numel():
            raise ValueError(f"round_masks: scores {name} have {score.numel()} entries, the mask {mask.numel()}")
        kept, units = int(mask.sum()), mask.numel()
        target = min(-(-kept // multiple) * multiple, units)
        out = mask.clone()
        if kept and target > kept:
            pruned = (~mask).nonzero().squeeze(1)
            order = torch.sort(score[pruned], descending=True, stable=True).indices
            out[pruned[order[:target - kept]]] = True
        rounded[name] = out
    return rounded
