"""CivilComments in the WILDS release layout (method.md §3.5; docs: civilcomments-format), read with pandas.

File: `<root>/civilcomments_v1.0/all_data_with_identities.csv`, first column the pandas index, `split` in
{train, val, test}, toxicity and identity columns rater fractions. y = toxicity >= 0.5; identities are
binarised at >= 0.5 (missing -> 0). The bias b is BISE's coarse attribute s = any of the 8 identities
(male, female, LGBTQ, christian, muslim, other_religions, black, white). Every split also carries the 8
identity columns (`meta["identities"]`) so WILDS' 16 (identity, label) groups can be evaluated.

Sources: `files`, `download` (the WILDS archive, see DOWNLOAD_URL), `synthetic` (a generated file in the same
layout, flagged as synthetic everywhere), `auto` (= files, with an error naming the options when missing).
The `wilds` package is not used: its downloads are broken and it pulls heavy extras.
"""

from __future__ import annotations

import logging
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.synthetic_text import write_synthetic_civilcomments
from bise_cli.data.tokenize import file_sha256, tokenize_texts
from bise_cli.errors import BiseError, check_choice

log = logging.getLogger(__name__)

SOURCES = ("auto", "files", "download", "synthetic")
GROUPINGS = ("coarse", "wilds")
RELEASE = "civilcomments_v1.0"
CSV_NAME = "all_data_with_identities.csv"
# WILDS v1.0 archive (codalab bundle of p-lambda/wilds' civilcomments_dataset.py); about 90 MB compressed.
DOWNLOAD_URL = "https://worksheets.codalab.org/rest/bundles/0x8cd3de0634154aeaad2ee6eb96723c6e/contents/blob/"
IDENTITY_NAMES = ["male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white"]
REQUIRED = ["comment_text", "split", "toxicity", *IDENTITY_NAMES]
SPLIT_MAP = {"train": "train", "val": "val", "test": "test"}


def csv_path(root: str | Path) -> Path:
    return Path(root) / RELEASE / CSV_NAME


def download_release(root: str | Path, url: str = DOWNLOAD_URL) -> Path:
    """Download and unpack the WILDS archive into `root` (so that `csv_path(root)` exists)."""
    root = Path(root)
    target = root / RELEASE
    target.mkdir(parents=True, exist_ok=True)
    archive = root / "civilcomments_v1.0.tar.gz"
    try:
        log.info("downloading CivilComments from %s", url)
        urllib.request.urlretrieve(url, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except (OSError, tarfile.TarError) as error:
        raise BiseError(f"downloading CivilComments from {url} failed ({error}); place {CSV_NAME} in {target} "
                        "and use dataset.source=files") from None
    # Some archives hold the release folder itself: accept both layouts.
    nested = target / RELEASE / CSV_NAME
    if nested.is_file() and not (target / CSV_NAME).is_file():
        nested.rename(target / CSV_NAME)
    if not (target / CSV_NAME).is_file():
        raise BiseError(f"the downloaded archive has no {CSV_NAME} (looked in {target})")
    (target / "RELEASE_v1.0.txt").write_text("downloaded by bise\n")
    return target / CSV_NAME


def read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """The checked table with y, s and binarised identities, and the number of dropped (empty) comments."""
    try:
        df = pd.read_csv(path, index_col=0, low_memory=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise BiseError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise BiseError(f"{path} lacks column(s) {', '.join(missing)} (expected the WILDS CivilComments layout)")
    bad = sorted(set(df["split"].astype(str)) - set(SPLIT_MAP))
    if bad:
        raise BiseError(f"{path}: column 'split' has value(s) {', '.join(map(repr, bad[:5]))}; allowed: train, val, test")
    text = df["comment_text"]
    keep = text.map(lambda t: isinstance(t, str) and t.strip() != "")
    dropped = int((~keep).sum())
    df = df[keep].copy()
    try:
        df["y"] = (pd.to_numeric(df["toxicity"]) >= 0.5).astype(int)
        identities = df[IDENTITY_NAMES].apply(pd.to_numeric).fillna(0.0) >= 0.5
    except (ValueError, TypeError) as error:
        raise BiseError(f"{path}: toxicity and identity columns must be numbers ({error})") from None
    df[IDENTITY_NAMES] = identities.astype(int)
    df["s"] = identities.any(axis=1).astype(int)
    return df, dropped


def _cap(df: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """At most `max_samples` rows, sampled evenly from the (y, s) groups where possible (small CPU runs)."""
    if max_samples is None or len(df) <= max_samples:
        return df
    rng = np.random.default_rng(seed)
    groups = [g for _, g in df.groupby(["y", "s"])]
    per_group = max(1, max_samples // len(groups))
    picked = [g.iloc[rng.permutation(len(g))[:per_group]] for g in groups]
    rest = max_samples - sum(len(p) for p in picked)
    if rest > 0:
        leftover = df.drop(index=pd.concat(picked).index)
        picked.append(leftover.iloc[rng.permutation(len(leftover))[:rest]])
    return pd.concat(picked).sort_index()


def load_civilcomments(root: str, source: str = "auto", groups: str = "coarse", tokenizer: str = "minilm",
                       max_length: int = 220, cache_dir: str = "outputs/cache/tokens", max_samples: int | None = None,
                       seed: int = 0, synthetic_size: int = 4000, synthetic_rho: float = 0.9,
                       download_url: str = DOWNLOAD_URL) -> DatasetBundle:
    """CivilComments as (tokens, toxic, any-identity) splits train / search (= train) / val / test."""
    check_choice("dataset.source", source, SOURCES)
    check_choice("dataset.groups", groups, GROUPINGS)
    if source == "synthetic":
        path = Path(cache_dir).parent / "synthetic_civilcomments" / \
            f"n{synthetic_size}_rho{synthetic_rho}_seed{seed}" / RELEASE / CSV_NAME
        if not path.is_file():
            write_synthetic_civilcomments(path, synthetic_size, synthetic_rho, seed)
    else:
        path = csv_path(root)
        if not path.is_file():
            if source == "download":
                path = download_release(root, download_url)
            else:
                raise BiseError(f"{path} not found; choose dataset.source=files with dataset.root=<folder holding "
                                f"{RELEASE}/>, dataset.source=download (WILDS archive, needs internet) or "
                                "dataset.source=synthetic (generated demo data)")
    df, dropped = read_table(path)
    digest = file_sha256(path)
    splits, counts = {}, {}
    for name in ("train", "val", "test"):
        part = _cap(df[df["split"] == name], max_samples, seed)
        tokens, seconds = tokenize_texts(part["comment_text"].tolist(), tokenizer, max_length, cache_dir,
                                         f"{digest}:{name}:{max_samples}:{seed}")
        y = torch.tensor(part["y"].to_numpy(), dtype=torch.long)
        s = torch.tensor(part["s"].to_numpy(), dtype=torch.long)
        identities = torch.tensor(part[IDENTITY_NAMES].to_numpy(), dtype=torch.bool)
        splits[name] = Split(tokens, y, s, meta={"identities": identities})
        counts[name] = {"size": len(part), "tokenize_seconds": round(seconds, 2),
                        "groups": {f"y={a},s={b}": int(((y == a) & (s == b)).sum()) for a in (0, 1) for b in (0, 1)}}
    splits["search"] = splits["train"]  # BISE's mask search uses the training set itself
    info = {"source": source if source != "auto" else "files", "synthetic": source == "synthetic", "path": str(path),
            "sha256": digest, "groups": groups, "identity_names": IDENTITY_NAMES, "dropped_comments": dropped,
            "tokenizer": tokenizer, "max_length": max_length, "counts": counts}
    if dropped:
        log.info("dropped %d empty or non-text comments from %s", dropped, path)
    return DatasetBundle("civilcomments", splits, num_classes=2, num_bias=2, info=info)
