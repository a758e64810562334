"""Data augmentation: retrain.py's random distortions (add_input_distortions) and four for X-rays, in NumPy.

Distorting training images means the final layer sees slightly different pictures of each film, which fights
overfitting on small data sets. One distortion of an image, in this order:

    geometry (retrain.py):
        margin_scale = 1 + random_crop / 100                     (fixed)
        resize_scale ~ Uniform[1, 1 + random_scale / 100]        (random)
        scale        = margin_scale * resize_scale
        resize the image bilinearly to int(scale * 299) x int(scale * 299)
        cut a random 299 x 299 crop out of it
        flip it left-right with probability 1/2                   (if flip_left_right)
    geometry (X-rays):
        angle        ~ Uniform[-random_rotation, +random_rotation] degrees; rotate about the centre
    intensity (X-rays), each clipped to 0..255 like a film's grey levels:
        gamma        = (1 + random_gamma / 100) ** Uniform[-1, 1];        x = 255 (x / 255) ** gamma
        contrast     ~ Uniform[1 - random_contrast / 100, 1 + random_contrast / 100];  x = m + contrast (x - m),
                       m = the image's mean grey level
        noise        sigma = random_noise / 100 * 255;                    x = x + sigma * Normal(0, 1) per pixel
    intensity (retrain.py):
        brightness   ~ Uniform[1 - random_brightness / 100, 1 + random_brightness / 100]
        x = x * brightness                                        (not clipped: may exceed 255, as in retrain.py)
    x = (x - 128) / 128

Each setting at 0 leaves the image alone. The random numbers of one distortion are drawn in one call, always the
same eight in the same order (then the noise field, when noise is on), so one seed gives one picture, and two
settings drawn with the same seed differ only in what the settings change: the copy with rotation is the copy
without it, rotated.

retrain.py computes a fresh distortion of every training image at every step, so no bottleneck can be cached and the
backbone runs on every batch (`--distort_every_step`). mini_retrain's default makes a few distorted copies of each
training film once and caches them (distorted_copies.py); docs/algorithm.md, section 11, compares the two.

For chest X-rays think before flipping: the heart is on the left, and a flipped film is a
different (and rare) anatomy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from PIL import Image

from mini_retrain.core.checks import check_distortions as core_check_distortions
from mini_retrain.pipeline.images import INPUT_SIZE, read_image, to_backbone_input


class Distortions(NamedTuple):
    """One distortion setting: retrain.py's four flags, then the four for X-rays. All off by default."""

    flip_left_right: bool = False
    random_crop: float = 0.0  # percent margin, below 100
    random_scale: float = 0.0  # percent, below 100
    random_brightness: float = 0.0  # percent, below 100
    random_rotation: float = 0.0  # degrees, at most 180
    random_contrast: float = 0.0  # percent, below 100
    random_gamma: float = 0.0  # percent
    random_noise: float = 0.0  # percent of the grey range (255)


NO_DISTORTIONS = Distortions()


def distortions_of(settings) -> Distortions:
    """The distortion flags of a RetrainSettings (or of anything with those attributes)."""
    return Distortions(*(getattr(settings, name) for name in Distortions._fields))


def distortions_requested(distortions: Distortions) -> bool:
    """True if any distortion is switched on (retrain.py's should_distort_images)."""
    return any(bool(value) for value in distortions)


def describe(distortions: Distortions) -> str:
    """The settings that are on, as flags: 'flip_left_right,random_crop=10,random_scale=10' ('none' for none)."""
    parts = [name if isinstance(value, bool) else f"{name}={float(value):g}"
             for name, value in zip(Distortions._fields, distortions) if value]
    return ",".join(parts) or "none"


def check_distortions(distortions: Distortions) -> Distortions:
    """Raise ValueError naming the flag if a setting is out of range (core/checks.py); return the settings."""
    core_check_distortions(distortions._asdict())
    return distortions


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) float32 with C = 3 (RGB) or 1 (a grey film: a third of the work, the same numbers per channel)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"pixels must have shape (height, width, 3) or (height, width, 1), got {pixels.shape}")
    return pixels


def resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (H, W, C) pixels to (height, width, C) float32, no antialiasing (C = 3, or 1 for grey).

    Output pixel i takes its value from the source position (half-pixel centres, i.e.
    align_corners=False, the convention of TF2 and OpenCV):

        s = (i + 0.5) * H / height - 0.5,   clamped to [0, H - 1]
        y(i) = (1 - t) * x[floor(s)] + t * x[floor(s) + 1],   t = s - floor(s)

    done first along rows, then along columns (bilinear = the two 1-D lerps). Only the 2 x 2
    nearest source pixels count, so shrinking by more than 2 skips pixels (aliasing), like TF1's
    resize_bilinear. TF1 also defaulted to half_pixel_centers=False (s = i * H / height), which
    shifts the picture by up to half a pixel; we use the centred mapping.
    """
    pixels = _check_pixels(pixels)
    if min(pixels.shape[:2]) < 1 or height < 1 or width < 1:
        raise ValueError(f"cannot resize {pixels.shape[:2]} to ({height}, {width}): sizes must be "
                         "positive")
    top, bottom, row_weight = _source_positions(pixels.shape[0], height)
    left, right, column_weight = _source_positions(pixels.shape[1], width)
    # Rows: gather the two neighbouring source rows of each output row and blend them.
    upper, lower = pixels[top], pixels[bottom]  # (height, W, C) each
    rows = upper + (lower - upper) * row_weight[:, None, None]  # (height, W, C)
    # Columns: the same along axis 1.
    near, far = rows[:, left], rows[:, right]  # (height, width, C) each
    return near + (far - near) * column_weight[None, :, None]  # (height, width, C)


def _source_positions(source_size: int, output_size: int):
    """For each output index: lower source index, upper source index, weight of the upper one."""
    position = (np.arange(output_size) + 0.5) * (source_size / output_size) - 0.5  # (output,)
    position = np.clip(position, 0.0, source_size - 1)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, source_size - 1)
    return lower, upper, (position - lower).astype(np.float32)


def rotate_bilinear(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (H, W, C) pixels by `degrees` counter-clockwise about the centre: (H, W, C) float32.

    Each output pixel (row i, column j) looks up where it came from, turning back by the angle t about the centre
    (c_row, c_col) = ((H - 1) / 2, (W - 1) / 2), with y pointing up (y = c_row - i):

        dx = j - c_col,   dy = c_row - i
        source column = c_col + cos(t) dx + sin(t) dy
        source row    = c_row + sin(t) dx - cos(t) dy
        value = bilinear blend of the 2 x 2 source pixels around that position

    Positions outside the image are clamped to its border, so the corners uncovered by the turn repeat the edge
    pixels instead of turning black. 90 degrees is np.rot90; 0 degrees returns the pixels unchanged.
    """
    pixels = _check_pixels(pixels)
    height, width, channels = pixels.shape
    angle = np.deg2rad(degrees)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    centre_row, centre_col = np.float32((height - 1) / 2), np.float32((width - 1) / 2)
    dy = centre_row - np.arange(height, dtype=np.float32)[:, None]  # (H, 1)
    dx = np.arange(width, dtype=np.float32)[None, :] - centre_col  # (1, W)
    source_col = np.clip(centre_col + cos * dx + sin * dy, 0, width - 1)  # (H, W)
    source_row = np.clip(centre_row + sin * dx - cos * dy, 0, height - 1)  # (H, W)
    top = np.floor(source_row).astype(np.intp)  # (H, W)
    left = np.floor(source_col).astype(np.intp)
    bottom, right = np.minimum(top + 1, height - 1), np.minimum(left + 1, width - 1)
    v = (source_row - top).astype(np.float32)[:, :, None]  # (H, W, 1) weight of the lower row
    u = (source_col - left).astype(np.float32)[:, :, None]  # (H, W, 1) weight of the right column
    flat = pixels.reshape(height * width, channels)  # pixel (r, c) is row r * W + c: one gather per corner
    top_left, top_right = flat[top * width + left], flat[top * width + right]  # (H, W, C) each
    bottom_left, bottom_right = flat[bottom * width + left], flat[bottom * width + right]
    upper = top_left + (top_right - top_left) * u  # (H, W, C)
    lower = bottom_left + (bottom_right - bottom_left) * u
    return upper + (lower - upper) * v  # (H, W, C)


def adjust_gamma(pixels: np.ndarray, gamma: float) -> np.ndarray:
    """x = 255 (x / 255) ** gamma on pixels in 0..255: gamma < 1 lifts the dark greys, > 1 deepens them.

    Black (0) and white (255) stay where they are, and the order of grey levels is kept (the curve rises).
    """
    fraction = np.clip(np.asarray(pixels, dtype=np.float32) / np.float32(255), 0, 1)
    return np.float32(255) * fraction ** np.float32(gamma)


def adjust_contrast(pixels: np.ndarray, contrast: float) -> np.ndarray:
    """x = m + contrast (x - m), m = the mean grey level of the image, clipped to 0..255.

    contrast < 1 pulls every pixel towards the mean (a flatter film), > 1 pushes them apart.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    mean = pixels.mean(dtype=np.float64)
    return np.clip(np.float32(mean) + np.float32(contrast) * (pixels - np.float32(mean)), 0, 255)


def add_noise(pixels: np.ndarray, sigma: float, noise: np.ndarray) -> np.ndarray:
    """x = x + sigma * noise, clipped to 0..255. pixels (H, W, C); noise (H, W) standard normal numbers, the same
    for every channel, so a grey film stays grey."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return np.clip(pixels + np.float32(sigma) * noise.astype(np.float32)[:, :, None], 0, 255)


def distort(pixels: np.ndarray, rng: np.random.Generator, distortions: Distortions,
            size: int = INPUT_SIZE, mean: float = 128.0, std: float = 128.0) -> np.ndarray:
    """One random distortion of (H, W, 3) pixels in 0..255 -> (3, size, size) float32 input. A grey film may come
    as (H, W, 1): distorted once, then seen as all three channels (the same numbers, a third of the work).

    `distortions` holds the flags (--random_crop 10 means a 10% margin; see the module docstring for each step).
    With every setting off this is to_backbone_input(resize_bilinear(pixels, size, size), mean, std) (mean and
    std as the backbone's sidecar says; 128 and 128 for Inception v3).
    The eight random numbers u, each Uniform[0, 1), are for: 0 scale, 1 and 2 the crop's corner, 3 the flip,
    4 brightness, 5 rotation, 6 contrast, 7 gamma.
    """
    flip, crop, scale, brightness, rotation, contrast, gamma, noise = check_distortions(distortions)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    u = rng.random(8)  # (8,) in [0, 1): the same eight numbers whatever is switched on
    uniform = 2 * u - 1  # (8,) in [-1, 1)

    # Geometry: scale up, cut a random window, maybe mirror, turn.
    margin_scale = 1.0 + crop / 100.0
    resize_scale = 1.0 + u[0] * scale / 100.0
    precrop = int(margin_scale * resize_scale * size)  # truncates like retrain.py's tf.cast(..., tf.int32); >= size
    resized = resize_bilinear(pixels, precrop, precrop)  # (precrop, precrop, C)
    top = int(u[1] * (precrop - size + 1))  # in 0 .. precrop - size
    left = int(u[2] * (precrop - size + 1))
    x = resized[top:top + size, left:left + size]  # (size, size, C)
    if flip and u[3] < 0.5:
        x = x[:, ::-1]
    if rotation:
        x = rotate_bilinear(x, uniform[5] * rotation)

    # Intensity: gamma, contrast and noise keep a film's 0..255; retrain.py's brightness does not clip.
    if gamma:
        x = adjust_gamma(x, (1.0 + gamma / 100.0) ** uniform[7])
    if contrast:
        x = adjust_contrast(x, 1.0 + uniform[6] * contrast / 100.0)
    if noise:
        x = add_noise(x, noise / 100.0 * 255.0, rng.standard_normal((size, size)))
    x = x * np.float32(1.0 + uniform[4] * brightness / 100.0)
    return to_backbone_input(np.broadcast_to(x, (size, size, 3)), mean, std)  # (3, size, size)


def read_for_distortion(path, distortions: Distortions, size: int = INPUT_SIZE, fast: bool = False) -> np.ndarray:
    """An image file -> (L, L, 3) uint8 pixels for distort(), (L, L, 1) for a grey film, decoded once for all the
    distortions of it.

    L = ceil(size (1 + random_crop / 100) (1 + random_scale / 100)) is the largest side distort() resizes to, so
    the film is shrunk to it first with Pillow's antialiasing bilinear filter (as resize_for_backbone does for the
    bottlenecks) and distort()'s plain bilinear resize only ever enlarges a little. With no crop or scale, L = size
    and the pixels are those of the undistorted bottleneck.
    """
    largest = int(np.ceil(size * (1 + distortions.random_crop / 100) * (1 + distortions.random_scale / 100)))
    image = read_image(path, fast=fast, keep_gray=True)  # "L" or "RGB"
    resized = image.resize((largest, largest), Image.Resampling.BILINEAR, reducing_gap=2.0 if fast else None)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels  # (L, L, 1) or (L, L, 3)


def parse_distortions(text: str) -> tuple[str, Distortions]:
    """One named distortion setting of `sweep --distortions`: (name, settings), checked.

        none                                          no distortion: the films only
        [NAME:]SETTING[,SETTING...]                   SETTING is flip_left_right, or a flag and its value:
        rotate:random_rotation=5                      named "rotate"
        random_crop=10,random_scale=10,flip_left_right   named by its settings
    """
    text = str(text).strip()
    example = "e.g. none, or crop:random_crop=10,random_scale=10"
    name, _, body = text.rpartition(":") if ":" in text else ("", "", text)
    if body == "none":
        return name or "none", NO_DISTORTIONS
    values: dict[str, bool | float] = {}
    for item in body.split(","):
        flag, has_value, value = (part.strip() for part in item.partition("="))
        if flag not in Distortions._fields:
            raise ValueError(f"--distortions {text!r}: {flag!r} is not a distortion; use "
                             f"{', '.join(Distortions._fields)} ({example})")
        if flag in values:
            raise ValueError(f"--distortions {text!r}: {flag} is given twice")
        if flag == "flip_left_right":
            if has_value:
                raise ValueError(f"--distortions {text!r}: write flip_left_right without a value ({example})")
            values[flag] = True
            continue
        try:
            values[flag] = float(value)
        except ValueError:
            raise ValueError(f"--distortions {text!r}: {flag} needs a number, as {flag}=10 ({example})") from None
    try:
        distortions = check_distortions(Distortions(**values))
    except ValueError as error:
        raise ValueError(f"--distortions {text!r}: {error}") from None
    return name.strip() or describe(distortions), distortions
