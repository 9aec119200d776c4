"""When the BISE search's masks are final: the exact criterion of `pruning.stop_when_frozen` (bise_cli.method.search).

The search checks after every mask epoch whether any gate can still change its hard mask 1[m >= 0] in the steps
left. The gates step with SGD (lr, momentum mu, weight decay wd): v <- mu v + dJ/dm + wd m, m <- m - lr v, and
tau (hence sigma'(m/tau)/tau) and lr never rise (both temperature schedules and `tau_floor` only lower tau; the
mask learning rate is constant or cosine-annealed). Over T steps without gradient, while |m| <= 1.5 |m0|,
|m_T - m0| <= D0 = lr / (1 - mu) (mu |v0| + T 1.5 wd |m0|). A gate is final when D0 <= |m0| / 2 (its sign,
hence its mask, is kept as long as its gradient is exactly zero) and its gradient is exactly zero for good, for
one of two reasons:

1. saturated: the float32 sigmoid of (|m0| - D0) / tau is exactly 1 (or of -(|m0| - D0) / tau exactly 0), so
   sigma (1 - sigma) / tau, the straight-through derivative, is exactly 0 at every later step whatever dJ/dg is
   (by induction over the steps: zero gradient => |m| stays >= |m0| - D0 => still saturated);
2. dead unit: the tensor h the gate multiplies is exactly zero for every search sample under the masks M now
   in force (`dead_unit_pass`: one forward pass over the search split with the gates fixed to M, recording
   every unit's max |h| on the device). dJ/dg = sum dJ/d(h g) h is then exactly zero. A gate with m0 == 0 is
   final only with a momentum buffer of exactly 0: it then stays at exactly 0 (wd 0 = 0), where the hard mask
   is 1 (1[0 >= 0]); any other buffer would move it to either side. The search runs that pass once the masks
   have not changed over an epoch (a sign they are settling; any other time would do, the pass is exact for M)
   and reuses its result while the masks after each epoch stay M, so a search pays one forward pass per
   settled mask set instead of any cost per batch.

Why the dead unit stays dead (induction over the steps after the check): suppose every gate is final and the
masks at step t are M (true at the first step). The frozen model runs in eval mode with fixed weights, and the
search inputs are the same samples every epoch (no augmentation), so each sample's activations under M are
those of the pass: the unit's h is exactly zero again, its gate's gradient is exactly zero, a saturated gate's
too, so every gate steps on weight decay and momentum alone and D0 keeps every mask: the masks at step t + 1
are M. (An upstream gate that could still flip and revive the unit is not final, so the stop waits for it.)
Preconditions (`dead_unit_refusal` refuses the
branch when one fails): no augmentation of the search inputs (the same fact that makes cached bottleneck features
exact), every module in eval mode (BatchNorm statistics, dropout), no gate noise (a random mask per batch), SGD
on the gates, no sparsity penalty (its gradient reaches every gate whatever h is), and no mask-dependent layer
(BERT's mask-aware LayerNorm reads the gates outside h g). One more precondition cannot be checked beforehand:
that a sample's activations do not depend on the batch it is in (floating-point kernels may round differently
for another batch composition, and the training batches are shuffled). So the search keeps recording h after
the stop: if a unit final only by branch 2 becomes non-zero, the forward-only epoch is undone and run in full
(`EpochState`), and the criterion starts over.
Both branches assume a finite dJ/dg (0 x inf is NaN), as a finite objective makes likely but does not prove.

The bounded branch (opt-in, `frozen_grad_margin`) relies on an observed gradient bound instead: see
`gate_finality`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from bise_cli.core.precision import Autocast
from bise_cli.models.masking import GateSet

# Reasons a gate is not final yet, as `Finality.counts` names them (the log prints them when the masks never
# freeze): a unit that carries signal with a gate not saturated, or momentum and weight decay able to move m.
NOT_FINAL = ("live", "drift")
# Why a gate is final: saturated sigmoid, dead unit (only this reason), bounded branch (only this reason).
FINAL = ("saturated", "dead", "bounded")


def slope(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The straight-through derivative sigma'(m/tau)/tau of every gate."""
    soft = torch.sigmoid(logits / tau)
    return soft * (1 - soft) / tau


def dead_unit_refusal(model: nn.Module, settings, same_inputs: bool) -> str | None:
    """Why the dead-unit branch cannot be used for this search (None: it can); `same_inputs` is whether the
    frozen model sees the same inputs every epoch (no augmentation)."""
    if not same_inputs:
        return "the search inputs are augmented (new inputs every epoch)"
    if settings.noise_scale > 0:
        return "gate noise draws a random mask per batch"
    if settings.mask_optimizer != "sgd":
        return f"mask_optimizer={settings.mask_optimizer} (the drift bound is SGD's)"
    if settings.sparsity_weight > 0:
        return "the sparsity penalty gives every gate a gradient"
    if any(module.training for module in model.modules()):
        return "a module of the model is in training mode"
    if hasattr(model, "bind_gates"):
        return "the model has mask-dependent layers"
    return None


@dataclass
class Finality:
    """The outcome of one check: gate counts by reason (read on the host), and the units final only because
    their unit was dead (device booleans per gate name: what the search keeps watching after the stop)."""

    counts: dict[str, int]
    watch: dict[str, torch.Tensor] = field(default_factory=dict)
    blocking: dict[str, torch.Tensor] = field(default_factory=dict)  # the units not final (device booleans)

    @property
    def frozen(self) -> bool:
        return all(self.counts[reason] == 0 for reason in NOT_FINAL)

    def describe(self) -> str:
        """One line: how many gates are final and why, how many are not and why."""
        total = sum(self.counts.values())
        return (f"{self.counts['live'] + self.counts['drift']} of {total} gates not final "
                f"({self.counts['live']} live with an unsaturated sigmoid, {self.counts['drift']} movable by "
                f"momentum or weight decay); final: {self.counts['saturated']} saturated, {self.counts['dead']} "
                f"on dead units, {self.counts['bounded']} by the gradient bound")


def gate_finality(gates: GateSet, mask_opt: torch.optim.Optimizer, settings, tau: float, steps_left: int,
                  grad_bound: float | None = None, dead: dict[str, torch.Tensor | None] | None = None) -> Finality:
    """Which gates cannot change in the `steps_left` remaining SGD steps (module docstring); tau <= `tau` from
    now on. `dead` ({gate name: per-unit booleans, or None}; None: not known) marks the units whose h is exactly
    zero on every search sample under the masks in force (`dead_unit_pass`). One read of the device.

    Bounded branch (only with `grad_bound` U, an assumption: the search passes the largest |dJ/dg| it has seen
    times `frozen_grad_margin`): while |m| stays in [|m0|/2, 3|m0|/2], |dJ/dm| <= U s with
    s = sigma'(|m0| / (2 tau)) / tau (which falls as tau falls once |m0|/(2 tau) >= 2.4), so
    D = lr / (1 - mu) (mu |v0| + T (U s + 1.5 wd |m0|)) < |m0| / 2 keeps the gate's sign.

    Only plain SGD without gate noise qualifies: otherwise every gate counts as live."""
    units = sum(p.units for p in gates.points)
    group = mask_opt.param_groups[0]
    lr, mu, wd = group["lr"], group.get("momentum", 0.0), group["weight_decay"]
    if settings.mask_optimizer != "sgd" or settings.noise_scale > 0 or mu >= 1:
        return Finality({"live": units, "drift": 0, "saturated": 0, "dead": 0, "bounded": 0})
    tau = max(tau, settings.tau_floor)
    tallies, watch, blocking = [], {}, {}
    for point in gates.points:
        gate = gates.gate(point.name)
        signed = gate.logits.detach().double()
        m = signed.abs()
        buffer = mask_opt.state.get(gate.logits, {}).get("momentum_buffer")
        v = buffer.detach().double().abs() if buffer is not None and mu > 0 else torch.zeros_like(m)
        drift = lr / (1 - mu) * (mu * v + steps_left * 1.5 * wd * m)
        # m0 == 0: final only if nothing can move it (v == 0); then it stays exactly 0, mask 1.
        kept = torch.where(m > 0, drift <= m / 2, v == 0)
        # The closest m can come to zero without gradient, as the float32 sigmoid of the gate would see it.
        # (x 0.999: a margin for the rounding of m / tau in float32 near the saturation thresholds)
        nearest = (torch.sign(signed) * 0.999 * (m - drift).clamp(min=0) / tau).float()
        soft = torch.sigmoid(nearest)
        saturated = kept & (m > 0) & ((soft == 1) | (soft == 0))
        unit_dead = dead.get(point.name) if dead is not None else None
        by_dead = (kept & unit_dead & ~saturated) if unit_dead is not None else torch.zeros_like(kept)
        bounded = torch.zeros_like(kept)
        if grad_bound is not None:
            half = m / 2
            reach = lr / (1 - mu) * (mu * v + steps_left * (grad_bound * slope(half, tau) + 1.5 * wd * m))
            bounded = (half / tau >= 2.4) & (reach < half) & ~saturated & ~by_dead
        final = saturated | by_dead | bounded
        watch[point.name], blocking[point.name] = by_dead, ~final
        tallies.append(torch.stack([(~final & kept).sum(), (~final & ~kept).sum(), saturated.sum(), by_dead.sum(),
                                    bounded.sum()]))
    counts = torch.stack(tallies).sum(0).tolist()
    return Finality(dict(zip((*NOT_FINAL, *FINAL), (int(c) for c in counts), strict=True)), watch, blocking)


def describe_blocking(gates: GateSet, check: Finality, tau: float, peaks: dict[str, torch.Tensor | None],
                      limit: int = 10) -> str:
    """The units whose gates were not final at `check`: how many are on and off with their range of m / tau,
    then the first `limit` as gate[unit] with m, m / tau, the hard mask and the largest |h| in `peaks` ("?" if
    none). Reads the device once."""
    rows, names = [], list(check.blocking)
    for number, (name, units) in enumerate(check.blocking.items()):
        logits, peak = gates.gate(name).logits.detach(), peaks.get(name)
        peak = torch.full_like(logits, float("nan")) if peak is None else peak
        index = torch.arange(len(logits), device=logits.device, dtype=logits.dtype)
        rows.append(torch.stack([torch.full_like(logits, number), index, logits, peak]).t()[units])
    found = torch.cat(rows).tolist() if rows else []
    parts = []
    for side, keep in (("on", lambda m: m >= 0), ("off", lambda m: m < 0)):
        ratios = [m / tau for _, _, m, _ in found if keep(m)]
        if ratios:
            parts.append(f"{len(ratios)} {side} (m/tau {min(ratios):.3g} to {max(ratios):.3g})")
    units = ", ".join(f"{names[int(g)]}[{int(i)}] m {m:.3g} (m/tau {m / tau:.3g}, {'on' if m >= 0 else 'off'}, "
                      f"max|h| {'?' if math.isnan(h) else f'{h:.3g}'})" for g, i, m, h in found[:limit])
    more = f", ... {len(found) - limit} more" if len(found) > limit else ""
    return f"{', '.join(parts)}: {units}{more}" if found else "none"

def masks_frozen(gates: GateSet, mask_opt: torch.optim.Optimizer, settings, tau: float, steps_left: int,
                 grad_bound: float | None = None, dead: dict[str, torch.Tensor | None] | None = None) -> bool:
    """True when no gate can change in the `steps_left` remaining steps (`gate_finality`)."""
    return gate_finality(gates, mask_opt, settings, tau, steps_left, grad_bound, dead).frozen


def dead_unit_pass(model: nn.Module, gates: GateSet, search, batch_size: int, amp: Autocast,
                   device) -> dict[str, torch.Tensor | None]:
    """The units whose h is exactly zero on every sample of `search` under the current hard masks: one forward
    pass in batches of `batch_size` (the search's), gates fixed, no gradient and no random draw, each gate
    recording its units' max |h| on the device (nothing is read back). Leaves the peaks in `gates.peaks()`."""
    gates.record_peaks(True)
    try:
        with torch.no_grad(), gates.mode("fixed"), amp:
            for x, _, _ in search.batches(batch_size, device=device):
                model(x)
    finally:
        gates.record_peaks(False)
    return dead_units(gates.peaks())


def dead_units(peaks: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """{gate name: units whose recorded max |h| is exactly zero} (NaN is not zero; None stays None)."""
    return {name: None if peak is None else peak == 0 for name, peak in peaks.items()}


def revived(peaks: dict[str, torch.Tensor | None], watch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A device boolean: some watched unit had a non-zero (or NaN) h, or a watched gate multiplied nothing."""
    flags = []
    for name, units in watch.items():
        peak = peaks.get(name)
        flags.append(units.any() if peak is None else ((peak != 0) & units).any())
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)


class EpochState:
    """Everything a mask epoch changes, copied on the device (no read): the gates, their optimiser, the bias
    heads and their optimisers, and the batch generator; `restore` puts it back to run the epoch again."""

    def __init__(self, gates: GateSet, mask_opt: torch.optim.Optimizer, head_pairs: list, generator):
        self.gates = {k: v.detach().clone() for k, v in gates.state_dict().items()}
        self.mask_opt = copy.deepcopy(mask_opt.state_dict())
        self.heads = [({k: v.detach().clone() for k, v in head.state_dict().items()}, copy.deepcopy(opt.state_dict()))
                      for head, opt in head_pairs]
        self.generator = generator.get_state()

    def restore(self, gates: GateSet, mask_opt: torch.optim.Optimizer, head_pairs: list, generator) -> None:
        gates.load_state_dict(self.gates)
        mask_opt.load_state_dict(self.mask_opt)
        for (head, opt), (head_state, opt_state) in zip(head_pairs, self.heads, strict=True):
            head.load_state_dict(head_state)
            opt.load_state_dict(opt_state)
        generator.set_state(self.generator)
