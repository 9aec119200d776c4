"""SoftCon and BiasCon + BiasBal (Hong and Yang, "Unbiased Classification Through Bias-Contrastive and
Bias-Balanced Learning", NeurIPS 2021), two baselines trained from scratch, in the order of the authors' code
(github.com/grayhong/bias-contrastive-learning: `train_biased_mnist_bc.py --bb 1`, `train_biased_mnist_softcon.py`).

Every step draws two batches from the training split:

- a plain batch of `batch_size` samples (shuffled, no augmentation, the last incomplete batch dropped) for the
  cross-entropy, whose logits BiasBal shifts by the class-given-bias prior: logits + log(P(y | b) + 1e-9);
- a contrastive batch of `contrastive_batch_size` samples drawn with replacement by per-sample weights (clipped at
  `ratio` times their minimum), each seen twice (two views, augmented independently when the split has a
  training augmentation). Its L2-normalised bottleneck features enter the bias-contrastive loss below.

The step's loss is `ce_weight * CE + contrastive`, minimised with Adam (L2 weight decay on every parameter) and the
learning rate divided by 10 at a third and at two thirds of the epochs.

BiasCon's positives are the pairs of the same class and a *different* bias label (so the two views of one sample
are not positives); its sampler weights are 1 / P(b | y). SoftCon needs no bias labels: a bias-capturing model's
normalised features f give every same-class pair the soft weight 1 - cos(f_i, f_j), and its sampler weights are
each sample's sum of 1 - cos over up to 1024 random references of its class. Several bias attributes count as
one joint bias label (two samples differ in bias when any attribute differs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bise_cli.core.errors import BiseError
from bise_cli.core.precision import FP32, Autocast
from bise_cli.core.progress import progress_bar
from bise_cli.data.base import Split, bias_columns
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import check_divergence, recipe_optimizer, recipe_scheduler
from bise_cli.models.masking import capture_input

log = logging.getLogger(__name__)

PRIOR_FLOOR = 1e-9     # the authors' min_prob in log(P(y | b) + min_prob)
SOFTCON_REFERENCES = 1024  # references per class for SoftCon's sampler weights (the authors' N_ref)


# ------------------------------------------------------------------------------------------------------- losses

def bias_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, pair_weights: torch.Tensor,
                          temperature: float = 0.07) -> torch.Tensor:
    """The authors' DebiasSupConLoss (contrast mode "all"). `features` (B, V, D) are L2-normalised views,
    `labels` (B,) the classes and `pair_weights` (B, B) a weight per sample pair. With the B*V views as anchors
    a and every other view k != a as contrast, the positives P(a) are the views of the same class, each weighted
    by w(a, p) = pair_weights[sample(a), sample(p)]:

        loss = mean_a  -sum_{p != a} w(a, p) log( exp(s_ap / T) / (sum_{k != a} exp(s_ak / T) + 1e-9) )
                       / max(sum_{p != a} w(a, p), 1 if that sum is 0)

    where s is the dot product (the row maximum is subtracted first, as in the authors' code, which only moves
    the 1e-9). An anchor without positives counts as 0 in the mean."""
    batch, views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)            # (V*B, D): view 0 of all, then view 1
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same_class = (labels.view(-1, 1) == labels.view(1, -1)).to(pair_weights.dtype)
    mask = (same_class * pair_weights).repeat(views, views)
    not_self = 1.0 - torch.eye(batch * views, device=features.device, dtype=mask.dtype)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-9)
    positives = mask.sum(1)
    positives = torch.where(positives == 0, torch.ones_like(positives), positives)
    return (-(mask * log_prob).sum(1) / positives).mean()


def biascon_pair_weights(bias: torch.Tensor) -> torch.Tensor:
    """BiasCon's hard pair weights: 1 where the two samples' (joint) bias labels differ, else 0."""
    return (bias.view(-1, 1) != bias.view(1, -1)).float()


def softcon_pair_weights(bias_features: torch.Tensor) -> torch.Tensor:
    """SoftCon's soft pair weights: 1 - cos(f_i, f_j) of the bias-capturing model's features."""
    normed = F.normalize(bias_features.float(), dim=1)
    return 1.0 - normed @ normed.T


def class_given_bias_prior(y: torch.Tensor, bias: torch.Tensor, num_classes: int, num_bias: int) -> torch.Tensor:
    """(num_bias, num_classes) P(y | b) counted on the training split (the authors' normalised confusion
    matrix); a bias value no sample has gets a zero row (it is never looked up)."""
    counts = torch.zeros(num_bias, num_classes)
    counts.index_put_((bias.long().cpu(), y.long().cpu()), torch.ones(len(y)), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def bias_balanced_logits(logits: torch.Tensor, bias: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """BiasBal: logits + log(P(y | b) + 1e-9), the row of the prior for each sample's bias label (training only;
    the model is evaluated on its plain logits)."""
    return logits + torch.log(prior[bias] + PRIOR_FLOOR)


def joint_bias(b: torch.Tensor, num_bias: int) -> torch.Tensor:
    """(N,) or (N, A) bias labels -> (N,) one joint label in [0, num_bias**A)."""
    joint = torch.zeros_like(bias_columns(b)[0], dtype=torch.long)
    for column in bias_columns(b):
        joint = joint * num_bias + column.long()
    return joint


# ------------------------------------------------------------------------------------------- sampler weights

def clip_ratio(weights: torch.Tensor, ratio: float) -> torch.Tensor:
    """The authors' clip_max_ratio: weights capped at `ratio` times their minimum (0 = no cap)."""
    return weights.clamp(max=float(weights.min()) * ratio) if ratio > 0 else weights


def biascon_sampler_weights(y: torch.Tensor, bias: torch.Tensor, num_classes: int, num_bias: int) -> torch.Tensor:
    """1 / P(b | y) per sample (the authors' given_y weights, before clipping)."""
    counts = torch.zeros(num_classes, num_bias)
    counts.index_put_((y.long().cpu(), bias.long().cpu()), torch.ones(len(y)), accumulate=True)
    p_b_given_y = counts / counts.sum(1, keepdim=True)
    return 1.0 / p_b_given_y[y.long().cpu(), bias.long().cpu()]


def softcon_sampler_weights(bias_features: torch.Tensor, y: torch.Tensor, num_classes: int,
                            generator: torch.Generator, references: int = SOFTCON_REFERENCES) -> torch.Tensor:
    """Each sample's sum of 1 - cos(f_i, f_r) over up to `references` samples r of its class, drawn without
    replacement (the authors' get_marginal; they draw exactly 1024, which needs classes that large)."""
    normed = F.normalize(bias_features.float().cpu(), dim=1)
    y = y.long().cpu()
    marginal = torch.zeros(len(y))
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) == 0:
            continue
        chosen = members[torch.randperm(len(members), generator=generator)[:references]]
        marginal[members] = (1.0 - normed[members] @ normed[chosen].T).sum(1)
    return marginal


# ------------------------------------------------------------------------------------------------- training

def contrastive_recipe(options: dict, name: str) -> TrainRecipe:
    """The training recipe of a contrastive baseline's section `options` (called `name` in errors): the authors'
    Adam (no momentum term) with a multistep schedule, `milestones: auto` = `default_milestones(epochs)`."""
    epochs = options.get("epochs")
    milestones = options.get("milestones")
    if milestones == "auto":
        milestones = default_milestones(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else []
    return TrainRecipe.from_section(options, name, optimizer="adam", momentum=0.0, scheduler="multistep",
                                    milestones=milestones)


def train_contrastive(model: nn.Module, split: Split, recipe: TrainRecipe, *,
                      pair_weights: Callable[[torch.Tensor], torch.Tensor], sampler_weights: torch.Tensor,
                      contrastive_batch_size: int, ce_weight: float, temperature: float, ratio: float,
                      prior: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      device: str | torch.device = "cpu", seed: int = 0, amp: Autocast = FP32,
                      description: str = "contrastive", after_epoch: Callable[[int], None] | None = None) -> list[dict]:
    """Train `model` (fresh) on `split` with `ce_weight * CE + bias-contrastive loss`; returns one row per epoch
    (ce, contrastive and total loss, lr).

    `pair_weights(index)` gives the (B, B) weights of the contrastive batch `index` (rows of `split`);
    `sampler_weights` (N,) draw the contrastive batches (clipped by `ratio`); `prior` (K, C) with `bias` (N,) joint
    labels turns on BiasBal's logit adjustment of the cross-entropy. `recipe` (`contrastive_recipe`) gives the
    optimiser, schedule and budget; forward passes run inside `amp`."""
    epochs, batch_size, lr = recipe.epochs, recipe.batch_size, recipe.lr
    if contrastive_batch_size < 1:
        raise BiseError(f"{description}: the contrastive batch size must be >= 1 (got {contrastive_batch_size})")
    n = len(split)
    steps = max(1, n // batch_size)  # the authors drop the last incomplete batch (one batch if the split is smaller)
    draw = clip_ratio(sampler_weights.double().cpu(), ratio)
    opt = recipe_optimizer(recipe, model.parameters())
    sched, _ = recipe_scheduler(recipe, opt, steps)
    generator = torch.Generator().manual_seed(seed)
    labels = split.y.long()
    bias_on_device = bias.to(device) if bias is not None else None
    prior = prior.to(device) if prior is not None else None
    history, start = [], None
    log.info("%s: %d epochs of %d steps (batch %d + 2 x %d, lr %g, ce weight %g, T %g) on %s", description, epochs,
             steps, batch_size, contrastive_batch_size, lr, ce_weight, temperature, device)
    with progress_bar(description, epochs, steps) as bar, capture_input(model.classifier) as tap:
        for epoch in range(1, epochs + 1):
            model.train()
            sums = torch.zeros(3, device=device)
            order = torch.randperm(n, generator=generator)
            for step in range(steps):
                rows = order[step * batch_size:(step + 1) * batch_size]
                x, y, _ = split.batch(rows, device)
                with amp:
                    logits = model(x).float()
                if prior is not None:
                    logits = bias_balanced_logits(logits, bias_on_device[rows.to(device)], prior)
                ce = F.cross_entropy(logits, y)
                index = torch.multinomial(draw, contrastive_batch_size, replacement=True, generator=generator)
                views = [split.batch(index, device, augment=True, generator=generator)[0] for _ in range(2)]
                with amp:
                    model(torch.cat(views))
                z = F.normalize(tap["z"].float(), dim=1)
                features = torch.stack(z.split(contrastive_batch_size), dim=1)    # (B, 2, D)
                con = bias_contrastive_loss(features, labels[index].to(device), pair_weights(index).to(device),
                                            temperature)
                loss = ce_weight * ce + con
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.stack([ce.detach(), con.detach(), loss.detach()])
                bar.advance_batch()
            if sched is not None:
                sched.step()
            ce_mean, con_mean, total = (value / steps for value in sums.tolist())
            start = total if start is None else start
            row = {"epoch": epoch, "loss_ce": ce_mean, "loss_contrastive": con_mean, "loss": total,
                   "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            check_divergence(description, epoch, total, start, lr)
            bar.advance_epoch(f"ce {ce_mean:.4f} con {con_mean:.4f}")
            if after_epoch is not None:
                after_epoch(epoch)
    model.eval()
    return history


def default_milestones(epochs: int) -> list[int]:
    """The authors' schedule: the learning rate divided by 10 after a third and after two thirds of the epochs.
    Below 3 epochs their formula gives a milestone 0, which MultiStepLR applies before the first step (1 epoch:
    lr / 100 throughout); such milestones are dropped, so a short run trains at the configured rate."""
    return [m for m in (epochs // 3, epochs * 2 // 3) if m > 0]
