"""BiasedMNIST construction time on the full MNIST (60k train + 10k test), all four splits."""

from __future__ import annotations

from bise_cli.data.biased_mnist import build_biased_mnist
from bise_cli.data.mnist_source import load_digits

from common import parse_args, timer


def main() -> None:
    args = parse_args(__doc__)
    times: dict = {}
    with timer(times, "read"):
        digits = load_digits("files", args.mnist)
    for rho in (0.99, 0.997):
        with timer(times, f"build_{rho}"):
            bundle = build_biased_mnist(digits, rho=rho, seed=0)
        sizes = {k: len(v) for k, v in bundle.splits.items()}
        print(f"rho={rho}: splits {sizes}, construction {times[f'build_{rho}']:.2f} s")
    print(f"reading the IDX files: {times['read']:.2f} s")


if __name__ == "__main__":
    main()
