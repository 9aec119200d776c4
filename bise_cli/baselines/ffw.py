"""The FFW baseline ("Debiasing Surgeon", ECCV 2024, and its official code): per-weight gates on a frozen model.

Every `.weight` of a conv or linear layer (BN excluded, the final classifier included) is multiplied by a gate
g = min(2 sigma(w / T), 1) of its own real parameter w; the backward pass uses the derivative of the unclamped
2 sigma(w / T) (straight-through for the clamp, as in FFW's code). The gates are attached with
`torch.func.functional_call`, so the model classes stay untouched and the model's own weights never change.

Search (on a small *unbiased* training split, FFW's protocol):
- per batch: the gates take an Adam step on alpha*CE(task) + gamma*MI(b, softmax(head(z))) over all samples
  (head weights detached there, so the MI gradient reaches the gates only); the linear bias head takes one SGD
  step on CE(head(stopgrad z), b), as in FFW's code;
- after every gate epoch and every temperature change the head is retrained to a plateau on cached bottleneck
  features. The model is frozen and in eval mode and the gates do not move meanwhile, so caching is exact;
- the temperature is multiplied by `t_factor` when the validation MI plateaus; the search stops when T < t_min
  or after `max_epochs`;
- selection ("best intermediate"): the binarised gates (keep w >= 0) whose fresh linear bias probe reaches the
  lowest bias accuracy on the validation split (ties: the later epoch).

Unstructured pruning keeps the dense shapes: the result is a model with zeroed weights, not a smaller model.

On a GPU no loop waits for the device per batch: the sums of a gate epoch, of a head epoch and of the validation
pass stay on the device and are read once per epoch (a non-finite objective is detected there, after the epoch);
cached features stay on the device.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.precision import FP32, Autocast
from bise_cli.core.progress import progress_bar
from bise_cli.data.base import Split
from bise_cli.method.probe import HeadOptimiser, head_accuracy, head_step, make_head
from bise_cli.method.search import normalized_mutual_information
from bise_cli.method.train import predict
from bise_cli.models.masking import capture_input

PROBE_SCHEDULES = ("epoch", "temperature_drop")


@dataclass
class FFWSettings(HeadOptimiser):
    """Every number of the FFW search; defaults are those of the official FFW code ("Debiasing Surgeon", ECCV 2024).

    gate_init = 0 (FFW's choice) gives g = 2 sigma(0) = 1 exactly, i.e. the full vanilla model at the start. It
    also sits on the pruning boundary (keep w >= 0): a gate whose first steps go negative is pruned at once.
    probe_at = "epoch" probes every epoch for the selection; "temperature_drop" only when T drops, which is
    what FFW's code does (it then falls back to the last gates if T never dropped).
    """

    alpha: float = 1.0
    gamma: float = 10.0
    gate_init: float = 0.0
    gate_lr: float = 1e-3
    gate_weight_decay: float = 1e-4
    t0: float = 1.0
    t_factor: float = 0.1
    t_patience: int = 5
    t_threshold: float = 5e-2
    t_min: float = 1e-8
    max_epochs: int = 200
    head_patience: int = 5
    head_tolerance: float = 1e-3
    head_max_epochs: int = 200
    batch_size: int = 100
    eval_batch_size: int = 500
    probe_at: str = "epoch"

    def validate(self) -> FFWSettings:
        """Raise BiseError (one line) for a value the search cannot run with; return self otherwise."""
        check_choice("ffw.probe_at", self.probe_at, PROBE_SCHEDULES)
        if self.alpha < 0 or self.gamma < 0:
            raise BiseError(f"ffw.alpha and ffw.gamma must be >= 0 (got alpha={self.alpha}, gamma={self.gamma})")
        if not 0 < self.t_factor < 1:
            raise BiseError(f"ffw.t_factor must be in (0, 1) so the temperature decreases (got {self.t_factor})")
        if not 0 < self.t_min < self.t0:
            raise BiseError(f"need 0 < ffw.t_min < ffw.t0 (got t_min={self.t_min}, t0={self.t0})")
        if not 0 <= self.t_threshold < 1 or not 0 <= self.head_tolerance < 1:
            raise BiseError("ffw.t_threshold and ffw.head_tolerance are relative and must be in [0, 1) "
                            f"(got {self.t_threshold}, {self.head_tolerance})")
        if self.t_patience < 0 or self.head_patience < 0:
            raise BiseError(f"ffw.t_patience and ffw.head_patience must be >= 0 (got {self.t_patience}, "
                            f"{self.head_patience})")
        if self.max_epochs < 1 or self.head_max_epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise BiseError("ffw.max_epochs, ffw.head_max_epochs, ffw.batch_size and ffw.eval_batch_size must be "
                            ">= 1")
        if self.gate_lr <= 0 or self.head_lr <= 0 or self.gate_weight_decay < 0 or self.head_weight_decay < 0:
            raise BiseError("ffw learning rates must be > 0 and weight decays >= 0 (got gate_lr="
                            f"{self.gate_lr}, head_lr={self.head_lr}, gate_weight_decay={self.gate_weight_decay}, "
                            f"head_weight_decay={self.head_weight_decay})")
        if not 0 <= self.head_momentum < 1:
            raise BiseError(f"ffw.head_momentum must be in [0, 1) (got {self.head_momentum})")
        if not math.isfinite(self.gate_init):
            raise BiseError(f"ffw.gate_init must be a finite number (got {self.gate_init})")
        return self


@dataclass
class FFWResult:
    """Selected and last binary weight masks ({param_name: BoolTensor}, True = kept) and the search history."""

    weight_masks: dict[str, torch.Tensor]
    last_masks: dict[str, torch.Tensor]
    best_epoch: int
    best_probe_acc: float
    history: list[dict]
    head_state: dict
    settings: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ gate

class TwoSigmoidGate(torch.autograd.Function):
    """Forward min(2 sigma(s), 1); backward the derivative of the unclamped 2 sigma(s), i.e. 2 sigma (1 - sigma)."""

    @staticmethod
    def forward(ctx, scaled: torch.Tensor) -> torch.Tensor:
        soft = torch.sigmoid(scaled)
        ctx.save_for_backward(soft)
        return torch.clamp(2 * soft, max=1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (soft,) = ctx.saved_tensors
        return grad_output * 2 * soft * (1 - soft)


def gate_value(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """g = min(2 sigma(w / T), 1), with the straight-through clamp (so dg/dw = 2 sigma'(w / T) / T)."""
    return TwoSigmoidGate.apply(logits / temperature)


def gated_weight_names(model: nn.Module) -> list[str]:
    """Names of the `.weight` parameters of every conv and linear layer (FFW's prunable weights; no BN)."""
    return [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.weight is not None]


class WeightGates(nn.Module):
    """One gate parameter per weight element of the named parameters; `hard` switches to the binary 1[w >= 0]."""

    def __init__(self, model: nn.Module, names: list[str], init: float = 0.0):
        super().__init__()
        params = dict(model.named_parameters())
        self.names = list(names)
        self.logits = nn.ParameterList([nn.Parameter(torch.full_like(params[n], float(init))) for n in names])
        self.temperature = 1.0
        self.hard = False

    def values(self) -> dict[str, torch.Tensor]:
        """The multiplier of every gated weight in the current mode."""
        if self.hard:
            return {n: (w.detach() >= 0).to(w.dtype) for n, w in zip(self.names, self.logits, strict=True)}
        return {n: gate_value(w, self.temperature) for n, w in zip(self.names, self.logits, strict=True)}

    def binary_masks(self) -> dict[str, torch.Tensor]:
        """Keep where the gate parameter is >= 0 (where the gate is 1 at any temperature), as CPU bool tensors
        (copied in one transfer)."""
        flat = torch.cat([(w.detach() >= 0).reshape(-1) for w in self.logits]).cpu()
        parts = flat.split([w.numel() for w in self.logits])
        return {n: part.view(w.shape) for n, w, part in zip(self.names, self.logits, parts, strict=True)}

    @contextmanager
    def hard_mode(self):
        """Within the block the gates are the binary 1[w >= 0]: the pruned model, run without copying it."""
        previous, self.hard = self.hard, True
        try:
            yield self
        finally:
            self.hard = previous


class GatedModel(nn.Module):
    """`model` run with each gated weight replaced by weight * gate (functional_call: the model is not edited)."""

    def __init__(self, model: nn.Module, gates: WeightGates):
        super().__init__()
        self.model = model
        self.gates = gates

    @property
    def classifier(self) -> nn.Module:
        # predict() and capture_input() read the bottleneck at the input of the classifier.
        return self.model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        gated = {name: params[name] * gate for name, gate in self.gates.values().items()}
        return functional_call(self.model, gated, (x,))


# ------------------------------------------------------------------------------------------- pruned model

def apply_weight_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `model` with the weights where `masks` is False set to zero.

    Unstructured pruning: the dense tensor shapes stay, so parameter counts and MACs are unchanged (only the
    number of non-zero weights drops)."""
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
    return pruned


def weight_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of the gated weights that are pruned (False in `masks`)."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


# -------------------------------------------------------------------------------------------------- plateau

class Plateau:
    """FFW's plateau detector (relative threshold, lower is better).

    A value improves if it is below (1 - threshold) * best; otherwise it is a bad epoch, and so is every value once
    the best is negative (as in FFW: a plug-in MI of ~0 can come out as -1e-10, and a relative threshold means
    nothing there). `step` returns True when more than `patience` bad epochs have accumulated, then restarts the
    count (the best value is kept)."""

    def __init__(self, patience: int, threshold: float):
        self.patience, self.threshold = patience, threshold
        self.best = math.inf
        self.bad = 0

    def step(self, value: float) -> bool:
        if self.best == math.inf or (self.best >= 0 and value < (1 - self.threshold) * self.best):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            self.bad = 0
            return True
        return False


# ------------------------------------------------------------------------------------------------ bias head

def train_head_to_plateau(head: nn.Linear, opt: torch.optim.Optimizer, z: torch.Tensor, b: torch.Tensor, *,
                          batch_size: int, patience: int, tolerance: float, max_epochs: int,
                          generator: torch.Generator) -> int:
    """Head epochs on cached features until the mean training loss plateaus; returns the epochs run. Features
    and labels are copied to the head's device once; each epoch reads its loss sum once (the plateau test)."""
    device = head.weight.device
    z, b = (t.to(device, non_blocking=t.device.type == "cpu") for t in (z, b))
    plateau = Plateau(patience, tolerance)
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(b), generator=generator).to(device, non_blocking=True)
        total = torch.zeros((), dtype=torch.float64, device=device)  # float64 like the Python sum it replaces
        for start in range(0, len(b), batch_size):
            idx = order[start:start + batch_size]
            total += head_step(head, opt, z[idx], b[idx]).double() * len(idx)
        if plateau.step(float(total) / max(len(b), 1)):
            return epoch
    return max_epochs


def _head_optimizer(head: nn.Linear, settings: FFWSettings) -> torch.optim.Optimizer:
    """The head's SGD (FFW: lr 0.1, momentum 0.9, weight decay 1e-4)."""
    return torch.optim.SGD(head.parameters(), lr=settings.head_lr, momentum=settings.head_momentum,
                           weight_decay=settings.head_weight_decay)


def _refine_head(head, opt, gated: GatedModel, train: Split, settings: FFWSettings, generator, device) -> None:
    """Retrain the head to a plateau on the current gated model's (cached) training features."""
    z = predict(gated, train, settings.eval_batch_size, device, features=True, host=False)["z"]
    train_head_to_plateau(head, opt, z, train.b, batch_size=settings.batch_size, patience=settings.head_patience,
                          tolerance=settings.head_tolerance, max_epochs=settings.head_max_epochs,
                          generator=generator)


def fresh_probe_accuracy(gated: GatedModel, train: Split, val: Split, num_bias: int, settings: FFWSettings,
                         seed: int, device) -> float:
    """Bias accuracy on `val` of a new linear probe trained to a plateau on `train` features of the binarised model."""
    with gated.gates.hard_mode():
        z_train = predict(gated, train, settings.eval_batch_size, device, features=True, host=False)["z"]
        z_val = predict(gated, val, settings.eval_batch_size, device, features=True, host=False)["z"]
    # Same seed every epoch: the probe's init and batch order are fixed, only the features differ.
    probe, _ = make_head(z_train.shape[1], num_bias, settings.head_lr, settings.head_momentum,
                         settings.head_weight_decay, seed)
    probe.to(device, non_blocking=True)  # a new CPU head: copied without waiting
    train_head_to_plateau(probe, _head_optimizer(probe, settings), z_train, train.b,
                          batch_size=settings.batch_size, patience=settings.head_patience,
                          tolerance=settings.head_tolerance, max_epochs=settings.head_max_epochs,
                          generator=torch.Generator().manual_seed(seed))
    return head_accuracy(probe, z_val, val.b)


@torch.no_grad()
def validation_mi(gated: GatedModel, head: nn.Linear, val: Split, num_bias: int, batch_size: int,
                  device) -> tuple[float, float]:
    """(mean per-batch normalised MI between b and the head's softmax, task accuracy) of the gated model on `val`.

    Per-batch MI averaged over batches, like FFW's validation meter (the plug-in estimate depends on batch size).
    Summed on the device (float64) and read once."""
    sums, batches = torch.zeros(2, dtype=torch.float64, device=device), 0  # MI sum, hits
    with capture_input(gated.classifier) as tap:
        for x, y, b in val.batches(batch_size, device=device):
            logits = gated(x)
            q = F.softmax(head(tap["z"]), dim=1)
            sums += torch.stack([normalized_mutual_information(b, q, num_bias).double(),
                                 (logits.argmax(1) == y).sum().double()])
            batches += 1
    mi_sum, hits = sums.tolist()
    return mi_sum / batches, int(hits) / len(val)


# --------------------------------------------------------------------------------------------------- search

def _gate_epoch(gated: GatedModel, head: nn.Linear, head_opt, gate_opt, train: Split, num_bias: int,
                settings: FFWSettings, generator, device, bar, epoch: int, amp: Autocast = FP32) -> dict:
    """One pass over `train`: a gate step on alpha*CE + gamma*MI and a head step on CE(head(stopgrad z), b).
    The sums (float64) stay on the device and are read once, after the last batch; a non-finite objective fails
    the search then (the official code stops at once; here the rest of the epoch runs first)."""
    # loss, ce, mi (each x batch size), hits, non-finite batches, the last non-finite objective
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    n = 0
    with capture_input(gated.classifier) as tap:
        for x, y, b in train.batches(settings.batch_size, shuffle=True, generator=generator, device=device):
            with amp:  # the run's autocast; the losses read fp32 (a no-op in fp32)
                logits = gated(x).float()
            z = tap["z"].float()
            ce = F.cross_entropy(logits, y)
            # Head weights detached: the MI gradient reaches the gates only (FFW zeroes the head's MI gradient).
            q = F.softmax(F.linear(z, head.weight.detach(), head.bias.detach()), dim=1)
            mi = normalized_mutual_information(b, q, num_bias)
            objective = settings.alpha * ce + settings.gamma * mi
            finite = torch.isfinite(objective.detach())
            gate_opt.zero_grad(set_to_none=True)
            objective.backward()
            head_loss = F.cross_entropy(head(z.detach()), b)
            head_opt.zero_grad(set_to_none=True)
            head_loss.backward()
            gate_opt.step()
            head_opt.step()
            batch = torch.stack([objective.detach(), ce.detach(), mi.detach()]).double() * len(y)
            batch = torch.cat([batch, (logits.argmax(1) == y).sum().double().view(1)])
            sums[:4] += torch.where(finite, batch, torch.zeros_like(batch))
            sums[4] += ~finite
            sums[5] = torch.where(finite, sums[5], objective.detach().double())
            n += len(y)
            bar.advance_batch()
    loss, ce, mi, hits, nonfinite, bad = sums.tolist()
    if nonfinite:
        raise BiseError(f"the FFW objective became {bad} at epoch {epoch}; lower ffw.gate_lr or ffw.gamma")
    n = max(n, 1)
    return {"loss": loss / n, "ce": ce / n, "mi": mi / n, "train_acc": hits / n}


def run_ffw(model: nn.Module, train: Split, val: Split, *, num_bias: int, settings: FFWSettings, device="cpu",
            seed: int = 0, amp: Autocast = FP32) -> FFWResult:
    """FFW search on a frozen `model` (already on `device`): returns the selected weight masks and the history.

    `train` is FFW's small unbiased training split, `val` the unbiased validation split (MI plateau and selection).
    The model's parameters must not require grad; they are never modified. The gate steps' forward passes run
    inside `amp` (the run's autocast); the plateau, MI and probe measurements stay fp32."""
    settings.validate()
    if num_bias < 2:
        raise BiseError(f"FFW needs at least 2 bias classes (got num_bias={num_bias})")
    if len(train) == 0 or len(val) == 0:
        raise BiseError("FFW needs non-empty train and validation splits")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("run_ffw expects a frozen model (every parameter requires_grad=False)")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    gates = WeightGates(model, gated_weight_names(model), settings.gate_init).to(device)
    gates.temperature = settings.t0
    gated = GatedModel(model, gates).eval()

    head, head_opt = make_head(model.classifier.in_features, num_bias, settings.head_lr, settings.head_momentum,
                               settings.head_weight_decay, seed)
    head.to(device, non_blocking=True)  # a new CPU head: copied without waiting
    # The head is first trained to a plateau on the vanilla model (gates at init); FFW then continues with a
    # copy of it and a new optimiser, so the momentum restarts.
    _refine_head(head, head_opt, gated, train, settings, generator, device)
    head_opt = _head_optimizer(head, settings)
    gate_opt = torch.optim.Adam(gates.parameters(), lr=settings.gate_lr, weight_decay=settings.gate_weight_decay)

    schedule = Plateau(settings.t_patience, settings.t_threshold)
    history: list[dict] = []
    best = {"acc": math.inf, "epoch": 0, "masks": gates.binary_masks()}
    probe_seed = seed + 1
    with progress_bar("FFW search", settings.max_epochs, train.num_batches(settings.batch_size)) as bar:
        for epoch in range(1, settings.max_epochs + 1):
            row = {"epoch": epoch, "T": gates.temperature}
            row.update(_gate_epoch(gated, head, head_opt, gate_opt, train, num_bias, settings, generator, device,
                                   bar, epoch, amp))
            _refine_head(head, head_opt, gated, train, settings, generator, device)
            row["val_mi"], row["val_acc"] = validation_mi(gated, head, val, num_bias, settings.batch_size, device)
            dropped = schedule.step(row["val_mi"])
            masks = gates.binary_masks()
            row["sparsity_weights"] = weight_sparsity(masks)
            row["probe_acc"] = None
            if settings.probe_at == "epoch" or dropped:
                row["probe_acc"] = fresh_probe_accuracy(gated, train, val, num_bias, settings, probe_seed, device)
                if row["probe_acc"] <= best["acc"]:  # ties: the later epoch
                    best = {"acc": row["probe_acc"], "epoch": epoch, "masks": masks}
            row["t_dropped"] = dropped
            history.append(row)
            probe_text = f"probe {row['probe_acc']:.3f} " if row["probe_acc"] is not None else ""
            bar.advance_epoch(f"val MI {row['val_mi']:.4f} {probe_text}sparsity {row['sparsity_weights']:.3f} "
                              f"T {gates.temperature:.2g}")
            if dropped:
                gates.temperature *= settings.t_factor
                if gates.temperature < settings.t_min:
                    break
                # The gate values depend on T, so the features change: the head adapts to the new model.
                _refine_head(head, head_opt, gated, train, settings, generator, device)

    last = gates.binary_masks()
    if best["epoch"] == 0:  # probe_at="temperature_drop" and T never dropped: FFW keeps the last gates
        best = {"acc": math.nan, "epoch": len(history), "masks": last}
    return FFWResult(weight_masks=best["masks"], last_masks=last, best_epoch=best["epoch"],
                     best_probe_acc=best["acc"], history=history,
                     head_state={k: v.detach().cpu() for k, v in head.state_dict().items()},
                     settings=asdict(settings))
