"""`pruning.stop_when_frozen`: search time with and without the forward-only tail, and the identity of results.

A Multi-Color MNIST MLP (the paper's network, the embedded 5k digits by default: minutes on a busy 2-core CPU)
trained briefly, then the same BISE search twice from the same start, the paper's temperature schedule compressed
(`--tau-period`): once with `stop_when_frozen=false`, once with the default, in one process (compare the two
times as a ratio). Prints the epoch after which the masks froze, both search times and whether masks, heads,
history and selection agree.

    PYTHONPATH=. python benchmarks/bench_frozen_stop.py [--source embedded] [--root datasets/mnist] [--tau-period 3]
        [--epochs 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from bise_cli.method.search import SearchSettings, run_search
from bise_cli.models.masking import GateSet

from common import add_frozen_mlp_args, frozen_mlp_search_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_frozen_mlp_args(parser)
    parser.add_argument("--tau-period", type=int, default=3, help="epochs per temperature halving (paper: 10)")
    args = parser.parse_args()
    model, search, weights = frozen_mlp_search_start(args)
    results, seconds = {}, {}
    for stop in (False, True):
        settings = SearchSettings(batch_size=256, tau_period=args.tau_period, head_pretrain_epochs=5,
                                  head_refine_epochs=5, selection="last", stop_when_frozen=stop)
        gates = GateSet(model.gate_points(), init=settings.gate_init).attach(model)
        start = time.perf_counter()
        results[stop] = run_search(model, gates, search, None, None, num_classes=10, num_bias=10, weights=weights,
                                   settings=settings, seed=0)
        seconds[stop] = time.perf_counter() - start
        gates.detach()
    full, fast = results[False], results[True]
    same = (full.history == fast.history and full.best_epoch == fast.best_epoch
            and all(torch.equal(full.masks[k], fast.masks[k]) for k in full.masks)
            and all(torch.equal(a[k], b[k])
                    for a, b in zip(full.head_states, fast.head_states, strict=True) for k in a))
    epochs = len(full.history)
    print(f"{epochs} mask epochs (tau halved every {args.tau_period}); masks frozen after epoch "
          f"{fast.frozen_epoch} (full search: {full.frozen_epoch})")
    print(f"search seconds: full schedule {seconds[False]:.1f}, stop_when_frozen {seconds[True]:.1f} "
          f"(ratio {seconds[True] / seconds[False]:.2f})")
    print(f"identical masks, heads, history and selection: {same}")


if __name__ == "__main__":
    main()
