"""A manifest's images: scanned (content hash and size), decoded once to 8-bit RGB into a uint8 memory-mapped
cache keyed by the files' contents, the memo of files that do not decode, and the normalisation and augmentation
the splits apply per batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bise_cli.core.errors import BiseError
from bise_cli.core.files import write_text
from bise_cli.core.progress import progress_bar
from bise_cli.data.augment import crop_flip, hflip
from bise_cli.data.image_cache import DEFAULT_CACHE_DIR, cached_memmap, digest

NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "none": ((0.0,) * 3, (1.0,) * 3)}
AUGMENTATIONS = {"none": None, "hflip": hflip, "crop_flip": crop_flip}
MAX_LISTED = 5          # unreadable files named in one error line
CACHE_VERSION = 2      # 2: 16-bit images scaled, not clipped
UNDECODABLE = "undecodable-images.json"
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")   # PIL's modes of 16-bit unsigned grey pixels


class Normalize:
    """uint8 (B, 3, H, W) -> float / 255, then (x - mean) / std per channel (a class, not a closure: picklable)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics follow the batch (a split moved to the GPU encodes there) without blocking the host.
        return (x.float().div_(255.0) - self.mean.to(x.device, non_blocking=True)) / self.std.to(x.device,
                                                                                                 non_blocking=True)


def _scan(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(sha256 of the bytes, (width, height), None) or (None, None, why the file cannot be opened)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, None, error.strerror or type(error).__name__
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()   # checks the structure (PNG CRCs) without decoding the pixels
    except Exception as error:  # PIL signals a bad file with OSError, SyntaxError, struct.error, ... alike
        return None, None, str(error).splitlines()[0] if str(error) else type(error).__name__
    return hashlib.sha256(data).hexdigest(), size, None


def scan_images(paths: list[Path], workers: int) -> list[tuple]:
    """`_scan` of every path, in parallel threads (reading files releases the GIL), with a progress bar."""
    chunk, results = 1024, []
    with ThreadPoolExecutor(workers) as pool, progress_bar("checking images", 1, math.ceil(len(paths) / chunk)) as bar:
        for start in range(0, len(paths), chunk):
            results += pool.map(_scan, paths[start:start + chunk])
            bar.advance_batch()
        bar.advance_epoch(f"{len(paths)} files")
    return results


def _undecodable_path(cache_dir) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / UNDECODABLE


def read_undecodable(cache_dir) -> dict[str, str]:
    """{sha256 of a file's bytes: decoder error} of files that opened but whose pixels did not decode."""
    path = _undecodable_path(cache_dir)
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_undecodable(cache_dir, found: dict[str, str]) -> None:
    """Add `found` to the memo (read again first: a parallel run may have added entries), written atomically."""
    merged = {**read_undecodable(cache_dir), **found}
    write_text(_undecodable_path(cache_dir), json.dumps(merged, indent=0, sort_keys=True))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit grey images (`I;16*`, e.g. 16-bit PNGs) are scaled from 0..65535 to 0..255
    (PIL's own conversion would clip every value above 255 to white); 32-bit integer and float pixels (`I`, `F`)
    have no fixed range and are refused (ValueError: the file is reported as not decoding)."""
    if image.mode in SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (mode "
                         f"{image.mode}) have no fixed range; convert the image to 8- or 16-bit")
    return image.convert("RGB")


def _decode(path: Path, size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        image = to_rgb(image)
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image).transpose(2, 0, 1)


def image_array(paths: list[Path], shas: list[str], shape: tuple[int, int], size: int | None, cache_dir,
                workers: int) -> tuple[np.ndarray, bool, dict[str, str]]:
    """(uint8 (N, 3, H, W) memmap of `paths` in order, cache hit, {sha: error} of files that failed to decode).

    Keyed by the file contents and the output size only. A file that fails to decode becomes a zero image and is
    added to the undecodable memo before its chunk counts as done, so an interrupted fill resumes consistently."""
    key = digest({"kind": "table-images", "version": CACHE_VERSION, "shape": list(shape), "resize": size,
                  "files": hashlib.sha256("\n".join(shas).encode()).hexdigest()})
    failed: dict[str, str] = {}

    def one(index: int) -> np.ndarray:
        try:
            return _decode(paths[index], size)
        except Exception as error:  # any decoder failure (truncated data, bad marker): remembered, not fatal here
            failed[shas[index]] = str(error).splitlines()[0] if str(error) else type(error).__name__
            return np.zeros((3, *shape), np.uint8)

    def fill(start: int, stop: int) -> np.ndarray:
        before = len(failed)
        with ThreadPoolExecutor(workers) as pool:
            block = np.stack(list(pool.map(one, range(start, stop))))
        if len(failed) > before:
            _remember_undecodable(cache_dir, failed)
        return block

    kind = f"table{shape[0]}x{shape[1]}"
    array, hit = cached_memmap(cache_dir, kind, key, (len(paths), 3, *shape), fill,
                               description=f"decoding {len(paths)} images at {shape[0]}x{shape[1]}")
    return array, hit, failed


def _unreadable_error(paths: list[str], reasons: list[str]) -> BiseError:
    shown = "; ".join(f"{p} ({r})" for p, r in zip(paths[:MAX_LISTED], reasons[:MAX_LISTED], strict=False))
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return BiseError(f"{len(paths)} unreadable image(s): {shown}{more}; fix or remove them, or set "
                     "dataset.skip_unreadable=true to drop them")


def _image_shape(sizes: list[tuple[int, int]], names: list[str], image_size: int | None) -> tuple[int, int]:
    """(H, W) of the cached images: image_size squared, else the one size every image has."""
    if image_size is not None:
        return image_size, image_size
    first = sizes[0]
    other = next((i for i, s in enumerate(sizes) if s != first), None)
    if other is not None:
        raise BiseError(f"images differ in size ({first[0]}x{first[1]} in {names[0]}, {sizes[other][0]}x"
                        f"{sizes[other][1]} in {names[other]}); set dataset.image_size=N to squash all to N x N")
    return first[1], first[0]


def _gather(array: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """Rows `index` of a (memory-mapped) array, read in ascending order (sequential on disk), then reordered."""
    order = np.argsort(index, kind="stable")
    out = np.empty((len(index), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[index[order]]
    return torch.from_numpy(out)


class ImageRows:
    """The manifest's image files: their scan, which ones are unreadable, and the uint8 cache of the used ones."""

    def __init__(self, files: list[Path], scans: list[tuple], image_size: int | None, cache_dir, workers: int):
        self.files, self.scans, self.image_size = files, scans, image_size
        self.cache_dir, self.workers = cache_dir, workers
        self.array, self.position, self.shape, self.hit = None, None, None, False

    def unreadable(self, skip: bool) -> list[int]:
        """Rows whose file cannot be opened or is known not to decode; a BiseError listing them unless `skip`."""
        known = read_undecodable(self.cache_dir)
        reasons = [error or (f"does not decode: {known[sha]}" if sha in known else None)
                   for sha, _, error in self.scans]
        bad = [i for i, reason in enumerate(reasons) if reason]
        if bad and not skip:
            raise _unreadable_error([str(self.files[i]) for i in bad], [reasons[i] for i in bad])
        return bad

    def load(self, frames: dict[str, pd.DataFrame], max_samples: int | None, skip: bool) -> bool:
        """Decode (or map) the cache; False when files failed to decode just now and were skipped (draw the splits
        again), a BiseError naming them unless `skip`."""
        needed = np.unique(np.concatenate([f.index.to_numpy() for f in frames.values()]))
        # Uncapped, the cache holds every file that opens (undecodable ones as zero images), so its key does not
        # depend on which rows a build drops; a capped run caches only the rows it uses.
        if max_samples is None:
            cached = np.array([i for i, scan in enumerate(self.scans) if scan[0]], np.int64)
        else:
            cached = needed
        self.shape = _image_shape([self.scans[i][1] for i in cached], [self.files[i].name for i in cached],
                                  self.image_size)
        self.array, self.hit, failed = image_array([self.files[i] for i in cached], [self.scans[i][0] for i in cached],
                                                   self.shape, self.image_size, self.cache_dir, self.workers)
        self.position = pd.Series(np.arange(len(cached)), index=cached)
        broken = [i for i in needed if self.scans[i][0] in failed]
        if broken and not skip:
            raise _unreadable_error([str(self.files[i]) for i in broken],
                                    [f"does not decode: {failed[self.scans[i][0]]}" for i in broken])
        return not broken

    def gather(self, rows: pd.Index) -> torch.Tensor:
        """The cached images of manifest rows `rows`, in that order."""
        return _gather(self.array, self.position[rows].to_numpy(np.int64, copy=True))
