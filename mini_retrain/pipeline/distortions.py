"""retrain.py's data augmentation (add_input_distortions), in NumPy.

Distorting training images means each epoch sees a slightly different picture, which fights
overfitting on small data sets. retrain.py does, for every training image, every step:

    margin_scale = 1 + random_crop / 100                     (fixed)
    resize_scale ~ Uniform[1, 1 + random_scale / 100]        (random)
    scale        = margin_scale * resize_scale
    resize the image bilinearly to int(scale * 299) x int(scale * 299)
    cut a random 299 x 299 crop out of it
    flip it left-right with probability 1/2                   (if flip_left_right)
    brightness   ~ Uniform[1 - random_brightness / 100, 1 + random_brightness / 100]
    x = x * brightness                                        (not clipped: may exceed 255)
    x = (x - 128) / 128

Because every distorted image is new, its bottleneck cannot be cached: distortion makes training
run the backbone on every step, which is why retrain.py warns that it is slow.

For chest X-rays think before flipping: the heart is on the left, and a flipped film is a
different (and rare) anatomy.
"""

import numpy as np

from mini_retrain.core.checks import check_distortions
from mini_retrain.pipeline.images import INPUT_SIZE, to_backbone_input


def resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (H, W, 3) pixels to (height, width, 3) float32, no antialiasing.

    Output pixel i takes its value from the source position (half-pixel centres, i.e.
    align_corners=False, the convention of TF2 and OpenCV):

        s = (i + 0.5) * H / height - 0.5,   clamped to [0, H - 1]
        y(i) = (1 - t) * x[floor(s)] + t * x[floor(s) + 1],   t = s - floor(s)

    done first along rows, then along columns (bilinear = the two 1-D lerps). Only the 2 x 2
    nearest source pixels count, so shrinking by more than 2 skips pixels (aliasing), like TF1's
    resize_bilinear. TF1 also defaulted to half_pixel_centers=False (s = i * H / height), which
    shifts the picture by up to half a pixel; we use the centred mapping.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must have shape (height, width, 3), got {pixels.shape}")
    if min(pixels.shape[:2]) < 1 or height < 1 or width < 1:
        raise ValueError(f"cannot resize {pixels.shape[:2]} to ({height}, {width}): sizes must be "
                         "positive")
    top, bottom, row_weight = _source_positions(pixels.shape[0], height)
    left, right, column_weight = _source_positions(pixels.shape[1], width)
    # Rows: gather the two neighbouring source rows of each output row and blend them.
    upper, lower = pixels[top], pixels[bottom]  # (height, W, 3) each
    rows = upper + (lower - upper) * row_weight[:, None, None]  # (height, W, 3)
    # Columns: the same along axis 1.
    near, far = rows[:, left], rows[:, right]  # (height, width, 3) each
    return near + (far - near) * column_weight[None, :, None]  # (height, width, 3)


def _source_positions(source_size: int, output_size: int):
    """For each output index: lower source index, upper source index, weight of the upper one."""
    position = (np.arange(output_size) + 0.5) * (source_size / output_size) - 0.5  # (output,)
    position = np.clip(position, 0.0, source_size - 1)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, source_size - 1)
    return lower, upper, (position - lower).astype(np.float32)


def distortions_requested(flip_left_right: bool, random_crop: float, random_scale: float,
                          random_brightness: float) -> bool:
    """True if any distortion is switched on (retrain.py's should_distort_images)."""
    return bool(flip_left_right) or random_crop != 0 or random_scale != 0 or random_brightness != 0


def distort(pixels: np.ndarray, rng: np.random.Generator, flip_left_right: bool,
            random_crop: float, random_scale: float, random_brightness: float,
            size: int = INPUT_SIZE, mean: float = 128.0, std: float = 128.0) -> np.ndarray:
    """One random distortion of (H, W, 3) pixels in 0..255 -> (3, size, size) float32 input.

    The percentages are retrain.py's flags (--random_crop 10 means a 10% margin). With all of
    them 0 and no flip this is to_backbone_input(resize_bilinear(pixels, size, size), mean, std)
    (mean and std as the backbone's sidecar says; 128 and 128 for Inception v3).
    Random numbers are drawn in a fixed order (scale, crop corner, flip, brightness), so the
    same seed gives the same image.
    """
    check_distortions(random_crop, random_scale, random_brightness)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    margin_scale = 1.0 + random_crop / 100.0
    resize_scale = rng.uniform(1.0, 1.0 + random_scale / 100.0)
    scale = margin_scale * resize_scale
    precrop = int(scale * size)  # truncates like retrain.py's tf.cast(..., tf.int32); >= size
    resized = resize_bilinear(pixels, precrop, precrop)  # (precrop, precrop, 3)
    top = rng.integers(0, precrop - size + 1)
    left = rng.integers(0, precrop - size + 1)
    cropped = resized[top:top + size, left:left + size]  # (size, size, 3)
    if flip_left_right and rng.random() < 0.5:
        cropped = cropped[:, ::-1]
    brightness = rng.uniform(1.0 - random_brightness / 100.0, 1.0 + random_brightness / 100.0)
    return to_backbone_input(cropped * np.float32(brightness), mean, std)  # (3, size, size)
