"""Content fingerprints (sha256) of the data a run actually loaded.

The dataset fingerprint is computed once per run and included in the key of every stage, so a dataset root
holding different images (or a changed preprocessing) can never reuse cached results computed on other data.
Tensors are hashed with their dtype and shape, so the same bytes viewed as another dtype or shape differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 20  # 1 MiB


def _update(digest, tensor: torch.Tensor) -> None:
    """Feed one tensor's dtype, shape and raw bytes (contiguous, on the CPU) into `digest`."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
    # A uint8 view works for every dtype (bfloat16 and bool included) and hashes without a copy.
    digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 hex digest over the dtype, shape and bytes of `tensors`, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        _update(digest, tensor)
    return digest.hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """sha256 hex digest of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_split(split: Any) -> str:
    """Fingerprint of a split's `x`, `y`, `b` and, if it has any, its `meta` tensors (by sorted name)."""
    digest = hashlib.sha256()
    for tensor in (split.x, split.y, split.b):
        _update(digest, tensor)
    meta = getattr(split, "meta", None) or {}
    for name in sorted(meta):  # per-sample metadata (e.g. identity columns) feeds group metrics
        digest.update(f"meta {name};".encode())
        _update(digest, meta[name])
    return digest.hexdigest()


def fingerprint_bundle(bundle: Any) -> dict:
    """{"sha256": overall digest, "splits": {split name: digest}} of a bundle's `.splits`."""
    seen: dict[int, str] = {}  # splits may alias each other (e.g. search is train): hash each object once
    splits = {}
    for name in sorted(bundle.splits):
        split = bundle.splits[name]
        if id(split) not in seen:
            seen[id(split)] = fingerprint_split(split)
        splits[name] = seen[id(split)]
    overall = hashlib.sha256("".join(f"{name}={hex_}\n" for name, hex_ in splits.items()).encode()).hexdigest()
    return {"sha256": overall, "splits": splits}
