"""A manifest's texts: tokenised once with the token cache (`tokenize.tokenize_texts`), gathered per split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bise_cli.data.tokenize import tokenize_texts


class TextRows:
    """The texts of the manifest rows the splits use, tokenised once (cached by content under `cache_dir/tokens`)."""

    def __init__(self, texts: pd.Series, frames: dict[str, pd.DataFrame], tokenizer: str, max_length: int,
                 cache_dir):
        needed = np.unique(np.concatenate([f.index.to_numpy() for f in frames.values()]))
        self.tokens, self.seconds = tokenize_texts(texts.astype(str).iloc[needed].tolist(), tokenizer, max_length,
                                                   Path(cache_dir) / "tokens", "table")
        self.position = pd.Series(np.arange(len(needed)), index=needed)

    def gather(self, rows: pd.Index) -> torch.Tensor:
        """The token ids of manifest rows `rows`, in that order."""
        return self.tokens[torch.from_numpy(self.position[rows].to_numpy(np.int64, copy=True))]
