"""The BISE mask search (BISE, CVPR 2026, Sec. 3): reweighted CE + bias-MI penalty on hard structured gates of a
frozen model.

Per batch: forward the gated model (hard gates, straight-through gradients), L_r = (1/B) sum r(y, b) CE, and
for every bias attribute k, I_k = normalised plug-in MI between b_k and its bias head's softmax on the samples
conflicting on k (b_k != y); the gates step on alpha*L_r + gamma*sum_k I_k, each head steps on its own CE over
stopgrad(z). The heads are pre-trained for `head_pretrain_epochs` on the ungated model and refined for
`head_refine_epochs` after every temperature drop; without augmentation those head-only epochs run on cached
bottleneck features, which is exact. Temperature: tau <- tau_factor * tau every `tau_period` epochs; stop once
tau <= tau_min (100 epochs with the paper's numbers). Selection: the masks of the epoch with the best
validation metric (ties to the later epoch), or the last masks when the dataset has no validation split.

Options the official code has but leaves off (off here too, so the defaults are the paper's):
- `mi_subset=conflicting_plus_aligned`: the MI is computed on the conflicting samples of the batch plus a random
  share (`mi_aligned_share`) of its aligned ones;
- `tau_schedule=cosine`: tau follows a cosine from tau0 to tau_min over the same number of epochs (the heads are
  still refined every `tau_period` epochs);
- `mask_lr_schedule=cosine`: cosine annealing of the mask learning rate over the mask epochs;
- `mask_optimizer=adam`: Adam on the gates (lr `mask_lr`, weight decay `mask_weight_decay`; no momentum).

Variants of our own (issue 22's study, benchmarks/results/variant_study; every default is the paper's recipe):
- `tau_floor`: the gates never see a temperature below it (the schedule and epoch count are unchanged), so the
  straight-through gradient sigma'(m/tau)/tau of gates near 0 stays finite instead of freezing them;
- `gate_noise`: a Gumbel-sigmoid (binary Concrete, Maddison et al. / Jang et al., ICLR 2017) straight-through
  gate, forward 1[m + s*L >= 0] with a fresh logistic L per unit and batch, backward sigma'((m + s*L)/tau)/tau;
  the stochastic-gate idea of hard concrete (Louizos et al., ICLR 2018) kept with the paper's hard forward pass;
- `estimator=hard_concrete`: the hard concrete gate itself (Louizos et al., ICLR 2018; bise_cli.models.masking):
  during the search every unit's gate is a fresh stretched, clamped binary-concrete sample per batch at
  temperature `hard_concrete_beta`, differentiated through the sample rather than straight through, so the
  expected gradient of a gate far from 0 decays like sigmoid'(m), not sigmoid'(m/tau)/tau: the masks do not
  freeze as tau falls. The temperature schedule still sets the epochs and the heads' refits; evaluation,
  selection and pruning use the binary 1[m >= 0];
- `sparsity_weight`: + lambda * mean_units sigmoid(m/tau), the expected-L0 penalty of Louizos et al. per unit;
- `restarts`: k searches from the same start with different batch orders (seed + 1000 k), the one whose
  selected masks score best on validation is kept (needs a validation split);
- `stop_when_frozen` (on by default: the results are identical by construction): once no gate can change any
  more (bise_cli.method.frozen: every gate saturated or on a dead unit, with the drift bound of momentum and weight
  decay; checked after every epoch), the remaining epochs of the schedule run forward-only: no backward pass
  through the model and no validation pass (the masks, hence the validation metrics, are those of the epoch that
  froze), while everything that does not depend on the gates' learning is reproduced step for step: the same
  batches from the same generator, the bias heads' per-batch steps and refinement rounds, the gate optimiser's
  weight-decay and momentum steps (the gates' gradient is exactly zero then, for both kinds of final gate), the
  temperature and learning-rate schedules, best-epoch selection and every history row. A unit final only
  because it was dead stays watched: if it outputs anything in a forward-only epoch, that epoch is undone and
  run in full. `frozen_grad_margin` (opt-in) adds the bounded branch, which relies on an observed gradient
  bound: the masks are then final only under that assumption.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.metrics import accuracy_metrics
from bise_cli.core.precision import FP32, Autocast, device_generator
from bise_cli.core.progress import progress_bar
from bise_cli.data.base import Split, bias_columns
from bise_cli.method.frozen import (
    EpochState,
    dead_unit_pass,
    dead_unit_refusal,
    describe_blocking,
    gate_finality,
    revived,
    slope,
)
from bise_cli.method.probe import (
    HeadOptimiser,
    feature_epoch,
    head_accuracies,
    make_head,
    mean_over_attributes,
    model_epoch,
)
from bise_cli.method.reweighting import SampleWeights
from bise_cli.method.train import predict, weighted_cross_entropy
from bise_cli.models.masking import GateSet, capture_input, round_masks

log = logging.getLogger(__name__)

MI_SUBSETS = ("conflicting", "all", "conflicting_plus_aligned")
TAU_SCHEDULES = ("periodic", "cosine")
MASK_LR_SCHEDULES = ("none", "cosine")
MASK_OPTIMIZERS = ("sgd", "adam")
ESTIMATORS = ("straight_through", "hard_concrete")
CACHE_MODES = ("auto", "on", "off")
SELECTIONS = ("best_val", "last")
# Validation metrics a search can select its masks by (acc_weighted_avg_group needs one bias attribute).
SELECTION_METRICS = ("acc", "acc_unbiased", "acc_avg_group", "acc_weighted_avg_group", "acc_worst_group",
                     "acc_aligned", "acc_conflicting")


@dataclass
class SearchSettings(HeadOptimiser):
    """Every number of the search; defaults are the paper's (the official code's defaults)."""

    gate_init: float = 0.0
    tau0: float = 1.0
    tau_factor: float = 0.5
    tau_period: int = 10
    tau_min: float = 1e-3
    batch_size: int = 100
    mask_lr: float = 1e-2
    mask_momentum: float = 0.9
    mask_weight_decay: float = 1e-4
    head_pretrain_epochs: int = 50
    head_refine_epochs: int = 50
    alpha: float = 1.0
    gamma: float = 1.0
    mi_subset: str = "conflicting"
    mi_aligned_share: float = 0.1  # conflicting_plus_aligned only; the share is unpublished, this is our choice
    tau_schedule: str = "periodic"
    mask_lr_schedule: str = "none"
    mask_optimizer: str = "sgd"
    amp: Autocast = FP32  # the run's autocast context (set by the pipeline from `precision`; not a pruning option)
    round_to: int = 1  # keep per-layer unit counts at multiples of this (extra units by final gate logit)
    cache_features: str = "auto"
    augment: bool = False
    selection: str = "best_val"
    selection_metric: str = "acc"
    also_select_by: tuple = ()
    track_test: bool = False
    eval_batch_size: int = 500
    tau_floor: float = 0.0          # variants of our own (module docstring); 0 / 1 / False = the paper
    gate_noise: float = 0.0
    estimator: str = "straight_through"
    hard_concrete_beta: float = 2 / 3  # Louizos et al. (ICLR 2018)'s temperature
    sparsity_weight: float = 0.0
    restarts: int = 1
    stop_when_frozen: bool = True   # identical results by construction (module docstring)
    frozen_grad_margin: float | None = None  # None: the exact criterion only; a number: also the bounded branch

    def validate(self) -> SearchSettings:
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise BiseError(f"pruning.round_to must be an integer >= 1 (1 = no rounding), got {self.round_to!r}")
        for metric in (self.selection_metric, *self.also_select_by):
            check_choice("pruning.selection_metric", metric, SELECTION_METRICS)
        check_choice("pruning.mi_subset", self.mi_subset, MI_SUBSETS)
        check_choice("pruning.tau_schedule", self.tau_schedule, TAU_SCHEDULES)
        check_choice("pruning.mask_lr_schedule", self.mask_lr_schedule, MASK_LR_SCHEDULES)
        check_choice("pruning.mask_optimizer", self.mask_optimizer, MASK_OPTIMIZERS)
        if not 0 <= self.mi_aligned_share <= 1:
            raise BiseError(f"pruning.mi_aligned_share must be in [0, 1] (got {self.mi_aligned_share})")
        check_choice("pruning.cache_features", self.cache_features, CACHE_MODES)
        check_choice("pruning.selection", self.selection, SELECTIONS)
        if self.gamma < 0 or self.alpha < 0:
            raise BiseError(f"pruning.gamma and pruning.alpha must be >= 0 (got gamma={self.gamma}, "
                            f"alpha={self.alpha})")
        if not (0 < self.tau_factor < 1) or self.tau_period < 1 or not (0 < self.tau_min < self.tau0):
            raise BiseError("the temperature schedule never stops: need 0 < pruning.tau_factor < 1 (got "
                            f"{self.tau_factor}), pruning.tau_period >= 1 (got {self.tau_period}) and "
                            f"0 < pruning.tau_min < pruning.tau0 (got {self.tau_min}, {self.tau0})")
        if self.batch_size < 1 or self.head_pretrain_epochs < 0 or self.head_refine_epochs < 0:
            raise BiseError("pruning.batch_size must be >= 1 and the head epoch counts >= 0")
        if not 0 <= self.tau_floor < self.tau0:
            raise BiseError(f"pruning.tau_floor must be in [0, tau0) (got {self.tau_floor})")
        check_choice("pruning.estimator", self.estimator, ESTIMATORS)
        if self.estimator == "hard_concrete" and (self.gate_noise > 0 or not self.hard_concrete_beta > 0):
            raise BiseError("pruning.estimator=hard_concrete draws its own noise: it needs pruning.gate_noise=0 "
                            f"(got {self.gate_noise}) and pruning.hard_concrete_beta > 0 (got "
                            f"{self.hard_concrete_beta})")
        if self.gate_noise < 0 or self.sparsity_weight < 0:
            raise BiseError("pruning.gate_noise and pruning.sparsity_weight must be >= 0 (got "
                            f"{self.gate_noise}, {self.sparsity_weight})")
        if self.frozen_grad_margin is not None and (isinstance(self.frozen_grad_margin, bool)
                                                    or not self.frozen_grad_margin >= 1):
            raise BiseError("pruning.frozen_grad_margin must be null (exact criterion only) or a number >= 1 "
                            f"(got {self.frozen_grad_margin!r})")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise BiseError(f"pruning.restarts must be an integer >= 1 (got {self.restarts!r})")
        return self

    @property
    def noise_scale(self) -> float:
        """The scale of the logistic noise drawn per unit and batch: 0 for the paper's deterministic gates, 1 for
        hard concrete (its beta sets the sharpness), `gate_noise` for the Gumbel-sigmoid straight-through gates."""
        return 1.0 if self.estimator == "hard_concrete" else self.gate_noise

    @property
    def num_epochs(self) -> int:
        """Mask epochs until tau <= tau_min (100 with the paper's defaults); the cosine schedule runs as many."""
        drops = math.ceil(math.log(self.tau_min / self.tau0) / math.log(self.tau_factor) - 1e-12)
        return drops * self.tau_period

    def tau_after(self, epoch: int, tau: float) -> float:
        """The temperature after mask epoch `epoch` (1-based) that ran at `tau`."""
        if self.tau_schedule == "cosine":
            # Cosine annealing from tau0 (epoch 1) down to exactly tau_min after the last epoch.
            progress = min(epoch / self.num_epochs, 1.0)
            return self.tau_min + (self.tau0 - self.tau_min) * (1 + math.cos(math.pi * progress)) / 2
        return tau * self.tau_factor if epoch % self.tau_period == 0 else tau


@dataclass
class SearchResult:
    """What the search returns: the selected and last binary masks, per-epoch history and the head."""

    masks: dict[str, torch.Tensor]
    last_masks: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict]
    head_states: list[dict]           # one per bias attribute
    pretrain_head_states: list[dict]
    cached_features: bool
    approximate_cache: bool
    settings: dict = field(default_factory=dict)
    # Best masks under other validation metrics ({metric: {"epoch", "masks"}}), recorded for comparison.
    alternatives: dict = field(default_factory=dict)
    # The selected masks before `round_to` (equal to `masks` without rounding).
    unrounded_masks: dict = field(default_factory=dict)
    # The validation metric of the selected masks (what `restarts` compares); -inf without validation.
    best_value: float = -math.inf
    restart: int = 0  # which of the `restarts` searches was kept
    frozen_epoch: int | None = None  # the epoch after which no gate could change any more (None: never)


# --------------------------------------------------------------------------------------------- MI estimator

def normalized_mutual_information(b: torch.Tensor, q: torch.Tensor, num_bias: int,
                                  subset: torch.Tensor | None = None) -> torch.Tensor:
    """Plug-in MI between one-hot true bias `b` and soft predictions `q` (rows sum to 1), divided by ln K.

    With `subset` (booleans, one per sample): the MI of the samples in the subset, computed by weighting every
    row with 0 or 1 instead of selecting rows, so the sample count never has to reach the host. A zero weight
    removes its row from every sum, so the value is that of the selected rows (up to the rounding of sums taken
    in another order); 0 when the subset is empty."""
    if subset is None:
        joint = (F.one_hot(b, num_bias).to(q.dtype).t() @ q).clamp(min=1e-15) / len(b)
    else:
        weight = subset.to(q.dtype)
        n = weight.sum()
        joint = (F.one_hot(b, num_bias).to(q.dtype).t() @ (q * weight[:, None])).clamp(min=1e-15) / n.clamp(min=1)
    marg_b = joint.sum(1, keepdim=True)
    marg_q = joint.sum(0, keepdim=True)
    mi = (joint * torch.log(joint / (marg_b * marg_q).clamp(min=1e-15))).sum()
    if subset is not None:
        mi = mi * (n > 0)  # an empty subset carries no MI (and no gradient)
    return mi / math.log(num_bias)


def mi_subset_mask(column: torch.Tensor, y: torch.Tensor, settings: SearchSettings,
                   generator: torch.Generator) -> torch.Tensor:
    """The samples of a batch the MI of one bias attribute is computed on (`settings.mi_subset`), as booleans on
    the batch's device, computed there without reading any value back to the host.

    conflicting_plus_aligned adds round(mi_aligned_share * number of aligned samples) aligned samples, drawn
    uniformly without replacement, to the conflicting ones: the aligned samples with the smallest of i.i.d.
    uniform keys drawn on the device from a generator seeded by `generator` (`device_generator`)."""
    if settings.mi_subset == "all":
        return torch.ones_like(y, dtype=torch.bool)
    subset = column != y
    if settings.mi_subset == "conflicting_plus_aligned":
        device = column.device
        keys = torch.rand(len(column), generator=device_generator(generator, device), device=device)
        keys = keys.masked_fill(subset, 2.0)  # conflicting samples sort after every aligned one
        rank = torch.empty_like(column)
        rank[keys.argsort()] = torch.arange(len(column), device=device, dtype=rank.dtype)
        # In float64, like Python's round() (half to even) on the count.
        keep = torch.round(settings.mi_aligned_share * (~subset).sum().double())
        subset = subset | (rank < keep)
    return subset


def make_mask_optimizer(params, settings: SearchSettings) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or Adam on the gate parameters."""
    if settings.mask_optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.mask_lr, weight_decay=settings.mask_weight_decay)
    return torch.optim.SGD(params, lr=settings.mask_lr, momentum=settings.mask_momentum,
                           weight_decay=settings.mask_weight_decay)


# -------------------------------------------------------------------------------------------------- search

class _Heads:
    """One linear bias head per attribute with its own SGD, trained on cached or recomputed features."""

    def __init__(self, model: nn.Module, search: Split, num_bias: int, settings: SearchSettings, use_cache: bool,
                 generator: torch.Generator, seed: int, device):
        self.model, self.search, self.settings, self.use_cache = model, search, settings, use_cache
        self.generator, self.device = generator, device
        dim = model.classifier.in_features
        self.pairs = [make_head(dim, num_bias, settings.head_lr, settings.head_momentum,
                                settings.head_weight_decay, seed + k) for k in range(len(search.bias_columns))]
        for head, _ in self.pairs:
            head.to(device, non_blocking=True)  # a new CPU head: copied without waiting

    def train(self, epochs: int, gates: GateSet, mode: str) -> list[float]:
        """`epochs` head-only epochs with the gates in `mode`; returns each head's accuracy on the search set.
        Cached features and labels stay on the device for all epochs; the accuracies are read once."""
        s = self.settings
        with gates.mode(mode):
            if epochs and not self.use_cache:
                for _ in range(epochs):
                    model_epoch(self.pairs, self.model, self.search, s.batch_size, self.generator, self.device)
            z = predict(self.model, self.search, s.eval_batch_size, self.device, features=True, host=False)["z"]
            b = self.search.b.to(self.device, non_blocking=self.search.b.device.type == "cpu")
            if epochs and self.use_cache:
                for _ in range(epochs):
                    feature_epoch(self.pairs, z, b, s.batch_size, self.generator)
        return head_accuracies([head for head, _ in self.pairs], z, b)

    def states(self) -> list[dict]:
        return [{k: v.detach().cpu().clone() for k, v in head.state_dict().items()} for head, _ in self.pairs]


def _mask_epoch(model, gates: GateSet, heads: _Heads, mask_opt, search: Split, weights: SampleWeights,
                settings: SearchSettings, num_bias: int, generator, device, epoch: int, bar,
                tap, frozen: bool = False, previous: torch.Tensor | None = None,
                watch: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict[str, torch.Tensor], float, dict]:
    """One pass of the gates over the search split; returns the epoch's mean losses, head accuracy and unit
    sparsity, the binary masks after it (on the device), the largest |dJ/dg| seen (0 unless the bounded
    criterion of `stop_when_frozen` needs it) and the checks of the dead-unit branch (bise_cli.method.frozen).

    `frozen` (after the masks froze, bise_cli.method.frozen): the forward pass runs without autograd and the gates step
    on an exact zero gradient (what the backward pass would give them), so everything else (batches, heads,
    optimiser state, the row) is what the full pass gives, at the cost of the forward pass alone.

    Checks: "settled", whether the hard masks after the epoch equal `previous` (those after the epoch before);
    with `watch` (units final only because they were dead; every gate then records its units' max |h|),
    "revived", whether one of them had a non-zero h.

    The MI subsets weight the samples instead of selecting them, and every sum stays on the device (float64):
    the host reads the device once per epoch, after the last batch."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = {"loss_ce": zero.clone(), "mi": zero.clone(), "mi_batches": zero.clone(), "head_hits": zero.clone(),
            "finite": zero.clone()}
    bounded = settings.stop_when_frozen and settings.frozen_grad_margin is not None and not frozen
    upstream = zero.clone()  # the largest |dJ/dg| seen (the bounded criterion's gradient bound)
    n = 0
    gates.record_peaks(watch is not None)
    for x, y, b in search.batches(settings.batch_size, shuffle=True, generator=generator, device=device,
                                  augment=settings.augment):
        if settings.noise_scale > 0:
            gates.sample_noise(settings.noise_scale, generator)
        # Frozen: the same forward values (masked gates are exactly hard), no graph.
        with torch.set_grad_enabled(not frozen), settings.amp:
            logits = model(x)
        logits, z = logits.float(), tap["z"].float()
        with torch.set_grad_enabled(not frozen):
            loss_ce = weighted_cross_entropy(logits, y, weights(y, b))
            objective = settings.alpha * loss_ce
            if settings.gamma > 0:
                mi_total, present = None, None
                for (head, _), column in zip(heads.pairs, bias_columns(b), strict=True):
                    subset = mi_subset_mask(column, y, settings, generator)
                    # The head's weights are detached here: the MI gradient reaches the gates only.
                    q = F.softmax(F.linear(z, head.weight.detach(), head.bias.detach()), dim=1)
                    mi = normalized_mutual_information(column, q, num_bias, subset)
                    mi_total = mi if mi_total is None else mi_total + mi
                    present = subset.any() if present is None else present | subset.any()
                # A batch without any subset sample adds 0 (as skipping the MI would) and is not averaged over.
                objective = objective + settings.gamma * mi_total
                sums["mi"] += mi_total.detach()
                sums["mi_batches"] += present
            if settings.sparsity_weight > 0:
                objective = objective + settings.sparsity_weight * gates.soft_fraction()
        mask_opt.zero_grad(set_to_none=True)
        if frozen:
            for param in gates.parameters():
                param.grad = torch.zeros_like(param)
        else:
            objective.backward()
        if bounded:
            upstream = torch.maximum(upstream, _upstream_gradient(gates).to(upstream.device))
        # Each head steps on its own CE over the detached features (after the gates' backward pass).
        for (head, opt), column in zip(heads.pairs, bias_columns(b), strict=True):
            head_logits = head(z.detach())
            loss = F.cross_entropy(head_logits, column)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sums["head_hits"] += (head_logits.argmax(1) == column).sum() / len(heads.pairs)
        mask_opt.step()
        for _, opt in heads.pairs:
            opt.step()
        sums["loss_ce"] += loss_ce.detach() * len(y)
        sums["finite"] += torch.isfinite(objective.detach()).logical_not()
        n += len(y)
        bar.advance_batch()
    gates.record_peaks(False)
    gates.sample_noise(0.0, generator)  # evaluation and the head epochs see the deterministic gates
    masks = {p.name: gates.gate(p.name).hard().bool() for p in gates.points}
    kept = torch.stack([m.sum() for m in masks.values()]).sum().double()
    settled = (_hard_masks(gates) == previous).all() if previous is not None else zero.bool()
    woke = revived(gates.peaks(), watch) if watch is not None else zero.bool()
    loss_ce, mi, mi_batches, head_hits, nonfinite, kept, upstream, settled, woke = torch.stack(
        [sums["loss_ce"], sums["mi"], sums["mi_batches"], sums["head_hits"], sums["finite"], kept,
         upstream.to(kept.device), settled.to(kept), woke.to(kept)]).tolist()
    if nonfinite:
        raise BiseError(f"the BISE objective became non-finite at epoch {epoch}; lower pruning.mask_lr or "
                        "pruning.gamma")
    units = sum(m.numel() for m in masks.values())
    row = {"loss_ce": loss_ce / n, "mi": mi / mi_batches if mi_batches else None, "head_acc": head_hits / n,
           "sparsity_units": 1.0 - kept / units}
    return row, masks, upstream, {"settled": bool(settled), "revived": bool(woke)}


def _hard_masks(gates: GateSet) -> torch.Tensor:
    """Every gate's hard mask 1[m >= 0] in one boolean vector, on the device."""
    return torch.cat([gate.logits.detach() >= 0 for gate in gates.gates.values()])


def _upstream_gradient(gates: GateSet) -> torch.Tensor:
    """max |dJ/dg| over the units whose straight-through slope is not negligible (dJ/dm = dJ/dg * slope)."""
    largest = []
    for gate in gates.gates.values():
        if gate.logits.grad is None:
            continue
        gate_slope = slope(gate.logits.detach(), gate.tau)
        usable = gate_slope > 1e-6
        largest.append((gate.logits.grad.abs() / gate_slope.clamp(min=1e-6) * usable).max())
    return torch.stack(largest).max().double() if largest else torch.zeros((), dtype=torch.float64)


def _evaluate(model, split: Split | None, num_classes, num_bias, bias_names, batch_size, device,
              group_weights=None) -> dict | None:
    if split is None or len(split) == 0:
        return None
    out = predict(model, split, batch_size, device)
    return accuracy_metrics(out["y"], out["b"], out["pred"], num_classes, num_bias, bias_names, group_weights)


def run_search(model: nn.Module, gates: GateSet, search: Split, val: Split | None, test: Split | None, *,
               num_classes: int, num_bias: int, weights: SampleWeights, settings: SearchSettings,
               bias_names: tuple[str, ...] = ("bias",), device="cpu", seed: int = 0,
               group_weights: torch.Tensor | None = None) -> SearchResult:
    """Run the BISE search on a frozen `model` with `gates` attached; returns the selected masks and history.

    With `restarts` = k > 1 the search runs k times from the same gate start (seeds seed + 1000 i) and the
    run whose selected masks have the best validation metric is returned (ties to the earlier run); every
    run's history is kept, each row tagged with its `restart`."""
    settings.validate()
    if settings.restarts == 1:
        return _one_search(model, gates, search, val, test, num_classes=num_classes, num_bias=num_bias,
                           weights=weights, settings=settings, bias_names=bias_names, device=device, seed=seed,
                           group_weights=group_weights)
    if val is None:
        raise BiseError("pruning.restarts > 1 chooses among searches by validation: the dataset has no val split "
                        "(Multi-Color MNIST: set dataset.val_holdout)")
    start = gates.logits_snapshot()
    best, history = None, []
    for restart in range(settings.restarts):
        with torch.no_grad():
            for name, logits in start.items():
                gates.gate(name).logits.copy_(logits)
        result = _one_search(model, gates, search, val, test, num_classes=num_classes, num_bias=num_bias,
                             weights=weights, settings=settings, bias_names=bias_names, device=device,
                             seed=seed + 1000 * restart, group_weights=group_weights)
        history += [{**row, "restart": restart} for row in result.history]
        result.restart = restart
        log.info("restart %d: selected validation %s %.4f", restart, settings.selection_metric, result.best_value)
        if best is None or result.best_value > best.best_value:
            best = result
    best.history = history
    return best


def _one_search(model: nn.Module, gates: GateSet, search: Split, val: Split | None, test: Split | None, *,
                num_classes: int, num_bias: int, weights: SampleWeights, settings: SearchSettings,
                bias_names: tuple[str, ...], device, seed: int, group_weights: torch.Tensor | None) -> SearchResult:
    """One BISE search (see run_search)."""
    model.eval()
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("run_search expects a frozen model (every parameter requires_grad=False)")
    gates.to(device)
    gates.set_tau(settings.tau0)
    gates.set_mode("masked")
    gates.set_hard_concrete(settings.hard_concrete_beta if settings.estimator == "hard_concrete" else None)
    generator = torch.Generator().manual_seed(seed)
    weights = weights.to(device)
    augmented = settings.augment and search.augment is not None
    # Cached bottleneck features are exact only when the frozen model sees the same inputs every epoch.
    use_cache = settings.cache_features == "on" or (settings.cache_features == "auto" and not augmented)
    approximate = use_cache and augmented
    if approximate:
        log.warning("bias-head epochs use cached features of un-augmented inputs: an approximation")
    # The same fact makes a dead unit's zero gradient last (bise_cli.method.frozen: the dead-unit branch).
    refusal = dead_unit_refusal(model, settings, same_inputs=not augmented)
    if refusal is not None:
        log.info("masks frozen only by saturated gates (pruning.stop_when_frozen): no dead-unit branch, %s", refusal)
    heads = _Heads(model, search, num_bias, settings, use_cache, generator, seed, device)
    head_acc = heads.train(settings.head_pretrain_epochs, gates, "vanilla")
    pretrain_states = heads.states()
    log.info("bias head(s) pre-trained for %d epochs: accuracy %s on the search set",
             settings.head_pretrain_epochs, ", ".join(f"{a:.3f}" for a in head_acc))

    mask_opt = make_mask_optimizer(gates.parameters(), settings)
    mask_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(mask_opt, T_max=settings.num_epochs)
                  if settings.mask_lr_schedule == "cosine" else None)
    tau = settings.tau0
    history: list[dict] = []
    grad_bound, frozen_epoch, frozen_val = 0.0, None, None
    watch, check, checked_tau = None, None, None  # units final only as dead since frozen_epoch; the last check
    # The dead units under the masks in force (a pass over the search split once the masks settle; None: not
    # known) and the masks after the previous epoch.
    verified, previous = None, _hard_masks(gates)
    tracked = [settings.selection_metric, *[m for m in settings.also_select_by if m != settings.selection_metric]]
    bests = {m: {"value": -math.inf, "epoch": 0, "masks": gates.binary_masks()} for m in tracked}
    epochs = settings.num_epochs
    log.info("BISE search: %d mask epochs, %d gated units, %d bias head(s) on %s features", epochs,
             sum(p.units for p in gates.points), len(heads.pairs), "cached" if use_cache else "recomputed")
    with progress_bar("BISE search", epochs, search.num_batches(settings.batch_size)) as bar, \
            capture_input(model.classifier) as tap:
        for epoch in range(1, epochs + 1):
            frozen = frozen_epoch is not None and settings.stop_when_frozen
            # A forward-only epoch that finds a watched unit awake is undone and run in full (bise_cli.method.frozen).
            state = EpochState(gates, mask_opt, heads.pairs, generator) if frozen and watch else None
            stats, masks, upstream, checks = _mask_epoch(
                model, gates, heads, mask_opt, search, weights, settings, num_bias, generator, device, epoch, bar,
                tap, frozen=frozen, previous=previous, watch=watch)
            if checks.get("revived"):
                log.warning("epoch %d: a unit found dead after epoch %d is not any more (the model's activations "
                            "changed between epochs); the masks are not final: %s", epoch, frozen_epoch,
                            "the epoch runs again in full" if frozen else "checking again")
                if frozen:
                    state.restore(gates, mask_opt, heads.pairs, generator)
                    stats, masks, upstream, checks = _mask_epoch(
                        model, gates, heads, mask_opt, search, weights, settings, num_bias, generator, device,
                        epoch, _NoBar(), tap, previous=previous)
                frozen, frozen_epoch, frozen_val, watch, verified = False, None, None, None, None
            previous = _hard_masks(gates)
            if not checks["settled"]:
                verified = None
            row = {"epoch": epoch, "tau": tau, **stats}
            if frozen:
                # The masks are those of the epoch that froze: so are the evaluation's metrics (same computation).
                val_metrics, test_metrics = frozen_val
            else:
                with gates.mode("fixed"):
                    # group_weights (the training split's group shares) make acc_weighted_avg_group selectable.
                    val_metrics = _evaluate(model, val, num_classes, num_bias, bias_names, settings.eval_batch_size,
                                            device, group_weights)
                    test_metrics = (_evaluate(model, test, num_classes, num_bias, bias_names,
                                              settings.eval_batch_size, device) if settings.track_test else None)
            row.update(val_acc=val_metrics[settings.selection_metric] if val_metrics else None,
                       test_acc=test_metrics["acc"] if test_metrics else None,
                       test_acc_unbiased=test_metrics["acc_unbiased"] if test_metrics else None)
            for metric, best in bests.items():
                value = val_metrics.get(metric) if val_metrics else None
                if value is not None and not math.isnan(value) and value >= best["value"]:  # ties: later epoch
                    bests[metric] = {"value": value, "epoch": epoch, "masks": masks}
            if mask_sched is not None:
                row["mask_lr"] = mask_opt.param_groups[0]["lr"]
                mask_sched.step()
            tau = settings.tau_after(epoch, tau)
            if epoch % settings.tau_period == 0:  # the heads catch up with the masks (both tau schedules)
                row["head_acc_refined"] = mean_over_attributes(heads.train(settings.head_refine_epochs, gates,
                                                                           "fixed"))
            gates.set_tau(max(tau, settings.tau_floor))
            history.append(row)
            val_text = f"val {row['val_acc']:.3f} " if row["val_acc"] is not None else ""
            bar.advance_epoch(f"{val_text}sparsity {row['sparsity_units']:.2f} tau {tau:.2g}"
                              f"{' (masks frozen)' if frozen else ''}")
            if tau <= settings.tau_min:
                break
            if frozen_epoch is None:
                # The criterion is checked whether or not the option is on, so both record the same epoch.
                grad_bound = max(grad_bound, upstream)
                steps_left = (epochs - epoch) * search.num_batches(settings.batch_size)
                margin = settings.frozen_grad_margin if settings.stop_when_frozen else None
                if refusal is None and checks["settled"] and verified is None:
                    # The masks did not change over the epoch: which units are dead under them (bise_cli.method.frozen).
                    verified = dead_unit_pass(model, gates, search, settings.batch_size, settings.amp, device)
                check, checked_tau = gate_finality(gates, mask_opt, settings, tau, steps_left,
                                                   None if margin is None else margin * grad_bound, verified), tau
                log.debug("epoch %d: %s%s", epoch, check.describe(),
                          "" if checks["settled"] else "; the masks changed over the epoch")
                if check.frozen:
                    frozen_epoch, frozen_val = epoch, (val_metrics, test_metrics)
                    watch = check.watch if check.counts["dead"] else None
                    log.info("masks frozen after epoch %d of %d (%s)%s", epoch, epochs, check.describe(),
                             ": the remaining epochs run forward-only (pruning.stop_when_frozen)"
                             if settings.stop_when_frozen else "")
    if frozen_epoch is None and check is not None:
        log.info("masks never frozen: at the last check %s%s; not final: %s", check.describe(),
                 f"; no dead-unit branch: {refusal}" if refusal else "",
                 describe_blocking(gates, check, checked_tau, gates.peaks() if verified is not None else {}))
    gates.set_hard_concrete(None)  # whatever uses the gates next sees the deterministic ones
    result = _select(gates, bests, history, heads, pretrain_states, settings, val is not None, use_cache,
                     approximate)
    result.frozen_epoch = frozen_epoch
    return result


class _NoBar:
    """A progress bar that shows nothing (an epoch run again after an undone forward-only epoch)."""

    def advance_batch(self) -> None:
        pass


def _on_host(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean masks copied to the CPU in one transfer (the search keeps each epoch's masks on the device)."""
    flat = torch.cat([m.reshape(-1) for m in masks.values()]).cpu()
    parts = flat.split([m.numel() for m in masks.values()])
    return {name: part.view(m.shape) for (name, m), part in zip(masks.items(), parts, strict=True)}


def _select(gates: GateSet, bests: dict, history: list[dict], heads: _Heads, pretrain_states: list[dict],
            settings: SearchSettings, has_val: bool, use_cache: bool, approximate: bool) -> SearchResult:
    """The selected masks: best validation epoch, or the last masks without a validation split."""
    last = gates.binary_masks()
    bests = {m: {**b, "masks": _on_host(b["masks"])} for m, b in bests.items()}
    use_best = settings.selection == "best_val" and has_val
    if settings.selection == "best_val" and not has_val:
        log.warning("pruning.selection=best_val but the dataset has no validation split: using the last masks")
    best = bests[settings.selection_metric]
    # Rounded unit counts run at the speed their MACs promise; the extra units are those whose final gate
    # logits came closest to being kept.
    scores = gates.logits_snapshot()

    def rounded(masks: dict) -> dict:
        return masks if settings.round_to == 1 else round_masks(masks, scores, settings.round_to)

    alternatives = {m: {"epoch": b["epoch"], "masks": rounded(b["masks"])} for m, b in bests.items()
                    if m != settings.selection_metric and use_best}
    selected = best["masks"] if use_best else last
    last_value = history[-1]["val_acc"] if history and history[-1]["val_acc"] is not None else -math.inf
    return SearchResult(masks=rounded(selected), unrounded_masks=selected, last_masks=last,
                        best_value=best["value"] if use_best else last_value,
                        best_epoch=best["epoch"] if use_best else len(history), history=history,
                        alternatives=alternatives, head_states=heads.states(), pretrain_head_states=pretrain_states,
                        cached_features=use_cache, approximate_cache=approximate, settings=asdict(settings))
