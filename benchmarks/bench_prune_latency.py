"""Latency of physically pruned SimpleConvNets vs the dense one, against the MAC reduction, per channel rounding.

A random BISE-like mask (every layer keeps 40-60 % of its units, random logits as gate scores) is rounded with
`bise_cli.models.masking.round_masks(masks, scores, round_to)` for round_to in (1, 4, 8, 16); for each, the pruned
model's MACs, its latency at batch 1 and 100 (torch.utils.benchmark via bise_cli.reporting.efficiency.measure_latency),
speed-up = dense / pruned latency, and speed-up / MAC ratio. Target: >= 0.9 at batch 100.
Dense and pruned are timed alternately (`--rounds` times each, median) so that a machine whose load drifts
affects both alike.
"""

from __future__ import annotations

import torch

from bise_cli.method.prune import prune_model
from bise_cli.method.train import freeze
from bise_cli.models import build_backbone
from bise_cli.models.masking import round_masks
from bise_cli.reporting.efficiency import count_macs, measure_latency

from common import parse_args

TARGET = 0.9


def paired_latency(dense, pruned, x, repeats: int, rounds: int) -> tuple[float, float]:
    """Median latency (ms) of `dense` and `pruned` on `x`, timed alternately `rounds` times."""
    d, p = [], []
    for _ in range(rounds):
        d.append(measure_latency(dense, x, repeats, 2))
        p.append(measure_latency(pruned, x, repeats, 2))
    return torch.tensor(d).median().item(), torch.tensor(p).median().item()


def bise_like_masks(model, generator: torch.Generator):
    """Per layer a keep fraction in [0.4, 0.6]; the kept units are those with the highest random logits."""
    masks, scores = {}, {}
    for p in model.gate_points():
        logits = torch.randn(p.units, generator=generator)
        keep = 0.4 + 0.2 * float(torch.rand((), generator=generator))
        threshold = logits.sort(descending=True).values[max(1, round(keep * p.units)) - 1]
        masks[p.name], scores[p.name] = logits >= threshold, logits
    return masks, scores


def main() -> None:
    args = parse_args(__doc__, width=(float, 1.0, "SimpleConvNet width"), repeats=(int, 10, "timed blocks"),
                      rounds=(int, 3, "alternating dense/pruned timings"),
                      seed=(int, 0, "mask seed"))
    print(f"torch threads {torch.get_num_threads()}")
    model = freeze(build_backbone("simple_convnet", 10, width=args.width))
    masks, scores = bise_like_masks(model, torch.Generator().manual_seed(args.seed))
    x1, x100 = torch.randn(1, 3, 28, 28), torch.randn(100, 3, 28, 28)
    dense_macs = count_macs(model, x1)
    print(f"dense: {dense_macs / 1e6:.2f} MMACs, units per layer "
          + "/".join(str(p.units) for p in model.gate_points()))
    print(f"{'round_to':>8} {'kept units per layer':<22} {'MMACs':>7} {'MAC ratio':>9} {'b1 speed-up':>11} "
          f"{'b100 dense/pruned ms':>21} {'b100 speed-up':>13} {'/ MAC ratio':>11}  verdict")
    failed = False
    for round_to in (1, 4, 8, 16):
        rounded = round_masks(masks, scores, round_to)
        pruned = prune_model(model, rounded)
        macs = count_macs(pruned, x1)
        ratio = dense_macs / macs
        d1, p1 = paired_latency(model, pruned, x1, args.repeats, args.rounds)
        d100, p100 = paired_latency(model, pruned, x100, args.repeats, args.rounds)
        b1, b100 = d1 / p1, d100 / p100
        kept = "/".join(str(int(m.sum())) for m in rounded.values())
        ok = b100 >= TARGET * ratio
        failed |= not ok
        times = f"{d100:.1f}/{p100:.1f}"
        print(f"{round_to:>8} {kept:<22} {macs / 1e6:>7.2f} {ratio:>9.2f} {b1:>11.2f} {times:>21} {b100:>13.2f} "
              f"{b100 / ratio:>11.2f}  {'ok' if ok else 'below target'}")
    print(f"target b100 speed-up >= {TARGET} x MAC ratio: {'met for every round_to' if not failed else 'NOT met'}")


if __name__ == "__main__":
    main()
