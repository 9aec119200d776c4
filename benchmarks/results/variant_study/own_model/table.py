"""Variant study on the own-model example (issue 22, part 3): the table of BISE search variants against the
paper's recipe (the example's defaults), paired by seed, from the run records copied into `records/`.

    python benchmarks/results/variant_study/own_model/table.py [--records DIR] [--out DIR]

Each `records/<variant>_seed<S>.jsonl` is the `metrics.jsonl` of one `bise run experiment=example/own_model
'stages=[vanilla,bise]' seed=S ...` (run.sh); the masks are the example's selection (best validation epoch), so
no test number chooses anything. Writes `table.md` and `table.csv` beside the records by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # benchmarks/: the variant study's own paired statistics
from variant_study import format_p, mean_sd, paired  # noqa: E402

REFERENCE = "paper"  # the example's defaults: the row every variant is paired with
# (column in the records, header): what each row reports, in %.
COLUMNS = (("acc_unbiased", "test unbiased"), ("acc_worst_group", "worst group"),
           ("val_acc_unbiased", "val unbiased"), ("sparsity_units", "units off"), ("leakage", "bias probe"))


def load(records: Path) -> pd.DataFrame:
    """One row per (variant, seed, stage) from the record files; the variant is the file name's part before
    `_seed`, the seed is read from the record itself."""
    rows = []
    for path in sorted(records.glob("*_seed*.jsonl")):
        variant = path.stem.rsplit("_seed", 1)[0]
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.append({"variant": variant, "seed": int(record["seed"]), "stage": record["stage"],
                         **{c: record.get(c) for c, _ in COLUMNS}})
    return pd.DataFrame(rows)


def build(df: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows: vanilla, then the paper row, then each variant with its paired difference in
    test unbiased accuracy against the paper row over the seeds both have; then the per-seed values."""
    # vanilla is the user's checkpoint, evaluated: the same model for every run (checked in the README).
    vanilla = df[df.stage == "vanilla"].drop_duplicates("seed")
    bise = df[df.stage == "bise"]
    ref = bise[bise.variant == REFERENCE].set_index("seed")
    heads = " | ".join(h for _, h in COLUMNS)
    lines = [f"| stage | variant | n | seeds | {heads} | test unbiased vs paper: diff [95 % CI] | p "
             "| val unbiased vs paper: diff [95 % CI], p |",
             "|---|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|"]
    csv_rows = []
    groups = [("vanilla", "user's checkpoint", vanilla)] + [
        ("bise", v, bise[bise.variant == v]) for v in sorted(bise.variant.unique(), key=lambda v: (v != REFERENCE, v))]
    for stage, name, group in groups:
        group = group.sort_values("seed")
        common = [s for s in group.seed if s in ref.index]
        diff = val_diff = None
        if stage == "bise" and name != REFERENCE and len(common) >= 2:
            mine = group.set_index("seed").loc[common]
            diff = paired(mine.acc_unbiased.mul(100).tolist(), ref.loc[common, "acc_unbiased"].mul(100).tolist())
            # what a user choosing by validation sees: the same paired difference on the validation split
            val_diff = paired(mine.val_acc_unbiased.mul(100).tolist(),
                              ref.loc[common, "val_acc_unbiased"].mul(100).tolist())
        diff_text = "(reference)" if name == REFERENCE else (f"{diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}]"
                                                              if diff else "–")
        p_text = format_p(diff[3]) if diff else "–"
        val_text = (f"{val_diff[0]:+.1f} [{val_diff[1]:+.1f}, {val_diff[2]:+.1f}], p {format_p(val_diff[3])}"
                    if val_diff else diff_text if name == REFERENCE else "–")
        seeds = " ".join(map(str, group.seed))
        lines.append(f"| {stage} | {name} | {len(group)} | {seeds} | "
                     + " | ".join(mean_sd(group[c]) for c, _ in COLUMNS) + f" | {diff_text} | {p_text} | {val_text} |")
        csv_rows.append({"stage": stage, "variant": name, "n": len(group), "seeds": seeds,
                         **{f"{c}_mean": group[c].mean() * 100 for c, _ in COLUMNS},
                         **{f"{c}_sd": group[c].std(ddof=1) * 100 for c, _ in COLUMNS},
                         "diff_vs_paper": diff[0] if diff else None, "ci_low": diff[1] if diff else None,
                         "ci_high": diff[2] if diff else None, "p": diff[3] if diff else None,
                         "val_diff_vs_paper": val_diff[0] if val_diff else None,
                         "val_p": val_diff[3] if val_diff else None})
    seeds = sorted(bise.seed.unique())
    lines += ["", "Test unbiased accuracy per seed (in brackets: minus the same seed's paper row)", "",
              "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for _, name, group in groups[1:]:
        values = group.set_index("seed").acc_unbiased * 100
        cells = [(f"{values[s]:.1f}" + (f" ({values[s] - ref.acc_unbiased[s] * 100:+.1f})"
                                        if name != REFERENCE and s in ref.index else ""))
                 if s in values.index else "–" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, csv_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default=str(HERE / "records"), help="folder of <variant>_seed<S>.jsonl")
    parser.add_argument("--out", default=str(HERE), help="where table.md and table.csv go")
    args = parser.parse_args()
    lines, csv_rows = build(load(Path(args.records)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    pd.DataFrame(csv_rows).to_csv(out / "table.csv", index=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
