"""The BISE mask search (method.md §2): reweighted CE + bias-MI penalty on hard structured gates of a frozen model.

Per batch (§2.6): forward the gated model (hard gates, straight-through gradients), L_r = (1/B) sum r(y,b) CE,
I = normalised plug-in MI between the true bias and the bias head's softmax on the bias-conflicting samples,
gates step on alpha*L_r + gamma*I, the bias head steps on its own CE over stopgrad(z). The head is
pre-trained for `head_pretrain_epochs` on the ungated model and refined for `head_refine_epochs` after every
temperature drop; without augmentation those head-only epochs run on cached bottleneck features (§2.14),
which is exact. Temperature: tau <- tau_factor * tau every `tau_period` epochs; stop once tau <= tau_min.
Selection: the masks of the epoch with the best validation metric (ties to the later epoch), or the last.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.data.base import Split
from bise_cli.errors import BiseError, check_choice
from bise_cli.masking import GateSet, capture_input, unit_sparsity
from bise_cli.metrics import accuracy_metrics
from bise_cli.progress import progress_bar
from bise_cli.train import predict, weighted_cross_entropy

log = logging.getLogger(__name__)

REWEIGHTINGS = ("nominal_rho", "group_inverse_freq", "none")
MI_SUBSETS = ("conflicting", "all")
CACHE_MODES = ("auto", "on", "off")
SELECTIONS = ("best_val", "last")


@dataclass
class SearchSettings:
    """Every number of the search; defaults are the paper's (method.md §2.3-2.8)."""

    gate_init: float = 0.0
    tau0: float = 1.0
    tau_factor: float = 0.5
    tau_period: int = 10
    tau_min: float = 1e-3
    batch_size: int = 100
    mask_lr: float = 1e-2
    mask_momentum: float = 0.9
    mask_weight_decay: float = 1e-4
    head_lr: float = 0.1
    head_momentum: float = 0.9
    head_weight_decay: float = 1e-4
    head_pretrain_epochs: int = 50
    head_refine_epochs: int = 50
    alpha: float = 1.0
    gamma: float = 1.0
    mi_subset: str = "conflicting"
    reweighting: str = "nominal_rho"
    cache_features: str = "auto"
    augment: bool = False
    selection: str = "best_val"
    selection_metric: str = "acc"
    also_select_by: tuple = ()
    track_test: bool = False
    eval_batch_size: int = 500

    def validate(self) -> SearchSettings:
        check_choice("pruning.reweighting", self.reweighting, REWEIGHTINGS)
        check_choice("pruning.mi_subset", self.mi_subset, MI_SUBSETS)
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
        return self

    @property
    def num_epochs(self) -> int:
        """Mask epochs until tau <= tau_min (100 with the paper's defaults)."""
        drops = math.ceil(math.log(self.tau_min / self.tau0) / math.log(self.tau_factor) - 1e-12)
        return drops * self.tau_period


@dataclass
class SearchResult:
    """What the search returns: the selected and last binary masks, per-epoch history and the head."""

    masks: dict[str, torch.Tensor]
    last_masks: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict]
    head_state: dict
    pretrain_head_state: dict
    cached_features: bool
    approximate_cache: bool
    settings: dict = field(default_factory=dict)
    # Best masks under other validation metrics ({metric: {"epoch", "masks"}}), recorded for comparison.
    alternatives: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- reweighting

def group_weights(reweighting: str, y: torch.Tensor, b: torch.Tensor, num_classes: int, num_bias: int,
                  rho: float | None) -> torch.Tensor:
    """Weight r(y, b) for every (class, bias) cell (method.md §2.5.1).

    nominal_rho: aligned (b == y) 1/(C*rho), conflicting (C-1)/(C*(1-rho)) with the nominal rho.
    group_inverse_freq: 1/(G * p(y, b)) with G = C*K cells and p the empirical frequency (counts clamped >= 1).
    none: 1 everywhere."""
    check_choice("pruning.reweighting", reweighting, REWEIGHTINGS)
    if reweighting == "none":
        return torch.ones(num_classes, num_bias)
    if reweighting == "group_inverse_freq":
        counts = torch.bincount(y * num_bias + b, minlength=num_classes * num_bias).double().clamp(min=1)
        freq = counts / len(y)
        return (1.0 / (num_classes * num_bias * freq)).float().view(num_classes, num_bias)
    if rho is None or not 0 < rho <= 1:
        raise BiseError(f"nominal_rho reweighting needs rho in (0, 1], got {rho}")
    c = num_classes
    aligned = 1.0 / (c * rho)
    # rho = 1 has no conflicting samples: their weight is irrelevant, 0 avoids a division by zero.
    conflicting = (c - 1) / (c * (1 - rho)) if rho < 1 else 0.0
    table = torch.full((num_classes, num_bias), conflicting)
    idx = torch.arange(min(num_classes, num_bias))
    table[idx, idx] = aligned
    return table


# --------------------------------------------------------------------------------------------- MI estimator

def normalized_mutual_information(b: torch.Tensor, q: torch.Tensor, num_bias: int) -> torch.Tensor:
    """Plug-in MI between one-hot true bias `b` and soft predictions `q` (rows sum to 1), divided by ln K."""
    n = len(b)
    joint = (F.one_hot(b, num_bias).to(q.dtype).t() @ q).clamp(min=1e-15) / n
    marg_b = joint.sum(1, keepdim=True)
    marg_q = joint.sum(0, keepdim=True)
    mi = (joint * torch.log(joint / (marg_b * marg_q).clamp(min=1e-15))).sum()
    return mi / math.log(num_bias)


# ---------------------------------------------------------------------------------------------- bias head

def make_head(dim: int, num_bias: int, lr: float, momentum: float, weight_decay: float, seed: int):
    """A linear bias head and its own persistent SGD optimiser."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(dim, num_bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return head, opt


def train_head_on_features(head: nn.Linear, opt: torch.optim.Optimizer, z: torch.Tensor, b: torch.Tensor,
                           epochs: int, batch_size: int, generator: torch.Generator) -> None:
    """Head-only epochs on cached features: same batches as `train_head_on_model` given the same generator."""
    device = head.weight.device
    for _ in range(epochs):
        order = torch.randperm(len(b), generator=generator)
        for start in range(0, len(b), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(z[idx].to(device)), b[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def train_head_on_model(head: nn.Linear, opt: torch.optim.Optimizer, model: nn.Module, split: Split,
                        epochs: int, batch_size: int, generator: torch.Generator, device) -> None:
    """Head-only epochs recomputing the frozen model's features every batch (the literal reference path)."""
    with capture_input(model.classifier) as tap:
        for _ in range(epochs):
            for x, _, b in split.batches(batch_size, shuffle=True, generator=generator, device=device):
                with torch.no_grad():
                    model(x)
                loss = F.cross_entropy(head(tap["z"].detach()), b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


@torch.no_grad()
def head_accuracy(head: nn.Linear, z: torch.Tensor, b: torch.Tensor) -> float:
    device = head.weight.device
    return float((head(z.to(device)).argmax(1).cpu() == b).float().mean()) if len(b) else math.nan


# -------------------------------------------------------------------------------------------------- search

def _evaluate(model, split: Split | None, num_classes, num_bias, batch_size, device) -> dict | None:
    if split is None or len(split) == 0:
        return None
    out = predict(model, split, batch_size, device)
    return accuracy_metrics(out["y"], out["b"], out["pred"], num_classes, num_bias)


def run_search(model: nn.Module, gates: GateSet, search: Split, val: Split | None, test: Split | None, *,
               num_classes: int, num_bias: int, rho: float | None, settings: SearchSettings, device="cpu",
               seed: int = 0) -> SearchResult:
    """Run the BISE search on a frozen `model` with `gates` attached; returns the selected masks and history."""
    settings.validate()
    model.eval()
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("run_search expects a frozen model (every parameter requires_grad=False)")
    gates.to(device)
    gates.set_tau(settings.tau0)
    gates.set_mode("masked")
    generator = torch.Generator().manual_seed(seed)
    weights = group_weights(settings.reweighting, search.y, search.b, num_classes, num_bias, rho).to(device)
    use_cache = settings.cache_features == "on" or (settings.cache_features == "auto" and not settings.augment)
    approximate = use_cache and settings.augment
    if approximate:
        log.warning("bias-head epochs use cached features of un-augmented inputs: an approximation")

    dim = model.classifier.in_features
    head, head_opt = make_head(dim, num_bias, settings.head_lr, settings.head_momentum,
                               settings.head_weight_decay, seed)
    head.to(device)

    def head_epochs(epochs: int, mode: str) -> float:
        """Train the head for `epochs` with the gates in `mode`; returns its accuracy on the search set."""
        with gates.mode(mode):
            if epochs and not use_cache:
                train_head_on_model(head, head_opt, model, search, epochs, settings.batch_size, generator, device)
            z = predict(model, search, settings.eval_batch_size, device, features=True)["z"]
            if epochs and use_cache:
                train_head_on_features(head, head_opt, z, search.b, epochs, settings.batch_size, generator)
        return head_accuracy(head, z, search.b)

    head_acc = head_epochs(settings.head_pretrain_epochs, "vanilla")
    pretrain_head_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    log.info("bias head pre-trained for %d epochs: accuracy %.3f on the search set",
             settings.head_pretrain_epochs, head_acc)

    mask_opt = torch.optim.SGD(gates.parameters(), lr=settings.mask_lr, momentum=settings.mask_momentum,
                               weight_decay=settings.mask_weight_decay)
    tau = settings.tau0
    history: list[dict] = []
    tracked = [settings.selection_metric, *[m for m in settings.also_select_by if m != settings.selection_metric]]
    bests = {m: {"value": -math.inf, "epoch": 0, "masks": gates.binary_masks()} for m in tracked}
    epochs = settings.num_epochs
    log.info("BISE search: %d mask epochs, %d gates, head epochs on %s features", epochs,
             sum(p.units for p in gates.points), "cached" if use_cache else "recomputed")
    with progress_bar("BISE search", epochs, search.num_batches(settings.batch_size)) as bar, \
            capture_input(model.classifier) as tap:
        for epoch in range(1, epochs + 1):
            sums = {"loss_ce": 0.0, "mi": 0.0, "mi_batches": 0, "head_hits": 0, "n": 0}
            for x, y, b in search.batches(settings.batch_size, shuffle=True, generator=generator, device=device):
                logits = model(x)
                z = tap["z"]
                loss_ce = weighted_cross_entropy(logits, y, weights[y, b])
                objective = settings.alpha * loss_ce
                subset = (b != y) if settings.mi_subset == "conflicting" else torch.ones_like(b, dtype=torch.bool)
                if subset.any() and settings.gamma > 0:
                    # The head's weights are detached here: the MI gradient reaches the gates only (§2.5.2).
                    q = F.softmax(F.linear(z[subset], head.weight.detach(), head.bias.detach()), dim=1)
                    mi = normalized_mutual_information(b[subset], q, num_bias)
                    objective = objective + settings.gamma * mi
                    sums["mi"] += mi.item()
                    sums["mi_batches"] += 1
                if not torch.isfinite(objective):
                    raise BiseError(f"the BISE objective became {objective.item()} at epoch {epoch}; "
                                    "lower pruning.mask_lr or pruning.gamma")
                mask_opt.zero_grad(set_to_none=True)
                objective.backward()
                head_logits = head(z.detach())
                head_loss = F.cross_entropy(head_logits, b)
                head_opt.zero_grad(set_to_none=True)
                head_loss.backward()
                mask_opt.step()
                head_opt.step()
                sums["loss_ce"] += loss_ce.item() * len(y)
                sums["head_hits"] += int((head_logits.argmax(1) == b).sum())
                sums["n"] += len(y)
                bar.advance_batch()

            masks = gates.binary_masks()
            with gates.mode("fixed"):
                val_metrics = _evaluate(model, val, num_classes, num_bias, settings.eval_batch_size, device)
                test_metrics = (_evaluate(model, test, num_classes, num_bias, settings.eval_batch_size, device)
                                if settings.track_test else None)
            row = {"epoch": epoch, "tau": tau, "loss_ce": sums["loss_ce"] / sums["n"],
                   "mi": sums["mi"] / sums["mi_batches"] if sums["mi_batches"] else None,
                   "head_acc": sums["head_hits"] / sums["n"], "sparsity_units": unit_sparsity(masks),
                   "val_acc": val_metrics[settings.selection_metric] if val_metrics else None,
                   "test_acc": test_metrics["acc"] if test_metrics else None,
                   "test_acc_unbiased": test_metrics["acc_unbiased"] if test_metrics else None}
            for metric, best in bests.items():
                value = val_metrics.get(metric) if val_metrics else None
                if value is not None and not math.isnan(value) and value >= best["value"]:  # ties: later epoch
                    bests[metric] = {"value": value, "epoch": epoch, "masks": masks}
            if epoch % settings.tau_period == 0:
                tau *= settings.tau_factor
                row["head_acc_refined"] = head_epochs(settings.head_refine_epochs, "fixed")
                gates.set_tau(tau)
            history.append(row)
            val_text = f"val {row['val_acc']:.3f} " if row["val_acc"] is not None else ""
            bar.advance_epoch(f"{val_text}sparsity {row['sparsity_units']:.2f} tau {tau:.2g}")
            if tau <= settings.tau_min:
                break

    last = gates.binary_masks()
    use_best = settings.selection == "best_val" and val is not None
    if settings.selection == "best_val" and val is None:
        log.warning("pruning.selection=best_val but the dataset has no validation split: using the last masks")
    best = bests[settings.selection_metric]
    alternatives = {m: {"epoch": b["epoch"], "masks": b["masks"]} for m, b in bests.items()
                    if m != settings.selection_metric and use_best}
    return SearchResult(masks=best["masks"] if use_best else last, last_masks=last,
                        best_epoch=best["epoch"] if use_best else len(history), history=history,
                        alternatives=alternatives,
                        head_state={k: v.cpu() for k, v in head.state_dict().items()},
                        pretrain_head_state=pretrain_head_state,
                        cached_features=use_cache, approximate_cache=approximate, settings=asdict(settings))


# --------------------------------------------------------------------------------------- bias leakage probe

def fresh_probe_leakage(model: nn.Module, train: Split, test: Split, num_bias: int, *, epochs: int = 20,
                        batch_size: int = 100, lr: float = 0.1, seed: int = 0, device="cpu") -> float:
    """Accuracy on `test` of a new linear bias probe trained on `train` bottleneck features of `model`."""
    z_train = predict(model, train, 500, device, features=True)["z"]
    z_test = predict(model, test, 500, device, features=True)["z"]
    head, opt = make_head(z_train.shape[1], num_bias, lr, 0.9, 1e-4, seed)
    head.to(device)
    train_head_on_features(head, opt, z_train, train.b, epochs, batch_size, torch.Generator().manual_seed(seed))
    return head_accuracy(head, z_test, test.b)


def head_leakage(head_state: dict, model: nn.Module, test: Split, device="cpu") -> float:
    """Accuracy of the search's own bias head on `test` bottleneck features of `model`."""
    weight = head_state["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(head_state)
    z = predict(model, test, 500, device, features=True)["z"]
    return head_accuracy(head.to(device), z, test.b)
