"""Synthetic comments in exactly the WILDS CivilComments CSV layout, for tests and the offline text demo.

Every comment is built from templates: a toxic or friendly core (the real signal, with 10 % label noise) and,
with a probability that depends on the label, a sentence mentioning an identity group (the shortcut). In the
train split P(identity | toxic) = rho and P(identity | non-toxic) = 1 - rho; val and test are balanced (0.5), so
a model that learned "identity word => toxic" fails on the conflicting groups. The file is marked as synthetic
by a sibling SYNTHETIC.txt and by ids starting at 900000000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Column order of WILDS' all_data_with_identities.csv (after the unnamed index column).
LABEL_COLUMNS = ["toxicity", "severe_toxicity", "obscene", "sexual_explicit", "identity_attack", "insult", "threat"]
IDENTITY_COLUMNS = [
    "male", "female", "transgender", "other_gender", "heterosexual", "homosexual_gay_or_lesbian", "bisexual",
    "other_sexual_orientation", "christian", "jewish", "muslim", "hindu", "buddhist", "atheist", "other_religion",
    "black", "white", "asian", "latino", "other_race_or_ethnicity", "physical_disability",
    "intellectual_or_learning_disability", "psychiatric_or_mental_illness", "other_disability",
]
AGGREGATE_COLUMNS = ["LGBTQ", "other_religions", "asian_latino_etc", "disability_any", "identity_any",
                     "num_identities", "more_than_one_identity", "na_gender", "na_orientation", "na_religion",
                     "na_race", "na_disability"]
COLUMNS = ["id", "comment_text", "split", "created_date", "publication_id", "parent_id", "article_id", "rating",
           "funny", "wow", "sad", "likes", "disagree", *LABEL_COLUMNS, *IDENTITY_COLUMNS,
           "identity_annotator_count", "toxicity_annotator_count", *AGGREGATE_COLUMNS]

# (identity column, words that name the group)
IDENTITIES = [("male", "men"), ("female", "women"), ("homosexual_gay_or_lesbian", "gay people"),
              ("christian", "christians"), ("muslim", "muslims"), ("jewish", "jews"), ("black", "black people"),
              ("white", "white people")]
TOXIC = ["you are a pathetic idiot", "this is the dumbest garbage i have ever read", "shut up, you stupid clown",
         "what a disgusting, worthless take", "only a moron would write this trash", "you ignorant fool, get lost"]
FRIENDLY = ["thanks for the thoughtful article", "i agree with most of this, well written",
            "great point about the budget", "this was a helpful summary of the meeting",
            "i appreciate the balanced reporting", "interesting idea, i would like to read more"]
TOPICS = ["the new bus line", "the city council vote", "the school budget", "the housing plan", "the election",
          "the fishing season", "the local team", "the tax proposal"]
MENTIONS = ["as someone who knows many {g},", "i keep hearing about {g} and", "speaking about {g},",
            "my neighbours are {g} and"]


def _comment(rng: np.random.Generator, toxic: bool, identity: str | None) -> str:
    core = rng.choice(TOXIC if toxic else FRIENDLY)
    topic = rng.choice(TOPICS)
    text = f"about {topic}: {core}."
    if identity is not None:
        text = f"{rng.choice(MENTIONS).format(g=identity)} {text}"
    return text


def write_synthetic_civilcomments(path: str | Path, n: int, rho: float, seed: int = 0) -> Path:
    """Write `n` synthetic comments (60/20/20 train/val/test) at bias correlation `rho` to `path` (a CSV)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    rows = []
    for i, split in enumerate(splits):
        toxic = bool(rng.random() < 0.5)
        p_identity = (rho if toxic else 1 - rho) if split == "train" else 0.5
        column, words = IDENTITIES[rng.integers(len(IDENTITIES))] if rng.random() < p_identity else (None, None)
        shown_toxic = toxic if rng.random() > 0.1 else not toxic  # 10 % label noise in the text
        row = dict.fromkeys(COLUMNS, 0.0)
        row.update(id=900_000_000 + i, comment_text=_comment(rng, shown_toxic, words), split=split,
                   created_date="2017-01-01 00:00:00+00", publication_id=0, parent_id=None, article_id=i,
                   rating="approved", identity_annotator_count=4, toxicity_annotator_count=4)
        row["toxicity"] = float(rng.uniform(0.6, 1.0) if toxic else rng.uniform(0.0, 0.4))
        if column is not None:
            row[column] = 1.0
        row["LGBTQ"] = float(row["homosexual_gay_or_lesbian"] >= 0.5)
        row["other_religions"] = float(row["jewish"] >= 0.5)
        row["identity_any"] = float(column is not None)
        row["num_identities"] = int(column is not None)
        rows.append(row)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path)  # index written first, unnamed, as in the WILDS file
    (path.parent / "SYNTHETIC.txt").write_text(f"synthetic CivilComments-format data: n={n}, rho={rho}, "
                                               f"seed={seed}; not real comments\n")
    return path
