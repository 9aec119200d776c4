"""Epoch times of the paper recipe on this machine (SimpleConvNet width 1.0, batch 100), from measured slices.

Prints images/s for a vanilla SGD step, a BISE mask step (frozen model, gradients to gates only) and an eval
forward, then the extrapolated wall time of the paper's vanilla training (80 epochs x 60k) and BISE search
(100 mask epochs x 50k + per-epoch val/test evaluation + 11 feature passes for the cached bias head), and the
ratio BISE / vanilla.
"""

from __future__ import annotations

import time

import torch

from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import SearchSettings, run_search
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone
from bise_cli.models.masking import GateSet

from common import parse_args


def images_per_second(fn, n_images: int) -> float:
    start = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - start)


def random_split(n: int) -> Split:
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    return Split(x, y, y.clone(), lambda t: t.float().div(127.5).sub(1))


def main() -> None:
    args = parse_args(__doc__, width=(float, 1.0, "SimpleConvNet width"), batches=(int, 20, "batches to time"))
    n = args.batches * 100
    split = random_split(n)
    model = build_backbone("simple_convnet", 10, width=args.width)
    fit(model, random_split(200), TrainRecipe(epochs=1, batch_size=100), seed=0)  # warm-up
    train_ips = images_per_second(lambda: fit(model, split, TrainRecipe(epochs=1, batch_size=100), seed=0), n)
    freeze(model)
    eval_ips = images_per_second(lambda: predict(model, split, 500), n)
    gates = GateSet(model.gate_points()).attach(model)
    settings = SearchSettings(tau_period=1, tau_min=0.6, head_pretrain_epochs=0, head_refine_epochs=0,
                              track_test=False)
    # One mask epoch over `split` plus one feature pass (pre-training) and one after the tau drop.
    start = time.perf_counter()
    weights = sample_weights("nominal_rho", split.y, split.b, 10, 10, (0.99,))
    run_search(model, gates, split, None, None, num_classes=10, num_bias=10, weights=weights, settings=settings)
    search_seconds = time.perf_counter() - start
    mask_ips = n / (search_seconds - 2 * n / eval_ips)
    gates.detach()

    vanilla_h = 80 * 60_000 / train_ips / 3600
    bise_h = (100 * 50_000 / mask_ips + 100 * 20_000 / eval_ips + 11 * 50_000 / eval_ips) / 3600
    print(f"width {args.width}: train step {train_ips:.0f} img/s, BISE mask step {mask_ips:.0f} img/s, "
          f"eval {eval_ips:.0f} img/s")
    print(f"paper vanilla epoch (60k): {60_000 / train_ips / 60:.1f} min; 80 epochs: {vanilla_h:.1f} h")
    print(f"paper BISE mask epoch (50k): {50_000 / mask_ips / 60:.1f} min; whole search incl. eval and head "
          f"features: {bise_h:.1f} h")
    print(f"ratio BISE search / vanilla training: {bise_h / vanilla_h:.2f} (target <= 0.8)")


if __name__ == "__main__":
    main()
