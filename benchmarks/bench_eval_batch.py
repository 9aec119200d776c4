"""Evaluation batch size on a CPU: time per image and whether the outputs change (the basis of `eval_batch_size:
auto`, 100 on a CPU).

For each backbone (the Multi-Color MNIST MLP, SimpleConvNet at widths 0.25 and 1.0, ResNet18 at 32 px) it runs
no-grad forward passes over the same random images at several batch sizes, alternating the sizes over `--reps`
rounds (so a change in the machine's load hits every size alike), and prints the median CPU milliseconds per image
(`time.process_time`, one thread) and whether the logits are bit-identical to those at batch 500. BatchNorm
statistics are randomised so that eval-mode normalisation does real work.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_batch.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bise_cli.models import build_backbone

SIZES = (50, 100, 250, 500, 1000)
REFERENCE = 500
CASES = {  # name: (backbone, options, input shape of one image, images)
    "mlp": ("mlp", {}, (3 * 28 * 28,), 8000),
    "simple_convnet w0.25": ("simple_convnet", {"width": 0.25}, (3, 28, 28), 3000),
    "simple_convnet w1.0": ("simple_convnet", {"width": 1.0}, (3, 28, 28), 1000),
    "resnet18 32px": ("resnet18", {}, (3, 32, 32), 1000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| backbone | " + " | ".join(f"batch {s} (ms/img)" for s in SIZES) + " | identical to batch 500 |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for label, (name, options, shape, n) in CASES.items():
        torch.manual_seed(0)
        model = build_backbone(name, 10, **options).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        x = torch.rand(n, *shape)
        times: dict[int, list[float]] = {s: [] for s in SIZES}
        outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for _ in range(args.reps):
                for size in SIZES:
                    started = time.process_time()
                    outputs[size] = torch.cat([model(x[i:i + size]) for i in range(0, n, size)])
                    times[size].append((time.process_time() - started) / n * 1e3)
        same = all(torch.equal(outputs[s], outputs[REFERENCE]) for s in SIZES)
        print(f"| {label} | " + " | ".join(f"{statistics.median(times[s]):.3f}" for s in SIZES)
              + f" | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
