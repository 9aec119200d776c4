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
from bise_cli.method.search import SearchSettings, run_search
from bise_cli.models.masking import GateSet

from common import add_frozen_mlp_args, frozen_mlp_search_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_frozen_mlp_args(parser)
    parser.add_argument("--tau-period", type=int, default=1, help="epochs per temperature halving (paper: 10)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, search, weights = frozen_mlp_search_start(args)
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
