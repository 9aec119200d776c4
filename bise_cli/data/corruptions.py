"""The 32-px image corruptions of LfF's Corrupted CIFAR-10 protocol (Nam et al., NeurIPS 2020), reimplemented
with numpy, scipy and PIL only.

LfF adapts Hendrycks & Dietterich's CIFAR-10-C code to 32 px; each corruption has a parameter table of five
severities (Contrast has six), and LfF's dataset "Severity s" applies protocol level s + 1, so the paper's
"Severity 4" is level 5. The tables below are LfF's (data/corrupted_cifar10_protocol.py @ e66796e). Every function
maps a uint8 batch (N, 32, 32, 3) (HWC, RGB) and a numpy Generator to a float batch in [0, 255]; the builder
truncates it to uint8 as LfF does (np.array(img).astype(np.uint8)).

Exactness: random draws come from the given Generator, so a local build is reproducible but never pixel-equal to
any released file. The original relies on OpenCV and ImageMagick for some steps; they are replaced here by
equivalents (scipy filters with OpenCV's reflect-101 border; ImageMagick's MotionBlurImage kernel re-derived:
a one-sided Gaussian of width 2*ceil(radius)+1 sampled along the angle with integer offsets and edge clamping,
an approximation of the original). Spatter at levels 1-3 is not supported (needs OpenCV's Canny and histogram
equalisation; level 5, the one used, is supported). Glass Blur keeps the original's numpy aliasing: its "swap"
copies the neighbour into the pixel.

Frost needs the frost texture images (frost1.png ... frost6.jpg). They are read, without importing it, from the
package data of the PyPI package `imagecorruptions` (1.1.2; its module no longer imports, as it needs
pkg_resources, and it pulls in opencv-python and scikit-image), so install it with
`pip install --no-deps imagecorruptions`. A folder holding the files can be given instead with the environment
variable BISE_FROST_DIR (or the `frost_dir` argument of `frost`; `find_frost_dir` resolves the folder). As in
LfF only the first five files are ever drawn. OpenCV's resize by 0.2 (bilinear, no antialiasing) samples source
pixel 5i + 2 exactly, so it is done here by decimation; JPEG textures are decoded by PIL, not OpenCV, which may
differ by a grey level.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy import ndimage

from bise_cli.core.errors import BiseError

# LfF's two lists (make_dataset.py); index = bias label.
CORRUPTION_LISTS = {
    "type0": ("Snow", "Frost", "Fog", "Brightness", "Contrast", "Spatter", "Elastic", "JPEG", "Pixelate",
              "Saturate"),
    "type1": ("Gaussian Noise", "Shot Noise", "Impulse Noise", "Speckle Noise", "Gaussian Blur", "Defocus Blur",
              "Glass Blur", "Motion Blur", "Zoom Blur", "Original"),
}
PROTOCOL_SEVERITY = 5   # LfF "Severity 4" + 1
UNSUPPORTED: dict[str, str] = {}   # name -> reason; every corruption of both lists is supported now
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_DIR_ENV = "BISE_FROST_DIR"
FROST_INSTALL_HINT = "pip install --no-deps imagecorruptions"


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _out(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1) * 255


def _blur(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian per channel: on (N, H, W, C), (N, H, W) or (H, W) arrays."""
    sigmas = {4: (0, sigma, sigma, 0), 3: (0, sigma, sigma), 2: (sigma, sigma)}[x.ndim]
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


# ------------------------------------------------------------------------------------------- noise

def gaussian_noise(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    x = _unit(x)
    return _out(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x, rng, severity=PROTOCOL_SEVERITY):
    c = [500, 250, 100, 75, 50][severity - 1]
    return _out(rng.poisson(_unit(x) * c) / c)


def impulse_noise(x, rng, severity=PROTOCOL_SEVERITY):
    """Salt and pepper (skimage random_noise 's&p'): a fraction c of the values, half set to 0, half to 1."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    x = _unit(x)
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return _out(np.where(hit, salt.astype(np.float64), x))


def speckle_noise(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.06, 0.1, 0.12, 0.16, 0.2][severity - 1]
    x = _unit(x)
    return _out(x + x * rng.normal(size=x.shape, scale=c))


# ------------------------------------------------------------------------------------------- blur

def gaussian_blur(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.4, 0.6, 0.7, 0.8, 1][severity - 1]
    return _out(_blur(_unit(x), c))


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    size = 8 if radius <= 8 else int(radius)
    grid = np.arange(-size, size + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = 1 if radius <= 8 else 2   # OpenCV GaussianBlur ksize 3 (or 5), reflect-101 border
    t = np.arange(-taps, taps + 1)
    k = np.exp(-t ** 2 / (2 * alias_blur ** 2))
    k /= k.sum()
    disk = ndimage.correlate1d(disk, k, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, k, axis=1, mode="mirror")


def defocus_blur(x, rng, severity=PROTOCOL_SEVERITY):
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = _disk(*c)[None, :, :, None]
    return _out(ndimage.correlate(_unit(x), kernel, mode="mirror"))


def glass_blur(x, rng, severity=PROTOCOL_SEVERITY):
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    x = (_blur(_unit(x), sigma) * 255).astype(np.uint8)
    n, height, width, _ = x.shape
    batch = np.arange(n)
    for _ in range(iterations):
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2, n))   # upper bound exclusive, as np.random.randint
                x[batch, h, w] = x[batch, h + dy, w + dx]             # the original's aliased "swap"
    return _out(_blur(x / 255.0, sigma))


def _motion_kernel_offsets(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width)
    kernel = np.exp(-(i ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    theta = np.deg2rad(angle)
    ox = np.ceil(i * np.cos(theta) - 0.5).astype(int)
    oy = np.ceil(i * np.sin(theta) - 0.5).astype(int)
    return kernel, ox, oy


def _motion(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick-style motion blur of one (H, W) or (H, W, C) uint8 image, edge pixels repeated; uint8 out."""
    kernel, ox, oy = _motion_kernel_offsets(radius, sigma, angle)
    height, width = image.shape[:2]
    rows, cols = np.arange(height), np.arange(width)
    out = np.zeros(image.shape, dtype=np.float64)
    for k, dx, dy in zip(kernel, ox, oy, strict=True):
        r = np.clip(rows + dy, 0, height - 1)
        c = np.clip(cols + dx, 0, width - 1)
        out += k * image[r][:, c]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def motion_blur(x, rng, severity=PROTOCOL_SEVERITY):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    return np.stack([_motion(image, radius, sigma, a) for image, a in zip(x, angles, strict=True)]).astype(np.float64)


def _clipped_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the central crop of an (H, W, C) image by `factor` (bilinear), trimmed back to H x W."""
    h = image.shape[0]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    zoomed = ndimage.zoom(image[top:top + ch, top:top + ch], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim:trim + h, trim:trim + h]


def zoom_blur(x, rng, severity=PROTOCOL_SEVERITY):
    stop = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    factors = np.arange(1, stop, 0.01)
    x = _unit(x).astype(np.float32)
    out = np.zeros_like(x)
    for i, image in enumerate(x):
        for factor in factors:
            out[i] += _clipped_zoom(image, factor)
    return _out((x + out) / (len(factors) + 1))


# ------------------------------------------------------------------------------------------- weather

def plasma_fractal(rng, mapsize: int = 32, wibbledecay: float = 3) -> np.ndarray:
    """A diamond-square height map in [0, 1] (the protocol's fog pattern)."""
    grid = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(total):
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half::step, half::step] = wibbled(square)
        centres, corners = grid[half::step, half::step], grid[0::step, 0::step]
        grid[0::step, half::step] = wibbled(centres + np.roll(centres, 1, axis=0) + corners
                                            + np.roll(corners, -1, axis=1))
        grid[half::step, 0::step] = wibbled(centres + np.roll(centres, 1, axis=1) + corners
                                            + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min()
    return grid / grid.max()


def fog(x, rng, severity=PROTOCOL_SEVERITY):
    amount, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    x = _unit(x)
    out = np.empty_like(x)
    for i, image in enumerate(x):
        peak = image.max()
        image = image + amount * plasma_fractal(rng, wibbledecay=decay)[:32, :32, None]
        out[i] = image * peak / (peak + amount)
    return _out(out)


def find_frost_dir(folder: str | Path | None = None) -> Path:
    """The folder with the frost textures: `folder`, else $BISE_FROST_DIR, else `frost/` inside the installed
    `imagecorruptions` package (found with importlib's find_spec, never imported). BiseError if none has them."""
    tried = []
    candidates = [folder] if folder is not None else []
    if not candidates and os.environ.get(FROST_DIR_ENV):
        candidates.append(os.environ[FROST_DIR_ENV])
    if not candidates:
        try:
            spec = importlib.util.find_spec("imagecorruptions")
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            candidates.append(Path(location) / "frost")
        if not candidates:
            tried.append("package imagecorruptions (not installed)")
    for candidate in candidates:
        path = Path(candidate)
        missing = [name for name in FROST_FILES[:5] if not (path / name).is_file()]
        if not missing:
            return path
        tried.append(f"{path} (missing {', '.join(missing)})")
    raise BiseError(f"corruption 'Frost' needs the frost texture images {', '.join(FROST_FILES[:5])}; none found "
                    f"(tried: {'; '.join(tried)}). Install them with `{FROST_INSTALL_HINT}` or set "
                    f"{FROST_DIR_ENV} to a folder holding them; or use dataset.corruptions=type1 or the released "
                    "files (dataset.source=files)")


def _frost_texture(path: Path) -> np.ndarray:
    """A texture as uint8 RGB, shrunk as OpenCV's resize(fx=fy=0.2, INTER_LINEAR) does: output pixel i sits at
    source (i + 0.5) * 5 - 0.5 = 5i + 2, an exact pixel, so bilinear sampling is plain decimation; the output
    size is round(0.2 * side)."""
    with Image.open(path) as image:
        texture = np.asarray(image.convert("RGB"))   # drops alpha like cv2.imread; RGB, so no BGR swap needed
    height, width = (int(round(side * 0.2)) for side in texture.shape[:2])
    rows = np.minimum(5 * np.arange(height) + 2, texture.shape[0] - 1)
    cols = np.minimum(5 * np.arange(width) + 2, texture.shape[1] - 1)
    return texture[rows][:, cols]


def frost(x, rng, severity=PROTOCOL_SEVERITY, frost_dir: str | Path | None = None):
    """LfF frost: per image, texture k ~ U{0..4}, shrunk by 0.2, a random 32x32 crop (row start then column
    start, each U{0..side-33}), mixed as clip(a * x + b * crop) with (a, b) the severity's pair."""
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    folder = find_frost_dir(frost_dir)
    textures: dict[int, np.ndarray] = {}
    _, height, width, _ = x.shape
    out = np.empty(x.shape, dtype=np.float64)
    for i, image in enumerate(x):
        k = int(rng.integers(5))   # np.random.randint(5): frost6 is never drawn
        if k not in textures:
            textures[k] = _frost_texture(folder / FROST_FILES[k])
        texture = textures[k]
        if texture.shape[0] <= height or texture.shape[1] <= width:
            raise BiseError(f"frost texture {folder / FROST_FILES[k]} is too small: {texture.shape[1]}x"
                            f"{texture.shape[0]} after the 0.2 resize, needs more than {width}x{height}")
        top = int(rng.integers(0, texture.shape[0] - height))
        left = int(rng.integers(0, texture.shape[1] - width))
        out[i] = a * image.astype(np.float64) + b * texture[top:top + height, left:left + width]
    return np.clip(out, 0, 255)


def snow(x, rng, severity=PROTOCOL_SEVERITY):
    loc, scale, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    x = _unit(x).astype(np.float32)
    out = np.empty_like(x)
    for i, image in enumerate(x):
        layer = rng.normal(size=image.shape[:2], loc=loc, scale=scale)
        layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
        layer[layer < threshold] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
        layer = _motion(layer, radius, sigma, rng.uniform(-135, -45)) / 255.0
        grey = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)   # OpenCV RGB2GRAY
        image = keep * image + (1 - keep) * np.maximum(image, grey[..., None] * 1.5 + 0.5)
        out[i] = image + layer[..., None] + np.rot90(layer, 2)[..., None]
    return _out(out)


def spatter(x, rng, severity=PROTOCOL_SEVERITY):
    loc, scale, sigma, threshold, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][severity - 1]
    if not mud:
        raise BiseError(f"Spatter at protocol level {severity} (the water variant) is not supported; levels 4-5 are")
    x = _unit(x)
    liquid = _blur(rng.normal(size=x.shape[:3], loc=loc, scale=scale), sigma)
    liquid = np.where(liquid < threshold, 0, liquid)
    m = _blur((liquid > threshold).astype(np.float64), intensity)
    m[m < 0.8] = 0
    colour = np.array([63, 42, 20]) / 255.0
    return _out(x * (1 - m[..., None]) + colour * m[..., None])


# ------------------------------------------------------------------------------------------- digital

def brightness(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _out(hsv_to_rgb(hsv))


def saturate(x, rng, severity=PROTOCOL_SEVERITY):
    scale, shift = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + shift, 0, 1)
    return _out(hsv_to_rgb(hsv))


def contrast(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.75, 0.5, 0.4, 0.3, 0.15, 0.12][severity - 1]
    x = _unit(x)
    means = x.mean(axis=(1, 2), keepdims=True)
    return _out((x - means) * c + means)


def jpeg(x, rng, severity=PROTOCOL_SEVERITY):
    quality = [80, 65, 58, 50, 40][severity - 1]
    out = []
    for image in x:
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out).astype(np.float64)


def pixelate(x, rng, severity=PROTOCOL_SEVERITY):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    out = []
    for image in x:
        height, width = image.shape[:2]
        small = Image.fromarray(image).resize((int(width * c), int(height * c)), Image.BOX)
        out.append(np.asarray(small.resize((width, height), Image.BOX)))
    return np.stack(out).astype(np.float64)


def elastic(x, rng, severity=PROTOCOL_SEVERITY):
    size = 32
    alpha, sigma, affine = [(0, 0, size * 0.08), (size * 0.05, size * 0.2, size * 0.07),
                            (size * 0.08, size * 0.06, size * 0.06), (size * 0.1, size * 0.04, size * 0.05),
                            (size * 0.1, size * 0.03, size * 0.03)][severity - 1]
    x = _unit(x).astype(np.float32)
    n, height, width, channels = x.shape
    centre, side = np.float32([height, width][::-1]) // 2, min(height, width) // 3
    src = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])   # (x, y) points
    yy, xx, zz = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels), indexing="ij")
    out = np.empty_like(x)
    for i, image in enumerate(x):
        dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
        # Affine M with M @ [x, y, 1] = dst for the three src points; warpAffine samples src at M^-1 (out).
        forward = np.linalg.solve(np.c_[src, np.ones(3)], dst).T          # (2, 3)
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
        grid_x, grid_y = xx[..., 0], yy[..., 0]
        sx = inverse[0, 0] * grid_x + inverse[0, 1] * grid_y + inverse[0, 2]
        sy = inverse[1, 0] * grid_x + inverse[1, 1] * grid_y + inverse[1, 2]
        warped = np.stack([ndimage.map_coordinates(image[..., ch], [sy, sx], order=1, mode="mirror")
                           for ch in range(channels)], axis=-1)
        dx = _blur(rng.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * alpha
        dy = _blur(rng.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * alpha
        coords = [yy + dy[..., None], xx + dx[..., None], zz]
        out[i] = ndimage.map_coordinates(warped, coords, order=1, mode="reflect")
    return _out(out)


def original(x, rng, severity=PROTOCOL_SEVERITY):
    return x.astype(np.float64)


def _unsupported(name: str) -> Callable:
    def fail(x, rng, severity=PROTOCOL_SEVERITY):
        raise BiseError(f"corruption {name!r} is not supported in a local build ({UNSUPPORTED[name]}); use "
                        "dataset.corruptions=type1 or the released files (dataset.source=files)")
    return fail


CORRUPTIONS: dict[str, Callable] = {
    "Gaussian Noise": gaussian_noise, "Shot Noise": shot_noise, "Impulse Noise": impulse_noise,
    "Speckle Noise": speckle_noise, "Gaussian Blur": gaussian_blur, "Defocus Blur": defocus_blur,
    "Glass Blur": glass_blur, "Motion Blur": motion_blur, "Zoom Blur": zoom_blur, "Original": original,
    "Snow": snow, "Frost": frost, "Fog": fog, "Brightness": brightness, "Contrast": contrast,
    "Spatter": spatter, "Elastic": elastic, "JPEG": jpeg, "Pixelate": pixelate, "Saturate": saturate,
}


def corruption_names(kind: str) -> tuple[str, ...]:
    if kind not in CORRUPTION_LISTS:
        raise BiseError(f"unknown dataset.corruptions {kind!r}; allowed: {', '.join(CORRUPTION_LISTS)}")
    return CORRUPTION_LISTS[kind]


def check_supported(kind: str) -> None:
    """A one-line BiseError before any work when the list has a corruption this module cannot build."""
    for name in corruption_names(kind):
        if name in UNSUPPORTED:
            _unsupported(name)(None, None)
        if name == "Frost":
            find_frost_dir()


def corrupt(images: np.ndarray, name: str, rng: np.random.Generator,
            severity: int = PROTOCOL_SEVERITY) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) with corruption `name` at protocol level `severity` (1-5)."""
    if name not in CORRUPTIONS:
        raise BiseError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if not 1 <= int(severity) <= 5:
        raise BiseError(f"corruption severity must be a protocol level 1..5, got {severity!r}")
    if len(images) == 0:
        return images.copy()
    out = CORRUPTIONS[name](np.asarray(images, dtype=np.uint8), rng, int(severity))
    return np.clip(out, 0, 255).astype(np.uint8)   # LfF: np.array(img).astype(np.uint8) (truncation)
