"""The quickstart's bar (`bise run experiment=quickstart`, reduced Multi-Color MNIST), seeds 0 and 1, each run
from an empty stage cache: the whole run finishes in at most 5 minutes on 2 cores; BISE or BISE+FT (labelled)
is at least 5 points of unbiased accuracy above vanilla and above random and magnitude pruning. Also prints
the data-fingerprint overhead (hashing every split once) against the run's wall time, and the peak RSS.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bise_cli.cli import CONF_DIR
from bise_cli.run import pipeline
from bise_cli.run.fingerprint import fingerprint_bundle

from common import parse_args

LIMIT_SECONDS = 300
MIN_GAIN = 5.0


def config(seed: int, mnist: str, cache_root: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", f"dataset.root={mnist}", f"seed={seed}",
                                           f"output_root={cache_root}"])
    return OmegaConf.to_container(cfg, resolve=True)


def main() -> None:
    args = parse_args(__doc__, seeds=(str, "0,1", "comma-separated seeds"))
    checks = []
    for seed in map(int, args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(seed, args.mnist, tmp)
            start = time.perf_counter()
            records = {r["stage"]: r for r in pipeline.run(cfg, Path(tmp) / "run")}
            seconds = time.perf_counter() - start
            bundle = pipeline.load_data(cfg)
            hashed = time.perf_counter()
            fingerprint_bundle(bundle)
            hashed = time.perf_counter() - hashed
        unbiased = {stage: 100 * r["acc_unbiased"] for stage, r in records.items()}
        best = max(("bise", "bise_ft"), key=unbiased.get)
        gain = unbiased[best] - unbiased["vanilla"]
        print(f"seed {seed}: {seconds:.0f} s (data fingerprint {hashed:.2f} s = {100 * hashed / seconds:.2f} %); "
              "unbiased % " + ", ".join(f"{stage} {value:.1f}" for stage, value in unbiased.items())
              + f"; best of BISE/BISE+FT: {best} {gain:+.1f}")
        checks += [(f"seed {seed}: whole run <= {LIMIT_SECONDS} s", seconds <= LIMIT_SECONDS),
                   (f"seed {seed}: {best} >= vanilla + {MIN_GAIN}", gain >= MIN_GAIN),
                   (f"seed {seed}: {best} above random and magnitude",
                    unbiased[best] > max(unbiased["random"], unbiased["magnitude"]))]
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
