"""CivilComments in the WILDS release layout (Koh et al., ICML 2021; README: CivilComments), read with pandas.

File: `<root>/civilcomments_v1.0/all_data_with_identities.csv`, first column the pandas index, `split` in
{train, val, test}, toxicity and identity columns rater fractions. y = toxicity >= 0.5; identities are
binarised at >= 0.5 (missing -> 0). The bias b is BISE's coarse attribute s = any of the 8 identities
(male, female, LGBTQ, christian, muslim, other_religions, black, white). Every split also carries the 8
binarised identities (`meta["identities"]`, order `IDENTITY_NAMES`) so WILDS' 16 (identity, label) groups can
be evaluated; `groups` only records which grouping the run reports.

Sources: `files` (read root), `download` (the WILDS archive, see DOWNLOAD_URL), `synthetic` (a generated file
in the same layout, read by the same code and flagged as synthetic), `auto` (= files, with an error naming the
options when the file is missing: never a silent download or fallback). The `wilds` package is not used: its
downloads are broken and it pulls heavy extras.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bise_cli.core.errors import BiseError, check_choice
from bise_cli.core.files import file_sha256
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.registry import spec
from bise_cli.data.synthetic_text import write_synthetic_civilcomments
from bise_cli.data.tokenize import OFFLINE_MODEL, tokenize_texts

log = logging.getLogger(__name__)

DATASET = spec("civilcomments")
SOURCES = ("auto", "files", "download", "synthetic")
GROUPINGS = ("coarse", "wilds")
RELEASE = "civilcomments_v1.0"
CSV_NAME = "all_data_with_identities.csv"
RELEASE_FILE = "RELEASE_v1.0.txt"  # WILDS re-downloads a folder without it
# WILDS v1.0 archive (codalab bundle of p-lambda/wilds' civilcomments_dataset.py); about 90 MB compressed.
DOWNLOAD_URL = "https://worksheets.codalab.org/rest/bundles/0x8cd3de0634154aeaad2ee6eb96723c6e/contents/blob/"
IDENTITY_NAMES = ["male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white"]
REQUIRED = ["comment_text", "split", "toxicity", *IDENTITY_NAMES]
SPLITS = ("train", "val", "test")


def csv_path(root: str | Path) -> Path:
    """Where the WILDS release keeps the labelled CSV under `root`."""
    return Path(root) / RELEASE / CSV_NAME


def synthetic_csv_path(cache_dir: str | Path, n: int, rho: float, seed: int) -> Path:
    """Where the synthetic file for (n, rho, seed) lives: next to the token cache, in the WILDS layout."""
    folder = Path(cache_dir).parent / "civilcomments_synthetic" / f"n{n}_rho{rho}_seed{seed}"
    return folder / RELEASE / CSV_NAME


# --------------------------------------------------------------------------------------------------- download

def _fetch(url: str, dest: Path) -> None:
    """Stream `url` to `dest` via a `.part` file (so an interrupted download never looks complete)."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as handle:
        total = int(response.headers.get("Content-Length") or 0)
        done, reported, started = 0, 0.0, time.perf_counter()
        for chunk in iter(lambda: response.read(1 << 20), b""):
            handle.write(chunk)
            done += len(chunk)
            if total and done / total >= reported + 0.1:  # one log line per 10 %
                reported = done / total
                log.info("downloaded %.0f%% of %.0f MB (%.0f s)", 100 * reported, total / 2**20,
                         time.perf_counter() - started)
    part.replace(dest)


def _extract(archive: Path, target: Path) -> None:
    """Unpack a tar archive into `target`, refusing members that would land outside it."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
            return
        for member in tar.getmembers():  # Python < 3.10.12 has no extraction filters: check paths by hand
            if not (target / member.name).resolve().is_relative_to(target.resolve()):
                raise tarfile.TarError(f"unsafe path {member.name!r} in archive")
        tar.extractall(target)


def download_release(root: str | Path, url: str = DOWNLOAD_URL) -> Path:
    """Download and unpack the WILDS archive into `<root>/civilcomments_v1.0/`; returns the CSV path."""
    target = Path(root) / RELEASE
    target.mkdir(parents=True, exist_ok=True)
    archive = target / "archive.tar.gz"  # the name WILDS uses
    log.info("downloading CivilComments from %s into %s", url, target)
    try:
        _fetch(url, archive)
        _extract(archive, target)
    except (OSError, ValueError, tarfile.TarError) as error:
        raise BiseError(f"downloading CivilComments from {url} failed ({str(error).splitlines()[0]}); place "
                        f"{CSV_NAME} in {target} and use dataset.source=files") from None
    archive.unlink()
    # The WILDS archive holds the files at top level; accept an archive holding the release folder too.
    if not (target / CSV_NAME).is_file():
        found = sorted(target.rglob(CSV_NAME))
        if not found:
            raise BiseError(f"the archive from {url} has no {CSV_NAME} (looked in {target})")
        shutil.move(str(found[0]), target / CSV_NAME)
    if not (target / RELEASE_FILE).is_file():
        (target / RELEASE_FILE).write_text("civilcomments v1.0, downloaded by bise\n")
    return target / CSV_NAME


# --------------------------------------------------------------------------------------------------- reading

def _read_columns(path: Path) -> pd.DataFrame:
    """The index and the REQUIRED columns of the CSV (only those are parsed: the real file is 270 MB)."""
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise BiseError(f"{path} lacks column(s) {', '.join(missing)} "
                            "(expected the WILDS CivilComments layout)")
        # WILDS writes the pandas index as an unnamed first column; a file saved without it is accepted too.
        with_index = header[0] not in REQUIRED
        positions = [0] * with_index + [header.index(c) for c in REQUIRED]
        return pd.read_csv(path, usecols=positions, index_col=0 if with_index else None,
                           dtype={"comment_text": object}, low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BiseError(f"cannot read {path}: {message}") from None


def _numeric(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """Column as floats; BiseError naming the file and column when a value is not a number."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() & df[column].notna()
    if bad.any():
        raise BiseError(f"{path}: column {column!r} has non-numeric value {df[column][bad].iloc[0]!r}")
    return values


def read_table(path: str | Path) -> tuple[pd.DataFrame, int]:
    """The checked table with y, s and binarised identities, and the number of dropped (empty) comments."""
    path = Path(path)
    df = _read_columns(path)
    bad = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad:
        raise BiseError(f"{path}: column 'split' has value(s) {', '.join(map(repr, bad[:5]))}; "
                        "allowed: train, val, test")
    keep = df["comment_text"].map(lambda t: isinstance(t, str) and t.strip() != "")
    dropped = int((~keep).sum())
    df = df[keep].copy()
    toxicity = _numeric(df, "toxicity", path)
    if toxicity.isna().any():
        raise BiseError(f"{path}: column 'toxicity' is empty in {int(toxicity.isna().sum())} row(s)")
    df["y"] = (toxicity >= 0.5).astype(int)
    identities = pd.DataFrame({c: _numeric(df, c, path).fillna(0.0) >= 0.5 for c in IDENTITY_NAMES})
    df[IDENTITY_NAMES] = identities.astype(int)
    df["s"] = identities.any(axis=1).astype(int)
    return df, dropped


def _cap(df: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """At most `max_samples` rows, a seeded sample stratified by (y, s).

    Group proportions are kept (so a capped train split keeps its bias) and every non-empty group keeps at
    least one row when the cap allows it.
    """
    if max_samples is None or len(df) <= max_samples:
        return df
    key = (2 * df["y"] + df["s"]).to_numpy()
    members = [np.flatnonzero(key == g) for g in np.unique(key)]
    sizes = np.array([len(m) for m in members])
    want = sizes * max_samples / len(df)
    take = np.floor(want).astype(int)
    if max_samples >= len(members):
        take = np.maximum(take, 1)
    while take.sum() > max_samples:  # the one-row minimum overshot the cap: the largest group gives back
        take[np.argmax(take)] -= 1
    while take.sum() < max_samples:  # largest remainders first, among groups with rows left
        take[np.argmax(np.where(take < sizes, want - take, -np.inf))] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(m, size=k, replace=False) for m, k in zip(members, take, strict=True)]
    return df.iloc[np.sort(np.concatenate(chosen))]


# --------------------------------------------------------------------------------------------------- loading

def _resolve(root: str, source: str, cache_dir: str, seed: int, synthetic_size: int, synthetic_rho: float,
             download_url: str) -> tuple[Path, str]:
    """The CSV to read and the source it came from (files, download or synthetic)."""
    if source == "synthetic":
        path = synthetic_csv_path(cache_dir, synthetic_size, synthetic_rho, seed)
        if not path.is_file():
            log.info("generating %d synthetic CivilComments-format comments (rho=%s) in %s", synthetic_size,
                     synthetic_rho, path.parent)
            write_synthetic_civilcomments(path, synthetic_size, synthetic_rho, seed)
        return path, "synthetic"
    path = csv_path(root)
    if path.is_file():
        return path, "files"
    if source == "download":
        return download_release(root, download_url), "download"
    raise BiseError(f"{path} not found; choose dataset.source=files with dataset.root=<folder holding "
                    f"{RELEASE}/>, dataset.source=download (WILDS archive, needs internet) or "
                    "dataset.source=synthetic (generated demo data, not real comments)")


def preprocessing(tokenizer: str = OFFLINE_MODEL, max_length: int = 220) -> dict:
    """What tokenisation does, for exported models: (N, 3, max_length) int64 = input_ids, attention_mask,
    token_type_ids (bise_cli.data.tokenize)."""
    return {"kind": "text", "tokenizer": tokenizer, "max_length": max_length, "class_names": ["non-toxic", "toxic"]}


def _group_counts(y: torch.Tensor, s: torch.Tensor) -> dict[str, int]:
    return {f"y={a},s={b}": int(((y == a) & (s == b)).sum()) for a in (0, 1) for b in (0, 1)}


def load_civilcomments(root: str, source: str = "auto", groups: str = "coarse",
                       tokenizer: str = OFFLINE_MODEL, max_length: int = 220,
                       cache_dir: str = "outputs/cache/tokens", max_samples: int | None = None, seed: int = 0,
                       synthetic_size: int = 4000, synthetic_rho: float = 0.9,
                       download_url: str = DOWNLOAD_URL) -> DatasetBundle:
    """CivilComments as (tokens, toxic, any-identity) splits train / search (= train) / val / test."""
    check_choice("dataset.source", source, SOURCES)
    check_choice("dataset.groups", groups, GROUPINGS)
    if max_samples is not None and max_samples < 1:
        raise BiseError(f"dataset.max_samples must be a positive number or null (got {max_samples})")
    if max_length < 8:
        raise BiseError(f"dataset.max_length must be at least 8 tokens (got {max_length})")
    path, used = _resolve(root, source, cache_dir, seed, synthetic_size, synthetic_rho, download_url)
    df, dropped = read_table(path)
    digest = file_sha256(path)
    splits, counts, seconds = {}, {}, {}
    for name in SPLITS:
        part = df[df["split"] == name]
        if part.empty:  # every split is needed (train/search, model selection, test): fail here, not mid-run
            raise BiseError(f"{path}: column 'split' has no {name!r} rows with text")
        part = _cap(part, max_samples, seed)
        texts = part["comment_text"].tolist()  # the texts are part of the cache key (see tokenize.cache_path)
        tokens, seconds[name] = tokenize_texts(texts, tokenizer, max_length, cache_dir, "civilcomments")
        y = torch.tensor(part["y"].to_numpy(), dtype=torch.long)
        s = torch.tensor(part["s"].to_numpy(), dtype=torch.long)
        identities = torch.tensor(part[IDENTITY_NAMES].to_numpy(dtype=bool)).reshape(-1, len(IDENTITY_NAMES))
        splits[name] = Split(tokens, y, s, meta={"identities": identities})
        counts[name] = {"size": len(part), "groups": _group_counts(y, s)}
    splits["search"] = splits["train"]  # BISE's mask search uses D_train itself (official BISE code)
    if dropped:
        log.info("dropped %d empty or non-text comments from %s", dropped, path)
    synthetic = used == "synthetic" or (path.parent / "SYNTHETIC.txt").is_file()
    info = {"source": used, "synthetic": synthetic, "path": str(path), "sha256": digest,
            "rows_in_file": len(df) + dropped, "dropped_comments": dropped, "max_samples": max_samples,
            "counts": counts, "groups": groups, "identity_names": list(IDENTITY_NAMES),
            "tokenizer": tokenizer, "max_length": max_length, "preprocessing": preprocessing(tokenizer, max_length),
            "tokenize_seconds": {k: round(v, 3) for k, v in seconds.items()}}
    if used == "synthetic":
        info["synthetic_settings"] = {"n": synthetic_size, "rho": synthetic_rho, "seed": seed}
    return DatasetBundle(DATASET.name, splits, num_classes=DATASET.num_classes, num_bias=2, info=info,
                         bias_names=DATASET.bias_names)


def build(source: str, root: str, seed: int, max_samples: int | None = None, *, rho: float,
          **options) -> DatasetBundle:
    """The dataset registry's builder: `rho` sets the synthetic stand-in's toxicity-identity correlation."""
    return load_civilcomments(root=root, source=source, max_samples=max_samples, seed=seed, synthetic_rho=rho,
                              **options)
