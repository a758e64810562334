"""Input checks, written once (scikit-learn's `check_array` / `check_X_y` style).

Each `check_*` takes what a caller was given, returns it as the array the algorithm expects, or raises a ValueError
that names the parameter, what it must be, and what came instead:

    labels must be class indices in [0, 1], got values in [0, 2]

The functions that compute (softmax_layer, sampling) do no checking of their own. Their caller checks once, then calls
them many times: the training loop checks its data before the first of its 4000 steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def check_labels(labels, class_count: int | None = None, *, name: str = "labels", rows: int | None = None,
                 allow_empty: bool = True) -> np.ndarray:
    """(n,) int64 class indices, each in [0, class_count - 1]; `rows`: n must equal it (one label per row)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (rows is not None and labels.shape[0] != rows):
        expected = f"({rows},), one class index per row" if rows is not None else "(n,)"
        raise ValueError(f"{name} must be a 1-D array of shape {expected}, got shape {labels.shape}")
    if labels.size == 0:
        if not allow_empty:
            raise ValueError(f"{name} must be a non-empty 1-D array of class indices, got shape {labels.shape}")
        return labels.astype(np.int64)  # np.array([]) is float64: an empty array holds no wrong index
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if class_count is not None and (labels.min() < 0 or labels.max() >= class_count):
        raise ValueError(f"{name} must be class indices in [0, {class_count - 1}], got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)


def check_bottlenecks(bottlenecks, *, name: str = "bottlenecks", size: int | None = None,
                      finite: bool = False) -> np.ndarray:
    """(n, D) bottlenecks, one row per image; `size`: D must equal it; `finite`: no NaN or infinity."""
    bottlenecks = np.asarray(bottlenecks)
    if bottlenecks.ndim != 2:
        raise ValueError(f"{name} must have shape (images, bottleneck_size), got {bottlenecks.shape}; "
                         "use bottleneck.reshape(1, -1) for a single image")
    if size is not None and bottlenecks.shape[1] != size:
        raise ValueError(f"{name} has {bottlenecks.shape[1]} numbers per image, expected {size}")
    if finite and not np.all(np.isfinite(bottlenecks)):
        raise ValueError(f"{name} contains NaN or infinity; recompute the bottlenecks")
    return bottlenecks


def check_train_copies(copies, rows_shape: tuple[int, int], *, name: str = "train_copies") -> np.ndarray:
    """(copies, n, D) float32 distorted copies of the (n, D) rows they belong to."""
    copies = np.asarray(copies, dtype=np.float32)
    if copies.ndim != 3 or copies.shape[1:] != tuple(rows_shape):
        raise ValueError(f"{name} must be (copies, n, D) with (n, D) = {tuple(rows_shape)}, got {copies.shape}")
    if not np.all(np.isfinite(copies)):
        raise ValueError(f"{name} must be finite numbers, got NaN or infinity")
    return copies


def check_layer(weights, biases, bottleneck_size: int) -> None:
    """weights (bottleneck_size, K) and biases (K,): the layer that fits bottlenecks of `bottleneck_size` numbers."""
    weights, biases = np.asarray(weights), np.asarray(biases)
    if weights.ndim != 2 or weights.shape[0] != bottleneck_size:
        raise ValueError(f"weights must have shape (bottleneck_size, class_count) = ({bottleneck_size}, K), "
                         f"got {weights.shape}")
    if biases.shape != (weights.shape[1],):
        raise ValueError(f"biases must have shape ({weights.shape[1]},) to match weights {weights.shape}, "
                         f"got {biases.shape}")


def check_positive(value, name: str, *, integer: bool = False) -> None:
    """A finite number > 0 (integer=True: a whole number >= 1), else a ValueError naming it."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value) \
            or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_batch_size(batch_size, name: str = "batch_size") -> None:
    """A whole number other than 0: the images per batch, or negative for "all of them"."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size == 0:
        raise ValueError(f"{name} must be a positive whole number, or -1 for 'all', got {batch_size!r}")


def check_class_count(class_count) -> None:
    """At least two classes: a classifier with one class has nothing to decide."""
    if isinstance(class_count, bool) or not isinstance(class_count, int | np.integer) or class_count < 2:
        raise ValueError(f"class_count must be a whole number >= 2 (a classifier needs two classes), "
                         f"got {class_count!r}")


def check_split_percentages(validation_percentage: float, testing_percentage: float) -> None:
    """Both >= 0, and together < 100 so some images are left for training."""
    for name, value in (("validation_percentage", validation_percentage),
                        ("testing_percentage", testing_percentage)):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value!r}.")
    if not validation_percentage + testing_percentage < 100:
        raise ValueError(
            f"validation_percentage + testing_percentage must be < 100 so some images are left for "
            f"training, got {validation_percentage!r} + {testing_percentage!r}."
        )


def check_distortions(distortions: Mapping[str, bool | float]) -> None:
    """The distortion flags by name (pipeline/distortions.py's Distortions as a dict): flip_left_right True or
    False; the others finite and >= 0; crop, scale, brightness and contrast percentages below 100; rotation in
    degrees, at most 180."""
    for name, value in distortions.items():
        if name == "flip_left_right":
            if not isinstance(value, bool | np.bool_):
                raise ValueError(f"flip_left_right must be True or False, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not math.isfinite(value) or value < 0:
            unit = "degrees" if name == "random_rotation" else "a percentage"
            raise ValueError(f"{name} is {unit} and must be >= 0, got {value!r}")
    for name in ("random_crop", "random_scale", "random_brightness", "random_contrast"):
        # brightness or contrast of 100% could make a film flat black; a crop margin of 100% already cuts half
        # the width away (retrain.py's examples use 5 to 30)
        if distortions.get(name, 0) >= 100:
            raise ValueError(f"{name} must be a percentage below 100, got {distortions[name]}")
    if distortions.get("random_rotation", 0) > 180:
        raise ValueError(f"random_rotation must be at most 180 degrees, got {distortions['random_rotation']}")
