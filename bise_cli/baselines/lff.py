"""Learning from Failure (LfF; Nam, Cha, Ahn, Lee and Shin, "Learning from Failure: Training Debiased Classifier
from Biased Classifier", NeurIPS 2020): a baseline that needs no bias labels.

Two models of the same architecture train from scratch on the same batches:

- the *biased* model minimises the generalised cross-entropy GCE (Zhang and Sabuncu, NeurIPS 2018),
  (1 - p_y^q) / q with q = 0.7, which emphasises the samples it already finds easy and so amplifies the
  shortcut; LfF's code implements it as CE * stopgrad(p_y^q) * q, whose gradient is q times the formula's;
- the *debiased* model minimises CE weighted per sample by the relative difficulty
  w = L_b / (L_b + L_d), where L_b and L_d are per-sample exponential moving averages (alpha = 0.7) of the two
  models' CE, each divided by its maximum over the samples of the same class (LfF's code). Samples the
  biased model fails on (bias-conflicting ones) get weights near 1, the others near 0.

The debiased model is the result; its recipe (a `TrainRecipe`: optimiser, learning rate, epochs, batch size) is
the vanilla one, and both models' forward passes run inside the run's autocast context (`amp`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.core.precision import FP32, Autocast
from bise_cli.core.progress import progress_bar
from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import check_divergence, recipe_optimizer, recipe_scheduler

log = logging.getLogger(__name__)


def generalized_cross_entropy(logits: torch.Tensor, y: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Per-sample GCE as LfF's code computes it: CE * stopgrad(p_y)^q * q. Its gradient is
    q * grad((1 - p_y^q) / q) (since grad p_y^q / q = p_y^q grad log p_y); its value is not the formula's."""
    p_y = F.softmax(logits, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    return F.cross_entropy(logits, y, reduction="none") * p_y.detach() ** q * q


class SampleLossEMA:
    """Per-sample exponential moving average of a loss (LfF's EMA): the first update of a sample stores its
    loss, later ones blend alpha * old + (1 - alpha) * new."""

    def __init__(self, labels: torch.Tensor, num_classes: int, alpha: float = 0.7):
        self.labels, self.num_classes, self.alpha = labels, num_classes, alpha
        self.value = torch.zeros(len(labels), device=labels.device)
        self.updated = torch.zeros(len(labels), device=labels.device)

    def update(self, loss: torch.Tensor, index: torch.Tensor) -> None:
        self.value[index] = self.alpha * self.value[index] + (1 - self.alpha * self.updated[index]) * loss
        self.updated[index] = 1.0

    def class_max(self) -> torch.Tensor:
        """(num_classes,) maximum EMA over all samples of each class (samples not yet seen count as 0)."""
        out = torch.zeros(self.num_classes, device=self.value.device)
        return out.scatter_reduce(0, self.labels, self.value, reduce="amax", include_self=True)

    def normalized(self, index: torch.Tensor) -> torch.Tensor:
        """The EMA of the samples `index`, each divided by its class maximum."""
        # The floor only matters when a whole class has zero loss; LfF's code would divide by zero there.
        return self.value[index] / self.class_max()[self.labels[index]].clamp(min=1e-8)


def relative_difficulty(loss_b: torch.Tensor, loss_d: torch.Tensor) -> torch.Tensor:
    """LfF's sample weight w = L_b / (L_b + L_d) (the 1e-8 is LfF's code's)."""
    return loss_b / (loss_b + loss_d + 1e-8)


def train_lff(make_model, split: Split, recipe: TrainRecipe, *, q: float = 0.7, ema_alpha: float = 0.7,
              num_classes: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
              description: str = "lff", amp: Autocast = FP32) -> tuple[nn.Module, list[dict]]:
    """Train LfF's biased and debiased models from scratch on `split` (bias labels unused); returns the
    debiased model (eval mode) and one row per epoch: both losses, the mean and the spread of w, the lr.

    `make_model()` builds a fresh, untrained model; both models are initialised from `seed` without touching
    the global RNG. Batches follow the vanilla loop: shuffled by a generator seeded with `seed`, augmented when
    the split has an augmentation. Forward passes run inside `amp`; losses are computed on fp32 logits."""
    epochs, batch_size, lr = recipe.epochs, recipe.batch_size, recipe.lr
    if not 0 < q <= 1 or not 0 <= ema_alpha < 1:
        raise BiseError(f"{description}: need 0 < q <= 1 and 0 <= ema_alpha < 1 (got q={q}, ema_alpha={ema_alpha})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        biased, debiased = make_model().to(device), make_model().to(device)
    num_classes = num_classes or biased.classifier.out_features
    labels = split.y.long().to(device)
    ema_b = SampleLossEMA(labels, num_classes, ema_alpha)
    ema_d = SampleLossEMA(labels, num_classes, ema_alpha)
    steps = split.num_batches(batch_size)
    # AdamW gets named parameters so biases and norms skip weight decay, as in the vanilla loop (`fit`).
    opts = [recipe_optimizer(recipe, list(model.named_parameters()) if recipe.optimizer == "adamw"
                             else model.parameters()) for model in (biased, debiased)]
    scheds = [recipe_scheduler(recipe, opt, steps) for opt in opts]
    generator = torch.Generator().manual_seed(seed)
    history, start, first_loss = [], None, None
    log.info("%s: %d epochs of %d batches (%s, lr %g, q %g, ema %g, %s) on %s", description, epochs, steps,
             recipe.optimizer, lr, q, ema_alpha, amp.precision, device)
    with progress_bar(description, epochs, steps) as bar:
        for epoch in range(1, epochs + 1):
            biased.train()
            debiased.train()
            # Summed on the device; one host synchronisation per epoch.
            sums = torch.zeros(4, device=device)
            # The order is drawn on the CPU (the same batches on every device) and copied, without blocking, once
            # per epoch to where the split lives and to where the per-sample averages live.
            order = torch.randperm(len(split), generator=generator)
            on_split = order.to(split.x.device, non_blocking=True)
            on_device = on_split if on_split.device == labels.device else order.to(device, non_blocking=True)
            for rows, index in zip(on_split.split(batch_size), on_device.split(batch_size), strict=True):
                x = split.batch(rows, device, augment=True, generator=generator)[0]
                y = labels[index]
                with amp:
                    logits_b, logits_d = biased(x), debiased(x)
                # fp32 logits for the losses (a no-op in fp32: .float() of a float32 tensor is the tensor itself)
                logits_b, logits_d = logits_b.float(), logits_d.float()
                ce_d = F.cross_entropy(logits_d, y, reduction="none")
                ema_b.update(F.cross_entropy(logits_b, y, reduction="none").detach(), index)
                ema_d.update(ce_d.detach(), index)
                weight = relative_difficulty(ema_b.normalized(index), ema_d.normalized(index))
                loss_b = generalized_cross_entropy(logits_b, y, q).mean()
                loss_d = (ce_d * weight).mean()
                loss = loss_b + loss_d
                if first_loss is None:
                    first_loss = loss.detach()  # the divergence reference, read with the first epoch's sums
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()  # the two models share no parameter: each gets its own loss's gradient
                for opt, (sched, unit) in zip(opts, scheds, strict=True):
                    opt.step()
                    if sched is not None and unit == "step":
                        sched.step()
                sums += torch.stack([loss_b.detach() * len(y), loss_d.detach() * len(y), weight.sum(),
                                     (weight ** 2).sum()])
                bar.advance_batch()
            for sched, unit in scheds:
                if sched is not None and unit == "epoch":
                    sched.step()
            if start is None and first_loss is not None:
                *total, start = torch.cat([sums, first_loss.float().view(1)]).tolist()
            else:
                total = sums.tolist()
            n = len(split)
            mean_w = total[2] / n
            row = {"epoch": epoch, "loss_biased": total[0] / n, "loss_debiased": total[1] / n, "weight_mean": mean_w,
                   "weight_std": max(total[3] / n - mean_w ** 2, 0.0) ** 0.5, "lr": opts[1].param_groups[0]["lr"]}
            history.append(row)
            check_divergence(description, epoch, row["loss_biased"] + row["loss_debiased"], start, lr)
            bar.advance_epoch(f"loss_d {row['loss_debiased']:.4f} w {mean_w:.3f}")
    return debiased.eval(), history
