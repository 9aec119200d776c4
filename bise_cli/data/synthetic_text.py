"""Synthetic comments in exactly the WILDS CivilComments CSV layout, for tests and the offline text demo.

Each comment is built from templates: a toxic or friendly core sentence (the real signal; with probability
`noise` the core shows the opposite tone, i.e. label noise) and, with a probability that depends on the label,
a neutral sentence mentioning an identity group (the shortcut). In the train split exactly a fraction `rho` of
the toxic and `1 - rho` of the non-toxic comments mention an identity; val and test are balanced (0.5), so a
model that learned "identity word => toxic" fails on the bias-conflicting groups while one that reads the core
sentence does not. Rater fractions (toxicity, identities) are k/n for n raters, as in the real file.

The file is marked as synthetic by a sibling SYNTHETIC.txt (written before the CSV) and by ids from 900000000.
The column list and order follow WILDS' dataset_preprocessing/civilcomments (process_labeled.py,
attr_definitions.py). Output is a deterministic function of (n, rho, seed, noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bise_cli.core.errors import BiseError
from bise_cli.core.files import write_text

LABEL_COLUMNS = ["toxicity", "severe_toxicity", "obscene", "sexual_explicit", "identity_attack", "insult",
                 "threat"]
IDENTITY_COLUMNS = [
    "male", "female", "transgender", "other_gender", "heterosexual", "homosexual_gay_or_lesbian", "bisexual",
    "other_sexual_orientation", "christian", "jewish", "muslim", "hindu", "buddhist", "atheist",
    "other_religion", "black", "white", "asian", "latino", "other_race_or_ethnicity", "physical_disability",
    "intellectual_or_learning_disability", "psychiatric_or_mental_illness", "other_disability",
]
# WILDS' aggregates (attr_definitions.AGGREGATE_ATTRS) and demographic categories (GROUP_ATTRS), file order.
AGGREGATES = {
    "LGBTQ": ["homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation", "transgender",
              "other_gender"],
    "other_religions": ["jewish", "hindu", "buddhist", "atheist", "other_religion"],
    "asian_latino_etc": ["asian", "latino", "other_race_or_ethnicity"],
    "disability_any": ["physical_disability", "intellectual_or_learning_disability",
                       "psychiatric_or_mental_illness", "other_disability"],
    "identity_any": IDENTITY_COLUMNS,
}
CATEGORIES = {
    "gender": ["male", "female", "transgender", "other_gender"],
    "orientation": ["heterosexual", "homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation"],
    "religion": ["christian", "jewish", "muslim", "hindu", "buddhist", "atheist", "other_religion"],
    "race": ["black", "white", "asian", "latino", "other_race_or_ethnicity"],
    "disability": AGGREGATES["disability_any"],
}
AGGREGATE_COLUMNS = [*AGGREGATES, "num_identities", "more_than_one_identity",
                     *(f"na_{c}" for c in CATEGORIES)]
KAGGLE_COLUMNS = ["id", "comment_text", "split", "created_date", "publication_id", "parent_id", "article_id",
                  "rating", "funny", "wow", "sad", "likes", "disagree", *LABEL_COLUMNS, *IDENTITY_COLUMNS,
                  "identity_annotator_count", "toxicity_annotator_count"]
COLUMNS = [*KAGGLE_COLUMNS, *AGGREGATE_COLUMNS]  # after the unnamed index column
SYNTHETIC_ID_START = 900_000_000

# Identity mentions: (identity column, words). Every one of BISE's 8 coarse identities is covered.
IDENTITIES = [
    ("male", "men"), ("male", "fathers"), ("female", "women"), ("female", "mothers"),
    ("homosexual_gay_or_lesbian", "gay people"), ("transgender", "transgender people"),
    ("christian", "christians"), ("christian", "catholics"), ("muslim", "muslims"),
    ("muslim", "the muslim community"), ("jewish", "jews"), ("hindu", "hindus"), ("atheist", "atheists"),
    ("black", "black people"), ("black", "black voters"), ("white", "white people"),
    ("white", "white voters"),
]
MENTIONS = ["as someone who works with a lot of {g},", "my neighbours are {g}, and", "speaking about {g},",
            "the article mentions {g}.", "i talked to some {g} about this.", "plenty of {g} live here too."]
TOPICS = ["the new bus line", "the city council vote", "the school budget", "the housing plan",
          "the election", "the fishing season", "the local team", "the tax proposal", "the road repairs",
          "the new library", "the ferry schedule", "the pipeline project"]
OPENERS = ["about {t}:", "regarding {t},", "on {t}:", "re {t} -", "as for {t},"]
TOXIC = ["you are a pathetic idiot.", "this is the dumbest garbage i have ever read.",
         "shut up, you stupid clown.", "what a disgusting, worthless take.",
         "only a moron would write this trash.", "you ignorant fool, get lost.",
         "the author is a complete imbecile.", "what a load of crap from a bunch of losers.",
         "go away, nobody cares about your idiotic opinion.", "this is beyond stupid, you clueless hack."]
FRIENDLY = ["thanks for the thoughtful article.", "i agree with most of this, well written.",
            "great point about the costs.", "this was a helpful summary of the meeting.",
            "i appreciate the balanced reporting.", "interesting idea, i would like to read more.",
            "i respectfully disagree, but the numbers are worth discussing.",
            "well said, and thanks for sharing.",
            "good to see people talking about this calmly.", "hope the council reads these comments."]


def _fraction(rng: np.random.Generator, raters: int, positive: bool) -> float:
    """A rater fraction k / raters, >= 0.5 when `positive`, else < 0.5 (often 0, as in the real data)."""
    low = -(-raters // 2)  # smallest k with k / raters >= 0.5
    k = rng.integers(low, raters + 1) if positive else (0 if rng.random() < 0.6 else rng.integers(1, low))
    return round(float(k) / raters, 6)


def _comment(rng: np.random.Generator, toxic_text: bool, mention: str | None) -> str:
    """One short comment: opener + core sentence, with the identity sentence before or after it."""
    parts = [rng.choice(OPENERS).format(t=rng.choice(TOPICS)), rng.choice(TOXIC if toxic_text else FRIENDLY)]
    if mention is not None:
        sentence = rng.choice(MENTIONS).format(g=mention)
        parts.insert(0 if rng.random() < 0.5 else 1, sentence)
    return " ".join(parts)


def _assign(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    """Boolean array with exactly round(fraction * count) True values in random positions."""
    flags = np.zeros(count, dtype=bool)
    flags[: int(round(fraction * count))] = True
    return rng.permutation(flags)


def _design(rng: np.random.Generator, n: int, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split names (60/20/20), labels (half toxic) and identity-mention flags per row."""
    splits = np.array(["train"] * n, dtype=object)
    order = rng.permutation(n)
    n_train, n_val = int(round(0.6 * n)), int(round(0.2 * n))
    splits[order[n_train:n_train + n_val]] = "val"
    splits[order[n_train + n_val:]] = "test"
    toxic = np.zeros(n, dtype=bool)
    mention = np.zeros(n, dtype=bool)
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(splits == split)
        toxic[rows] = _assign(rng, len(rows), 0.5)
        for label in (True, False):
            cell = rows[toxic[rows] == label]
            p_mention = (rho if label else 1 - rho) if split == "train" else 0.5
            mention[cell] = _assign(rng, len(cell), p_mention)
    return splits, toxic, mention


def _row(rng: np.random.Generator, index: int, split: str, toxic: bool, mention: bool, noise: float) -> dict:
    """All columns of one comment."""
    column, words = IDENTITIES[rng.integers(len(IDENTITIES))] if mention else (None, None)
    toxic_text = toxic if rng.random() >= noise else not toxic  # label noise: the text shows the other tone
    raters, id_raters = int(rng.integers(4, 11)), int(rng.integers(4, 11))
    toxicity = _fraction(rng, raters, toxic)
    row = dict.fromkeys(COLUMNS, 0.0)
    row.update(id=SYNTHETIC_ID_START + index, comment_text=_comment(rng, toxic_text, words), split=split,
               created_date=f"2017-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} 12:00:00.000000+00",
               publication_id=int(rng.choice([21, 54, 102])), parent_id=float("nan"),
               article_id=int(rng.integers(100_000, 400_000)), rating="approved",
               funny=0, wow=0, sad=0, likes=int(rng.integers(0, 5)), disagree=0,
               identity_annotator_count=id_raters, toxicity_annotator_count=raters, toxicity=toxicity)
    for label in ("insult", "obscene", "severe_toxicity", "identity_attack"):
        row[label] = round(toxicity * float(rng.uniform(0.0, 1.0 if label == "insult" else 0.3)), 6)
    if column is not None:
        row[column] = _fraction(rng, id_raters, True)
    return _add_aggregates(row)


def _add_aggregates(row: dict) -> dict:
    """WILDS' derived columns (process_labeled.augment_df): aggregates, identity counts, na_<category>."""
    present = {c for c in IDENTITY_COLUMNS if row[c] >= 0.5}
    for name, members in AGGREGATES.items():
        row[name] = int(bool(present.intersection(members)))
    row["num_identities"] = float(len(present))
    row["more_than_one_identity"] = len(present) > 1
    for category, members in CATEGORIES.items():
        row[f"na_{category}"] = int(not present.intersection(members))
    return row


def write_synthetic_civilcomments(path: str | Path, n: int, rho: float, seed: int = 0,
                                  noise: float = 0.15) -> Path:
    """Write `n` synthetic comments (60/20/20 train/val/test, identity/toxicity correlation `rho`)."""
    if not 0.0 <= rho <= 1.0 or not 0.0 <= noise < 0.5 or n < 1:
        raise BiseError(f"synthetic CivilComments needs n >= 1, 0 <= rho <= 1 and 0 <= noise < 0.5 "
                        f"(got n={n}, rho={rho}, noise={noise})")
    rng = np.random.default_rng(seed)
    splits, toxic, mention = _design(rng, n, rho)
    rows = [_row(rng, i, splits[i], bool(toxic[i]), bool(mention[i]), noise) for i in range(n)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The marker goes first so that no reader ever sees the CSV without it.
    (path.parent / "SYNTHETIC.txt").write_text(
        f"SYNTHETIC CivilComments-format data generated by bise (n={n}, rho={rho}, seed={seed}, "
        f"noise={noise}); template sentences, not real comments.\n")
    # Atomic (temporary file, then rename): parallel runs may write the same file. Unnamed index first, as in WILDS.
    write_text(path, pd.DataFrame(rows, columns=COLUMNS).to_csv())
    return path
