"""A reduced but real BiasedMNIST run on the full MNIST files: vanilla vs BISE vs BISE+FT (and the controls).

Default: rho 0.95, 30k training digits, SimpleConvNet width 0.25, 12 vanilla epochs, 10 BISE epochs, 2 FT
epochs: about 20-30 minutes on a 2-core CPU. Prints unbiased accuracy, sparsity and leakage per stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bise_cli.cli import CONF_DIR
from bise_cli.run import pipeline

from common import parse_args


def main() -> None:
    args = parse_args(__doc__, rho=(float, 0.95, "bias correlation"), digits=(int, 30000, "training digits"),
                      seed=(int, 0, "seed"), out=(str, "outputs/bench/reduced", "run folder"))
    overrides = ["experiment=quickstart", "dataset.source=files", f"dataset.root={args.mnist}", f"rho={args.rho}",
                 f"dataset.max_samples={args.digits}", "train.epochs=12", "train.milestones=[10]",
                 "finetune.epochs=2", f"seed={args.seed}", "name=reduced",
                 "note='REDUCED RUN on full MNIST files, not the paper scale'"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    start = time.perf_counter()
    records = pipeline.run(cfg, Path(args.out) / f"rho={args.rho},digits={args.digits},seed={args.seed}")
    print(f"rho {args.rho}, {args.digits} digits, seed {args.seed}: {time.perf_counter() - start:.0f} s")
    for r in records:
        sparsity = r.get("sparsity_units") or 0.0
        print(f"  {r['stage']:<14} unbiased {100 * r['acc_unbiased']:5.1f}  conflicting "
              f"{100 * r['acc_conflicting']:5.1f}  aligned {100 * r['acc_aligned']:5.1f}  units off "
              f"{100 * sparsity:4.1f} %  MMACs {r['macs'] / 1e6:5.1f}  leakage {100 * r['leakage']:5.1f}")


if __name__ == "__main__":
    main()
