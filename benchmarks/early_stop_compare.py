"""`pruning.stop_when_frozen`: compare a run with the option off and one with it on (separate output roots).

For each pair of run folders: the epoch after which the masks froze (`masks_frozen_epoch` of the bise record),
the search time both ways (the search loop's last "BISE search epoch N/N ... (S s)" line and the bise stage's
"recorded: S s" line of run.log), and whether every record of metrics.jsonl (all keys except timings, the
cache keys and the option itself), the mask file and the search history are identical. Prints a Markdown table.

    python benchmarks/early_stop_compare.py LABEL OFF_RUN_DIR ON_RUN_DIR [LABEL OFF ON ...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

# Keys that differ by design: wall-clock figures, the cache keys (the option is part of the bise key) and the
# option itself.
DIFFERENT_BY_DESIGN = ("train_seconds", "latency_ms_b1", "latency_ms_b100", "latency_ms_b1_dense",
                       "latency_ms_b100_dense", "run_dir", "keys", "pruning.stop_when_frozen")


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in DIFFERENT_BY_DESIGN} for row in rows]


def search_seconds(run: Path) -> tuple[float | None, float | None]:
    """(the search loop's seconds, the bise stage's seconds) from run.log."""
    log = (run / "run.log").read_text()
    loop = re.findall(r"BISE search epoch (\d+)/\1 .*\(([\d.]+)s\)", log)
    stage = re.findall(r"stage bise recorded: ([\d.]+) s", log)
    return (float(loop[-1][1]) if loop else None), (float(stage[-1]) if stage else None)


def same_masks(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(p / "masks.pt", weights_only=True) for p in (a, b))
    return all(ma[kind].keys() == mb[kind].keys() and all(torch.equal(ma[kind][k], mb[kind][k]) for k in ma[kind])
               for kind in ("masks", "last_masks"))


def bise_record(run: Path) -> dict:
    return next(r for r in records(run) if r["stage"] == "bise")


def main(argv: list[str]) -> None:
    if len(argv) % 3:
        raise SystemExit("usage: early_stop_compare.py LABEL OFF_RUN_DIR ON_RUN_DIR [...]")
    print("| run | mask epochs | masks frozen after epoch | search loop s (off / on) | bise stage s (off / on) | "
          "identical records | identical masks | identical search history |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(0, len(argv), 3):
        label, off, on = argv[i], Path(argv[i + 1]), Path(argv[i + 2])
        (loop_off, stage_off), (loop_on, stage_on) = search_seconds(off), search_seconds(on)
        frozen = {bise_record(run)["masks_frozen_epoch"] for run in (off, on)}
        history = [json.loads((run / "search_history.json").read_text()) for run in (off, on)]
        print(f"| {label} | {bise_record(on)['search_epochs']} | {' / '.join(str(f) for f in frozen)} | "
              f"{loop_off} / {loop_on} | {stage_off} / {stage_on} | {records(off) == records(on)} | "
              f"{same_masks(off, on)} | {history[0] == history[1]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
