"""The quickstart pass criteria on 10k real MNIST digits at rho = 0.9, seeds 0 and 1 (BISE issue):
BISE beats vanilla unbiased accuracy on each seed and by >= 2 points on average; conflicting accuracy rises by
>= 4 points per seed; 5-70 % of units pruned; BISE's own bias head accuracy falls. Stage caches are reused, so
runs already made by `bise run experiment=quickstart dataset.root=... seed=S` are not recomputed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bise_cli import pipeline
from bise_cli.cli import CONF_DIR

from common import parse_args


def run(seed: int, mnist: str, out: Path) -> list[dict]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # Same overrides as `bise run experiment=quickstart dataset.root=... seed=S`: the stage caches are shared.
        cfg = compose("config", overrides=["experiment=quickstart", f"dataset.root={mnist}", f"seed={seed}"])
    return pipeline.run(OmegaConf.to_container(cfg, resolve=True), out / f"seed={seed}")


def main() -> None:
    args = parse_args(__doc__, seeds=(str, "0,1", "comma-separated seeds"), out=(str, "outputs/bench/quickstart",
                                                                                   "run folders"))
    checks, gains = [], []
    for seed in map(int, args.seeds.split(",")):
        start = time.perf_counter()
        records = {r["stage"]: r for r in run(seed, args.mnist, Path(args.out))}
        vanilla, bise = records["vanilla"], records["bise"]
        gain = 100 * (bise["acc_unbiased"] - vanilla["acc_unbiased"])
        conflicting = 100 * (bise["acc_conflicting"] - vanilla["acc_conflicting"])
        gains.append(gain)
        print(f"seed {seed} ({time.perf_counter() - start:.0f} s): unbiased vanilla "
              f"{100 * vanilla['acc_unbiased']:.1f} -> BISE {100 * bise['acc_unbiased']:.1f} ({gain:+.1f}), "
              f"conflicting {100 * vanilla['acc_conflicting']:.1f} -> {100 * bise['acc_conflicting']:.1f} "
              f"({conflicting:+.1f}), units pruned {100 * bise['sparsity_units']:.1f} %, bias head "
              f"{100 * bise['leakage_head_vanilla']:.1f} -> {100 * bise['leakage_head']:.1f} %, BISE+FT "
              f"{100 * records['bise_ft']['acc_unbiased']:.1f}, reweighted FT "
              f"{100 * records['reweighted_ft']['acc_unbiased']:.1f}, random "
              f"{100 * records['random']['acc_unbiased']:.1f}, magnitude "
              f"{100 * records['magnitude']['acc_unbiased']:.1f}")
        checks += [("BISE > vanilla", gain > 0), ("conflicting +4", conflicting >= 4),
                   ("5-70 % pruned", 0.05 <= bise["sparsity_units"] <= 0.70),
                   ("head accuracy falls", bise["leakage_head"] < bise["leakage_head_vanilla"])]
    checks.append(("mean gain >= 2", sum(gains) / len(gains) >= 2))
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
