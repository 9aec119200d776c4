"""Latency of physically pruned SimpleConvNets vs the dense one, against the MAC reduction.

Random structured masks keeping a fraction of every layer's channels; speed-up = dense / pruned median latency.
Target: speed-up >= 0.9 x the MAC ratio (dense MACs / pruned MACs) at batch 100.
"""

from __future__ import annotations

import torch

from bise_cli.efficiency import count_macs, measure_latency
from bise_cli.models import build_backbone
from bise_cli.prune import prune_model
from bise_cli.train import freeze

from common import parse_args


def main() -> None:
    args = parse_args(__doc__, width=(float, 1.0, "SimpleConvNet width"), repeats=(int, 10, "timed repeats"))
    model = freeze(build_backbone("simple_convnet", 10, width=args.width))
    generator = torch.Generator().manual_seed(0)
    x1, x100 = torch.randn(1, 3, 28, 28), torch.randn(100, 3, 28, 28)
    dense = {1: measure_latency(model, x1, args.repeats, 3), 100: measure_latency(model, x100, args.repeats, 2)}
    dense_macs = count_macs(model, x1)
    print(f"dense: {dense_macs / 1e6:.1f} MMACs, {dense[1]:.2f} ms (b1), {dense[100]:.1f} ms (b100)")
    for keep in (0.8, 0.6, 0.4):
        masks = {p.name: torch.rand(p.units, generator=generator) < keep for p in model.gate_points()}
        pruned = prune_model(model, masks)
        macs = count_macs(pruned, x1)
        ratio = dense_macs / macs
        for batch, x in ((1, x1), (100, x100)):
            speedup = dense[batch] / measure_latency(pruned, x, args.repeats, 2)
            verdict = "ok" if speedup >= 0.9 * ratio else "below target"
            print(f"keep {keep:.0%}: {macs / 1e6:.1f} MMACs (ratio {ratio:.2f}), batch {batch}: speed-up "
                  f"{speedup:.2f} = {speedup / ratio:.2f} x MAC ratio ({verdict})")


if __name__ == "__main__":
    main()
