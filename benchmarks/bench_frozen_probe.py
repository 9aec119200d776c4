"""The cost of the dead-unit probe of `pruning.stop_when_frozen` (bise_cli.method.frozen): the search
with and without it.

Every mask epoch of a search the dead-unit branch may serve records each gate's per-unit max |h| and compares
the hard masks after every step with the epoch's first (a few small device ops per batch). This times the same
BISE search (the Multi-Color MNIST MLP on the embedded 5k digits by default, trained briefly, the paper's
temperature schedule compressed with `--tau-period`, the stop off so both do the same epochs) with the probe and
with the branch switched off, alternated `--repeats` times in one process, and checks that the two give the
same history and masks. Prints the median seconds of each and their ratio.

    PYTHONPATH=. python benchmarks/bench_frozen_probe.py [--source embedded] [--tau-period 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bise_cli.method.search as search_module
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import SearchSettings, run_search
from bise_cli.method.train import fit, freeze
from bise_cli.models import build_backbone
from bise_cli.models.masking import GateSet
from bise_cli.run import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="embedded", help="dataset.source of multicolor_mnist")
    parser.add_argument("--root", default="datasets/mnist", help="dataset.root (the MNIST files)")
    parser.add_argument("--tau-period", type=int, default=1, help="epochs per temperature halving (paper: 10)")
    parser.add_argument("--epochs", type=int, default=5, help="vanilla epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {"dataset": {"name": "multicolor_mnist", "source": args.source, "root": args.root, "max_samples": None,
                       "fallback": "embedded", "rho_left": 0.99, "rho_right": 0.95, "severity": 4,
                       "val_holdout": 0, "label_noise": 0.0}, "rho": 0.99, "seed": 0}
    bundle = pipeline.load_data(cfg)
    torch.manual_seed(0)
    model = build_backbone("mlp", 10)
    fit(model, bundle["train"], TrainRecipe(epochs=args.epochs, batch_size=256, optimizer="adam", lr=1e-3), seed=0)
    freeze(model)
    search = bundle["search"]
    weights = sample_weights("inverse_rho", search.y, search.b, 10, 10, bundle.nominal_rho)
    settings = SearchSettings(batch_size=256, tau_period=args.tau_period, head_pretrain_epochs=2,
                              head_refine_epochs=2, selection="last", stop_when_frozen=False)
    refusal = search_module.dead_unit_refusal
    seconds, results = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for probe in (True, False):
            search_module.dead_unit_refusal = refusal if probe else (lambda *a, **k: "switched off (benchmark)")
            gates = GateSet(model.gate_points(), init=settings.gate_init).attach(model)
            start = time.perf_counter()
            results[probe] = run_search(model, gates, search, None, None, num_classes=10, num_bias=10,
                                        weights=weights, settings=settings, seed=0)
            seconds[probe].append(time.perf_counter() - start)
            gates.detach()
    search_module.dead_unit_refusal = refusal
    same = (results[True].history == results[False].history
            and all(torch.equal(results[True].masks[k], results[False].masks[k]) for k in results[True].masks))
    with_probe, without = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"{len(results[True].history)} mask epochs, {len(search)} search samples, batch 256, "
          f"{args.threads} thread(s), {args.repeats} repeats alternated")
    print(f"search seconds (median): with the dead-unit probe {with_probe:.2f}, without {without:.2f} "
          f"(ratio {with_probe / without:.3f}); all: {seconds}")
    print(f"identical history and masks: {same}")


if __name__ == "__main__":
    main()
