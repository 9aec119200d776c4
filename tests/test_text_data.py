"""CivilComments: WILDS-layout reader, binarisation, groups, bad files, synthetic data, token cache, download."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pytest
import torch

from bise_cli.data.civilcomments import IDENTITY_NAMES, load_civilcomments, read_table
from bise_cli.data.synthetic_text import COLUMNS, write_synthetic_civilcomments
from bise_cli.errors import BiseError

pytest.importorskip("transformers")


def _csv(path, rows):
    """A WILDS-layout CSV (index column first) with the given rows; unspecified identity columns are NaN."""
    frame = pd.DataFrame(rows)
    for column in ("comment_text", "split", "toxicity", *IDENTITY_NAMES):
        if column not in frame:
            frame[column] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path)
    return path


HAND_ROWS = [
    {"comment_text": "you idiot", "split": "train", "toxicity": 0.9, "muslim": 0.6},      # y 1, s 1
    {"comment_text": "nice piece", "split": "train", "toxicity": 0.5, "female": 0.4},     # y 1 (>=), s 0
    {"comment_text": "thanks", "split": "train", "toxicity": 0.49, "black": 0.5},         # y 0, s 1 (>=)
    {"comment_text": "   ", "split": "train", "toxicity": 0.1},                            # dropped: empty
    {"comment_text": None, "split": "val", "toxicity": 0.1},                               # dropped: not text
    {"comment_text": "ok", "split": "val", "toxicity": 0.0, "LGBTQ": 1.0, "white": 1.0},  # y 0, s 1
    {"comment_text": "bad", "split": "test", "toxicity": 0.7},                            # y 1, s 0 (NaN ids)
]


def test_reader_binarises_by_hand(tmp_path):
    df, dropped = read_table(_csv(tmp_path / "c.csv", HAND_ROWS))
    assert dropped == 2
    assert df["y"].tolist() == [1, 1, 0, 0, 1]
    assert df["s"].tolist() == [1, 0, 1, 1, 0]
    assert df.loc[df["comment_text"] == "ok", ["LGBTQ", "white", "male"]].values.tolist() == [[1, 1, 0]]


def test_loader_builds_token_splits(tmp_path):
    root = tmp_path / "root"
    _csv(root / "civilcomments_v1.0" / "all_data_with_identities.csv", HAND_ROWS)
    bundle = load_civilcomments(str(root), source="files", groups="wilds", max_length=16,
                                cache_dir=str(tmp_path / "cache"))
    train = bundle["train"]
    assert train.x.shape == (3, 3, 16) and train.x.dtype == torch.long
    assert train.y.tolist() == [1, 1, 0] and train.b.tolist() == [1, 0, 1]
    assert bundle["search"] is train and len(bundle["val"]) == 1 and len(bundle["test"]) == 1
    assert train.meta["identities"].shape == (3, 8)
    assert bundle.info["dropped_comments"] == 2 and bundle.info["groups"] == "wilds"
    assert bundle.info["synthetic"] is False and len(bundle.info["sha256"]) == 64


@pytest.mark.parametrize("change, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "toxicity"} for r in rows], "lacks column"),
    (lambda rows: [{**r, "split": "dev"} for r in rows], "column 'split' has value"),
])
def test_malformed_files_name_file_and_column(tmp_path, change, message):
    path = tmp_path / "c.csv"
    frame = pd.DataFrame(change(HAND_ROWS))
    for column in IDENTITY_NAMES:
        if column not in frame:
            frame[column] = float("nan")
    frame.to_csv(path)
    with pytest.raises(BiseError, match=message) as error:
        read_table(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_names_the_options(tmp_path):
    with pytest.raises(BiseError, match="dataset.source=files.*download.*synthetic"):
        load_civilcomments(str(tmp_path), source="auto")
    with pytest.raises(BiseError, match="unknown dataset.groups"):
        load_civilcomments(str(tmp_path), source="files", groups="fine")


def test_synthetic_file_has_wilds_layout_and_correlation(tmp_path):
    path = write_synthetic_civilcomments(tmp_path / "s.csv", 3000, rho=0.9, seed=0)
    frame = pd.read_csv(path, index_col=0)
    assert list(frame.columns) == COLUMNS
    df, _ = read_table(path)
    train = df[df["split"] == "train"]
    for y, expected in ((1, 0.9), (0, 0.1)):
        assert abs(train[train["y"] == y]["s"].mean() - expected) < 0.04
    test = df[df["split"] == "test"]
    assert abs(test["s"].mean() - 0.5) < 0.06
    assert (tmp_path / "SYNTHETIC.txt").is_file()


def test_token_cache_is_reused(tmp_path, monkeypatch):
    kwargs = dict(source="synthetic", max_length=12, cache_dir=str(tmp_path / "cache"), synthetic_size=200)
    first = load_civilcomments(str(tmp_path), **kwargs)
    import bise_cli.data.tokenize as tokenize

    def no_tokenizer(name):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(tokenize, "load_tokenizer", no_tokenizer)
    second = load_civilcomments(str(tmp_path), **kwargs)
    assert torch.equal(first["train"].x, second["train"].x) and second.info["synthetic"]


def test_download_path_with_a_local_archive(tmp_path):
    csv = _csv(tmp_path / "src" / "all_data_with_identities.csv", HAND_ROWS)
    archive = tmp_path / "wilds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(csv, arcname="all_data_with_identities.csv")
        tar.addfile(tarfile.TarInfo("RELEASE_v1.0.txt"), io.BytesIO(b""))
    bundle = load_civilcomments(str(tmp_path / "root"), source="download", download_url=archive.as_uri(),
                                max_length=8, cache_dir=str(tmp_path / "cache"))
    assert len(bundle["train"]) == 3
    assert (tmp_path / "root" / "civilcomments_v1.0" / "RELEASE_v1.0.txt").is_file()
    with pytest.raises(BiseError, match="downloading CivilComments"):
        load_civilcomments(str(tmp_path / "other"), source="download", download_url=(tmp_path / "nope").as_uri())
