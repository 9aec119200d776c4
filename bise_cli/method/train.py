"""Training and prediction loops shared by vanilla training, fine-tuning and the baselines.

`fit` trains every parameter that requires grad with a (optionally per-sample weighted) cross-entropy; the
weights come from a function of (y, b), which is how BISE+FT and the reweighted-FT control reuse the loop.
`predict` returns predictions (and optionally bottleneck features) for a whole split in eval mode.

`fit` takes a `TrainRecipe` (bise_cli.method.recipe) and both take the run's `Autocast` context `amp` (fp32, the
default, is a null context; bf16: forward passes under autocast, losses and their sums in fp32; see
bise_cli.core.precision). Batches come from `Split.batches(device=...)`: a split moved to the device once
(`Split.to(device)`) yields batches already there, and neither loop synchronises with the host per batch: `fit`
reads the device once per epoch (the epoch loss, and with it the first batch's loss that divergence is judged
against), `predict` once per call (features: twice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.precision import FP32, Autocast
from bise_cli.core.progress import progress_bar
from bise_cli.data.base import Split
from bise_cli.method.recipe import OPTIMIZERS, SCHEDULERS, TrainRecipe
from bise_cli.models.masking import capture_input

log = logging.getLogger(__name__)

SampleWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW. For AdamW, biases and norm weights get no weight decay (BERT recipe)."""
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps)
    params = list(params)
    named = [p for p in params if isinstance(p, tuple)]
    if named:
        decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n or "norm" in n.lower())]
        no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n or "norm" in n.lower()]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, eps=eps)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                   milestones: list[int] | None = None, gamma: float = 0.1):
    """Learning-rate schedule; returns (scheduler or None, "epoch" | "step": when to call scheduler.step())."""
    check_choice("scheduler", name, SCHEDULERS)
    if name == "none":
        return None, "epoch"
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones or []), gamma=gamma), "epoch"
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs)), "epoch"
    total = max(1, epochs * steps_per_epoch)
    # Linear decay to zero without warm-up (the CivilComments/BERT recipe of the official BISE code).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total)), "step"


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(1/B) sum_j w_j CE_j: normalised by the batch size, not by the sum of weights (as in the official BISE code)."""
    losses = F.cross_entropy(logits, y, reduction="none")
    if weights is not None:
        losses = losses * weights
    return losses.mean()


# An epoch loss this many times the starting loss (or than 1, if larger) means the optimisation diverged.
DIVERGENCE_FACTOR = 100.0


def check_divergence(description: str, epoch: int, loss: float, start: float, lr: float) -> None:
    """Fail the stage (nothing gets cached) when the epoch loss is not finite or exploded against the loss of
    the model it started from (the first batch's, before any step)."""
    if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(start, 1.0):
        raise BiseError(f"{description} diverged: epoch {epoch} loss {loss:.3g} (at the start: {start:.3g}); "
                        f"lower the learning rate (got lr={lr:g})")


def recipe_optimizer(recipe: TrainRecipe, params) -> torch.optim.Optimizer:
    """The optimiser `recipe` names over `params` (named parameters for AdamW, so biases and norms skip decay)."""
    return make_optimizer(recipe.optimizer, params, recipe.lr, recipe.momentum, recipe.weight_decay)


def model_optimizer(recipe: TrainRecipe, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser `recipe` names over `model`'s trainable parameters (named ones for AdamW)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return recipe_optimizer(recipe, named if recipe.optimizer == "adamw" else [p for _, p in named])


def recipe_scheduler(recipe: TrainRecipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """`make_scheduler` for `recipe`'s schedule: (scheduler or None, "epoch" | "step")."""
    return make_scheduler(recipe.scheduler, optimizer, recipe.epochs, steps_per_epoch, list(recipe.milestones),
                          recipe.gamma)


def fit(model: nn.Module, split: Split, recipe: TrainRecipe, *, sample_weights: SampleWeights | None = None,
        device: str | torch.device = "cpu", seed: int = 0, description: str = "train",
        after_epoch: Callable[[int], None] | None = None, amp: Autocast = FP32) -> list[dict]:
    """Train `model`'s trainable parameters on `split` with `recipe` and return one {epoch, loss, lr} row per
    epoch. Forward passes run inside `amp` (the run's autocast); the loss is computed on fp32 logits."""
    epochs, batch_size, lr = recipe.epochs, recipe.batch_size, recipe.lr
    opt = model_optimizer(recipe, model)
    sched, sched_unit = recipe_scheduler(recipe, opt, split.num_batches(batch_size))
    generator = torch.Generator().manual_seed(seed)
    history, start, first_loss = [], None, None
    log.info("%s: %d epochs of %d batches (%s, lr %g, %s) on %s", description, epochs,
             split.num_batches(batch_size), recipe.optimizer, lr, amp.precision, device)
    with progress_bar(description, epochs, split.num_batches(batch_size)) as bar:
        for epoch in range(1, epochs + 1):
            model.train()
            # Summed on the device: no host synchronisation per batch (checked once per epoch).
            total, count = torch.zeros((), device=device), 0
            for x, y, b in split.batches(batch_size, shuffle=True, generator=generator, device=device, augment=True):
                weights = sample_weights(y, b) if sample_weights is not None else None
                with amp:
                    logits = model(x)
                loss = weighted_cross_entropy(logits.float(), y, weights)
                if first_loss is None:
                    first_loss = loss.detach()  # the reference for check_divergence, read with the first epoch's sum
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None and sched_unit == "step":
                    sched.step()
                total += loss.detach() * len(y)
                count += len(y)
                bar.advance_batch()
            if sched is not None and sched_unit == "epoch":
                sched.step()
            if start is None and first_loss is not None:
                total, start = torch.stack([total, first_loss.float()]).tolist()  # the epoch's one read
            row = {"epoch": epoch, "loss": float(total) / max(count, 1), "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            check_divergence(description, epoch, row["loss"], start, lr)
            bar.advance_epoch(f"loss {row['loss']:.4f}")
            if after_epoch is not None:
                after_epoch(epoch)
    model.eval()
    return history


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` on the CPU with one device-to-host copy per dtype family: the integer ones travel packed into
    one int64 tensor, the floating ones into one float32 tensor (each copy makes the host wait once)."""
    out = {k: t for k, t in tensors.items() if t.device.type == "cpu"}
    for family, dtype in ((False, torch.int64), (True, torch.float32)):
        moving = {k: t for k, t in tensors.items() if t.device.type != "cpu" and t.is_floating_point() == family}
        if not moving:
            continue
        flat = torch.cat([t.reshape(-1).to(dtype) for t in moving.values()]).cpu()
        for (k, t), part in zip(moving.items(), flat.split([t.numel() for t in moving.values()]), strict=True):
            out[k] = part.view(t.shape).to(t.dtype)
    return {k: out[k] for k in tensors}


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 256, device: str | torch.device = "cpu",
            features: bool = False, amp: Autocast = FP32, host: bool = True) -> dict[str, torch.Tensor]:
    """Eval-mode predictions for a whole split: {"pred", "y", "b"} and, with features=True, the bottleneck "z"
    (always fp32). Results come back on the CPU, copied once at the end (no per-batch host synchronisation;
    `to_host`); host=False leaves them where they were computed (no synchronisation at all), for callers that
    keep working on the device (bias-head epochs on cached features)."""
    was_training = model.training
    model.eval()
    preds, zs = [], []
    with capture_input(model.classifier) as tap:
        for x, _, _ in split.batches(batch_size, device=device):
            with amp:
                logits = model(x)
            preds.append(logits.argmax(1))
            if features:
                zs.append(tap["z"].detach().float())
    model.train(was_training)
    out = {"pred": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), "y": split.y, "b": split.b}
    if features:
        out["z"] = torch.cat(zs) if zs else torch.zeros(0)
    return to_host(out) if host else out


def freeze(model: nn.Module) -> nn.Module:
    """Switch off gradients for every parameter and put the model in eval mode (BISE's frozen backbone)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()

