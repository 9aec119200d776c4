"""Multi-Color MNIST (DebiAN, Li et al., ECCV 2022), the two-bias benchmark BISE evaluates on.

Each 28x28 MNIST digit stays white (pixels of exactly 255) on a background whose left half (columns 0-13) has a
"left colour" and whose right half (columns 14-27) has a "right colour". Both colours are biases: for digit y
the left colour is y with probability rho_L (0.99 in training) and each other colour with (1 - rho_L) / 9, the
right colour likewise with rho_R (0.95), independently given y. The right palette is the complement 1 - left of
the left palette (the ten LfF colours), so the two sides never share a colour.

Construction, following DebiAN's `make_multi_color_mnist.py`:
- colour labels come from a deterministic quota rule (`assign_colours`), not from sampling;
- each image gets its own colour jitter N(0, std) per RGB channel and side, std set by the severity (4 -> 0.005);
- pixel rule: out = clip(v + [v != 255] * 255 * colour, 0, 255), truncated to uint8, so anti-aliased stroke
  edges count as background and saturate toward white.

Splits: `train` = the 60k MNIST training digits at (rho_L, rho_R); `search` = the same Split object (BISE
searches its masks on the training set for this dataset); `test` = the 10k MNIST test digits at rho 0.1 on both
sides, i.e. uniform over the 1,000 (digit, left, right) cells. There is no validation split in the paper: BISE
keeps the masks of the last epoch. `b` is a LongTensor (N, 2) = [left colour, right colour].

`val_holdout` (our addition, a deviation from the paper's protocol; 0 = the paper): a seeded random set of that
many training digits is removed from `train` and coloured like the test split (rho 0.1 on both sides, the same
quota rule), so `val` is uniform over the (digit, left, right) cells, as BiasedMNIST's validation split is
unbiased. The remaining training digits are coloured at (rho_L, rho_R) as usual, so the training group shares
stay the paper's while the training set is smaller by `val_holdout` digits.

`load_debian_folder` reads the released DebiAN tarball instead (its `valid` split is the test set); its pixels
are the published ones, whereas `build_multicolor_mnist` regenerates them with a seeded jitter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bise_cli.core.errors import BiseError, check_choice, check_fraction
from bise_cli.data.base import DatasetBundle, Split
from bise_cli.data.mnist_source import MNIST_SOURCES, Digits, load_digits
from bise_cli.data.registry import spec

DATASET = spec("multicolor_mnist")
NUM_CLASSES = DATASET.num_classes
# The left palette: LfF's / DebiAN's `colors.th` (10 x 3, RGB in [0, 1]), decoded and rounded to 6 decimals
# (255 * 1e-6 is far below one grey level); the right palette is 1 - left.
PALETTE = torch.tensor([
    [0.983682, 0.312519, 0.168575],
    [0.990530, 0.915605, 0.351512],
    [0.672964, 0.461070, 0.579808],
    [0.783252, 0.831556, 0.601329],
    [0.088016, 0.777963, 0.981808],
    [0.321393, 0.961055, 0.446450],
    [0.024616, 0.235650, 0.758666],
    [0.555247, 0.101580, 0.761763],
    [0.207723, 0.392949, 0.018702],
    [0.833658, 0.202409, 0.266943],
], dtype=torch.float32)
RIGHT_PALETTE = 1 - PALETTE
# Std of the per-image colour jitter by severity (DebiAN); the BISE setting is severity 4.
SEVERITY_STD = {1: 0.05, 2: 0.02, 3: 0.01, 4: 0.005, 5: 0.002}
TEST_RHO = 0.1
SOURCES = (*MNIST_SOURCES, "debian")
GROUPS = ("alig_alig", "alig_conf", "conf_alig", "conf_conf")  # (left, right) aligned/conflicting, BISE's names
MIN_SAMPLES = 20
# Images are coloured in chunks so that the float32 intermediate stays small (~75 MB per chunk).
CHUNK = 8192
# Separate random streams: the training subset and each split's jitter never depend on one another.
STREAMS = {"subset": 0, "train": 1, "test": 2, "val_pick": 3, "val": 4}


# ------------------------------------------------------------------------------------------- validation

def check_rho(what: str, rho) -> float:
    """`rho` as a float in (0, 1], or a one-line BiseError naming `what`."""
    return check_fraction(what, rho)


def check_severity(severity) -> int:
    """Severity as an int in 1..5, or a one-line BiseError."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITY_STD:
        raise BiseError(f"dataset.severity must be one of 1, 2, 3, 4, 5, got {severity!r}")
    return int(severity)


# ------------------------------------------------------------------------------------------- construction

def _bias_ratios(rho: float, num_classes: int) -> np.ndarray:
    # P(colour = k | digit = y): rho on the diagonal, (1 - rho) / (C - 1) elsewhere; written as in DebiAN so the
    # floating-point values (hence the rounded quotas) are the same.
    eye = np.eye(num_classes)
    return rho * eye + (1 - rho) / (num_classes - 1) * (1 - eye)


def assign_colours(labels: np.ndarray | torch.Tensor, rho_left: float, rho_right: float,
                   num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Left and right colour indices of every sample by DebiAN's deterministic quota rule (no randomness).

    Per digit y, the joint law of the 100 (left, right) pairs is the product of the two sides' laws, flattened
    with the left colour as the major index. The cumulative quotas n_y * cumsum(p) are rounded half-to-even
    (numpy's `round`, as DebiAN does), and the k-th class-y sample in dataset order gets the first pair whose
    cumulative quota exceeds k. On MNIST's class counts this gives the published group sizes."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BiseError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    joint = _bias_ratios(rho_left, num_classes)[:, :, None] * _bias_ratios(rho_right, num_classes)[:, None, :]
    joint = joint.reshape(num_classes, num_classes * num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    quotas = (counts[:, None] * np.cumsum(joint, axis=1)).round()
    left = np.empty(len(labels), dtype=np.int64)
    right = np.empty(len(labels), dtype=np.int64)
    for y in range(num_classes):
        index = np.flatnonzero(labels == y)
        # side="right": the first pair whose quota is strictly greater than k. The clip only guards against a
        # last quota rounded below n_y (never the case: cumsum ends at 1 and n_y is an integer).
        pair = np.minimum(np.searchsorted(quotas[y], np.arange(len(index)), side="right"), joint.shape[1] - 1)
        left[index], right[index] = pair // num_classes, pair % num_classes
    return left, right


def colourise(images: torch.Tensor | np.ndarray, left: torch.Tensor | np.ndarray, right: torch.Tensor | np.ndarray,
              severity: int = 4, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
    """uint8 (N, 28, 28) digits -> uint8 (N, 3, 28, 28) CHW, DebiAN's colouring with per-image colour jitter.

    Each image's left colour is PALETTE[left] + N(0, std) per RGB channel, clamped to [0, 1]; the right colour
    is RIGHT_PALETTE[right] with its own draw. A pixel v counts as background iff v != 255 and becomes
    clip(v + 255 * colour, 0, 255), truncated to uint8; pixels of 255 stay white. The jitter comes from
    `generator` (or a generator seeded with `seed`; 0 if neither is given): the original generator draws it
    unseeded, so only the released files reproduce its exact pixels. Float32 arithmetic in DebiAN's order."""
    images = torch.as_tensor(images)
    left, right = torch.as_tensor(left).long(), torch.as_tensor(right).long()
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise BiseError(f"colourise expects uint8 images of shape (N, H, W), got {images.dtype} {tuple(images.shape)}")
    n, height, width = images.shape
    if width % 2:
        raise BiseError(f"colourise needs an even image width (two halves), got {width}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    std = SEVERITY_STD[check_severity(severity)]
    # One (left, right) x RGB draw per image, as DebiAN draws randn(3) for the left then the right side.
    noise = torch.randn((n, 2, 3), generator=generator) * std
    left_colour = torch.clamp(PALETTE[left] + noise[:, 0], 0, 1)
    right_colour = torch.clamp(RIGHT_PALETTE[right] + noise[:, 1], 0, 1)
    half = width // 2
    out = torch.empty((n, 3, height, width), dtype=torch.uint8)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        raw = images[start:stop].float().unsqueeze(1)  # (B, 1, H, W), 0..255
        # 255 * colour per column: the left colour on columns < W/2, the right colour on the others.
        shift = torch.cat([(255 * left_colour[start:stop])[:, :, None].expand(-1, -1, half),
                           (255 * right_colour[start:stop])[:, :, None].expand(-1, -1, width - half)], dim=2)
        coloured = torch.where(raw != 255, raw + shift[:, :, None, :], raw)
        # Clamp then truncate, as DebiAN's np.array(...).astype(np.uint8) on a float image in [0, 255].
        out[start:stop] = coloured.clamp_(0, 255).to(torch.uint8)
    return out


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float in [0, 1] (torchvision's ToTensor, the only transform DebiAN and BISE use)."""
    return x.float().div_(255.0)


def preprocessing() -> dict:
    """What `encode` does, for exported models: input = (uint8 RGB * scale - mean) / std, channels first."""
    return {"kind": "image", "size": [3, 28, 28], "scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3,
            "resize": None, "class_names": [str(digit) for digit in range(NUM_CLASSES)]}


def group_counts(y: torch.Tensor, b: torch.Tensor) -> dict[str, int]:
    """Sizes of the four (left, right) aligned/conflicting groups, keyed by BISE's group names."""
    left_aligned, right_aligned = b[:, 0] == y, b[:, 1] == y
    masks = (left_aligned & right_aligned, left_aligned & ~right_aligned, ~left_aligned & right_aligned,
             ~left_aligned & ~right_aligned)
    return {name: int(mask.sum()) for name, mask in zip(GROUPS, masks, strict=True)}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream]])


def _torch_generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(seed, stream).integers(2**62)))


def check_max_samples(max_samples) -> int | None:
    """None, or an integer of at least MIN_SAMPLES; else a one-line BiseError."""
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < MIN_SAMPLES:
        raise BiseError(f"dataset.max_samples must be an integer >= {MIN_SAMPLES} (or null for all), "
                        f"got {max_samples!r}")
    return int(max_samples)


def check_val_holdout(val_holdout) -> int:
    """The number of held-out validation digits: an integer >= 0 (0 = none, the paper); else a BiseError."""
    if isinstance(val_holdout, bool) or not isinstance(val_holdout, (int, np.integer)) or val_holdout < 0:
        raise BiseError(f"dataset.val_holdout must be an integer >= 0 (0 = no validation split, the paper), "
                        f"got {val_holdout!r}")
    return int(val_holdout)


def holdout_index(n: int, val_holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): a seeded random choice of `val_holdout` of `n` rows and the rest, each in increasing
    order (the quota rule sees both in dataset order). Needs at least MIN_SAMPLES rows left for training."""
    if val_holdout > n - MIN_SAMPLES:
        raise BiseError(f"dataset.val_holdout={val_holdout} leaves fewer than {MIN_SAMPLES} of the {n} training "
                        "digits for training")
    chosen = np.zeros(n, dtype=bool)
    chosen[_rng(seed, "val_pick").permutation(n)[:val_holdout]] = True
    return torch.from_numpy(np.flatnonzero(~chosen)), torch.from_numpy(np.flatnonzero(chosen))


def subset_index(n: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """A seeded random subset of `max_samples` of `n` rows, in increasing order (so the quota rule still sees
    the samples in dataset order); None when no cap applies."""
    max_samples = check_max_samples(max_samples)
    if max_samples is None or max_samples >= n:
        return None
    return torch.from_numpy(np.sort(_rng(seed, "subset").permutation(n)[:int(max_samples)]))


def _coloured_split(images: torch.Tensor, labels: torch.Tensor, rho_left: float, rho_right: float, severity: int,
                    generator: torch.Generator) -> Split:
    left, right = assign_colours(labels.numpy(), rho_left, rho_right)
    b = torch.from_numpy(np.stack([left, right], axis=1))
    return Split(colourise(images, b[:, 0], b[:, 1], severity, generator=generator), labels.clone(), b, encode)


def _bundle(splits: dict[str, Split], info: dict) -> DatasetBundle:
    info["groups"] = {name: group_counts(split.y, split.b) for name, split in splits.items() if name != "search"}
    info["sizes"] = {name: len(split) for name, split in splits.items()}
    info["preprocessing"] = preprocessing()
    # nominal_rho: the training correlations the data was built with (BISE's reweighting option 3 uses them).
    return DatasetBundle(DATASET.name, splits, NUM_CLASSES, NUM_CLASSES, info, bias_names=DATASET.bias_names,
                         nominal_rho=(info["rho_left"], info["rho_right"]))


def build_multicolor_mnist(digits: Digits, *, seed: int, rho_left: float = 0.99, rho_right: float = 0.95,
                           severity: int = 4, max_samples: int | None = None,
                           test_rho: float = TEST_RHO, val_holdout: int = 0) -> DatasetBundle:
    """The train / search / test splits of Multi-Color MNIST built from `digits` (see the module docstring).

    `max_samples` keeps a seeded random subset of the training digits (original order), to which the quota
    rule is then applied; the test split always uses every test digit. `val_holdout` > 0 then moves that many
    of those digits into a `val` split coloured like the test split (a deviation from the paper)."""
    rho_left = check_rho("dataset.rho_left", rho_left)
    rho_right = check_rho("dataset.rho_right", rho_right)
    test_rho = check_rho("dataset.test_rho", test_rho)
    severity = check_severity(severity)
    val_holdout = check_val_holdout(val_holdout)
    images, labels = digits.train_images, digits.train_labels
    keep = subset_index(len(labels), max_samples, seed)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    splits = {}
    if val_holdout:
        rest, held = holdout_index(len(labels), val_holdout, seed)
        # Coloured as the test split is (uniform cells), with its own jitter stream.
        splits["val"] = _coloured_split(images[held], labels[held], test_rho, test_rho, severity,
                                        _torch_generator(seed, "val"))
        images, labels = images[rest], labels[rest]
    train = _coloured_split(images, labels, rho_left, rho_right, severity, _torch_generator(seed, "train"))
    test = _coloured_split(digits.test_images, digits.test_labels, test_rho, test_rho, severity,
                           _torch_generator(seed, "test"))
    info = {"source": digits.source, "location": digits.location, "severity": severity, "rho_left": rho_left,
            "rho_right": rho_right, "test_rho": test_rho, "jitter_seeded": True, "train_digits": len(labels)}
    if val_holdout:
        info["val_holdout"] = val_holdout  # a deviation from the paper's protocol (it has no validation split)
    return _bundle({"train": train, "search": train, **splits, "test": test}, info)


# ------------------------------------------------------------------------------------------ released files

def debian_folder_name(rho_left: float = 0.99, rho_right: float = 0.95, severity: int = 4) -> str:
    """DebiAN's folder name, e.g. ColoredMNIST-SkewedA0.01-SkewedB0.05-Severity4 (skew = 1 - rho)."""
    return (f"ColoredMNIST-SkewedA{round(1 - rho_left, 4):g}-SkewedB{round(1 - rho_right, 4):g}"
            f"-Severity{severity}")


def _find_debian_folder(root: Path, name: str) -> Path:
    # The tarball extracts to multi_color_mnist/<name>/; accept the configuration folder itself too.
    for candidate in (root, root / name, root / "multi_color_mnist" / name):
        if (candidate / "train").is_dir() or (candidate / "valid").is_dir():
            return candidate
    if not root.exists():
        raise BiseError(f"dataset.root {str(root)!r} does not exist")
    raise BiseError(f"no DebiAN Multi-Color MNIST folder in {root}: expected train/ and valid/ there or in "
                    f"{root / name}")


def _read_debian_split(folder: Path, split: str) -> Split:
    paths = {kind: folder / split / f"{kind}.npy" for kind in ("images", "attrs")}
    for path in paths.values():
        if not path.is_file():
            raise BiseError(f"missing {path} (DebiAN Multi-Color MNIST layout: {split}/images.npy, {split}/attrs.npy)")
    try:
        images = np.load(paths["images"], allow_pickle=False)
        attrs = np.load(paths["attrs"], allow_pickle=False)
    except (ValueError, OSError) as error:
        raise BiseError(f"cannot read {folder / split}/*.npy as plain arrays ({error})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (28, 28, 3):
        raise BiseError(f"{paths['images']} must be uint8 of shape (N, 28, 28, 3), got {images.dtype} "
                        f"{images.shape}")
    if not np.issubdtype(attrs.dtype, np.integer) or attrs.ndim != 2 or attrs.shape[1] != 3:
        raise BiseError(f"{paths['attrs']} must be integers of shape (N, 3) (digit, left, right), got "
                        f"{attrs.dtype} {attrs.shape}")
    if len(attrs) != len(images):
        raise BiseError(f"{folder / split}: {len(images)} images but {len(attrs)} attribute rows")
    if attrs.size and (attrs.min() < 0 or attrs.max() >= NUM_CLASSES):
        raise BiseError(f"{paths['attrs']} values must be in 0..{NUM_CLASSES - 1}, got {attrs.min()}..{attrs.max()}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # HWC -> CHW
    attrs = torch.from_numpy(attrs.astype(np.int64))
    return Split(x, attrs[:, 0].clone(), attrs[:, 1:].clone(), encode)


def load_debian_folder(root: str | Path, *, rho_left: float = 0.99, rho_right: float = 0.95, severity: int = 4,
                       max_samples: int | None = None, seed: int = 0) -> DatasetBundle:
    """The released DebiAN Multi-Color MNIST (`train/` and `valid/` .npy files; `valid` is the test split).

    `root` is the configuration folder itself, its parent, or the parent of `multi_color_mnist/`; the folder
    name is derived from rho_left, rho_right and severity. `max_samples` subsets `train` as in the builder."""
    folder = _find_debian_folder(Path(root), debian_folder_name(rho_left, rho_right, severity))
    train = _read_debian_split(folder, "train")
    keep = subset_index(len(train), max_samples, seed)
    if keep is not None:
        train = train.subset(keep)
    test = _read_debian_split(folder, "valid")
    info = {"source": "debian", "location": str(folder), "severity": severity, "rho_left": rho_left,
            "rho_right": rho_right, "test_rho": TEST_RHO, "jitter_seeded": False, "train_digits": len(train)}
    return _bundle({"train": train, "search": train, "test": test}, info)


def build(source: str, root: str | Path, seed: int, max_samples: int | None = None, *, fallback: str = "none",
          rho_left: float = 0.99, rho_right: float = 0.95, severity: int = 4,
          test_rho: float = TEST_RHO, val_holdout: int = 0) -> DatasetBundle:
    """Multi-Color MNIST from `source`: MNIST digits (auto / files / download / embedded, coloured here) or the
    released DebiAN files (`debian`). Options are checked before any file is read."""
    check_choice("dataset.source", source, SOURCES)
    rho_left = check_rho("dataset.rho_left", rho_left)
    rho_right = check_rho("dataset.rho_right", rho_right)
    test_rho = check_rho("dataset.test_rho", test_rho)
    severity = check_severity(severity)
    check_max_samples(max_samples)
    if check_val_holdout(val_holdout) and source == "debian":
        raise BiseError("dataset.val_holdout needs the digits coloured here (source auto, files, download or "
                        "embedded): the released DebiAN images carry their training colours")
    if source == "debian":
        return load_debian_folder(root, rho_left=rho_left, rho_right=rho_right, severity=severity,
                                  max_samples=max_samples, seed=seed)
    digits = load_digits(source, root, fallback=fallback)
    return build_multicolor_mnist(digits, seed=seed, rho_left=rho_left, rho_right=rho_right, severity=severity,
                                  max_samples=max_samples, test_rho=test_rho, val_holdout=val_holdout)
