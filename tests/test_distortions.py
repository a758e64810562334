"""Tests for mini_retrain.pipeline.distortions: bilinear resize against a slow reference, distort's steps."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_retrain.pipeline.distortions import distort, distortions_requested, resize_bilinear
from mini_retrain.pipeline.images import to_backbone_input


def slow_resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reference: one output pixel at a time, straight from the textbook 2-D formula
    f = (1-u)(1-v) p00 + u(1-v) p01 + (1-u) v p10 + u v p11, with half-pixel centres."""
    source_height, source_width = pixels.shape[:2]
    result = np.zeros((height, width, 3))
    for i in range(height):
        for j in range(width):
            y = min(max((i + 0.5) * source_height / height - 0.5, 0), source_height - 1)
            x = min(max((j + 0.5) * source_width / width - 0.5, 0), source_width - 1)
            y0, x0 = math.floor(y), math.floor(x)
            y1, x1 = min(y0 + 1, source_height - 1), min(x0 + 1, source_width - 1)
            v, u = y - y0, x - x0
            result[i, j] = ((1 - u) * (1 - v) * pixels[y0, x0] + u * (1 - v) * pixels[y0, x1]
                            + (1 - u) * v * pixels[y1, x0] + u * v * pixels[y1, x1])
    return result


@settings(max_examples=40, deadline=None)
@given(source=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       target=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       seed=st.integers(0, 2**32 - 1))
def test_resize_bilinear_matches_slow_loop(source, target, seed):
    pixels = np.random.default_rng(seed).uniform(0, 255, size=(*source, 3)).astype(np.float32)
    fast = resize_bilinear(pixels, *target)
    assert fast.shape == (*target, 3) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow_resize_bilinear(pixels, *target), atol=1e-3)


def test_resize_bilinear_identity_when_size_unchanged():
    pixels = np.random.default_rng(1).uniform(0, 255, size=(7, 11, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(pixels, 7, 11), pixels)


def test_resize_bilinear_doubling_by_hand():
    # One row 0, 100 doubled in width: centres of output columns sit at source x =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1) -> 0, 25, 75, 100.
    pixels = np.zeros((1, 2, 3), dtype=np.float32)
    pixels[0, 1] = 100
    np.testing.assert_allclose(resize_bilinear(pixels, 1, 4)[0, :, 0], [0, 25, 75, 100])


def test_resize_bilinear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        resize_bilinear(np.zeros((4, 4)), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(np.zeros((4, 4, 3)), 0, 2)


PIXELS = np.random.default_rng(2).uniform(0, 255, size=(320, 310, 3)).astype(np.float32)


def test_distort_shapes():
    rng = np.random.default_rng(0)
    for size in (299, 64):
        result = distort(PIXELS, rng, True, 10, 20, 30, size=size)
        assert result.shape == (3, size, size) and result.dtype == np.float32


def test_distort_with_nothing_switched_on_is_plain_resize():
    result = distort(PIXELS, np.random.default_rng(0), False, 0, 0, 0)
    np.testing.assert_array_equal(result, to_backbone_input(resize_bilinear(PIXELS, 299, 299)))


def test_distort_scales_as_the_backbone_says():
    """Another backbone's sidecar may ask for another mean and std; the distorted images follow it."""
    result = distort(PIXELS, np.random.default_rng(0), False, 0, 0, 0, mean=100.0, std=50.0)
    expected = (resize_bilinear(PIXELS, 299, 299).transpose(2, 0, 1) - 100.0) / 50.0  # (3, 299, 299)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_flip_flips():
    # With flip on and nothing else, each draw is either the plain image or its mirror.
    plain = to_backbone_input(resize_bilinear(PIXELS, 299, 299))
    mirrored = plain[:, :, ::-1]
    rng = np.random.default_rng(5)
    seen = {"plain": 0, "mirrored": 0}
    for _ in range(40):
        result = distort(PIXELS, rng, True, 0, 0, 0)
        if np.array_equal(result, mirrored):
            seen["mirrored"] += 1
        else:
            np.testing.assert_array_equal(result, plain)
            seen["plain"] += 1
    assert seen["plain"] >= 5 and seen["mirrored"] >= 5  # about half each; P(fail) < 1e-6


def test_brightness_scales_pixels():
    plain = resize_bilinear(PIXELS, 299, 299).transpose(2, 0, 1)  # (3, 299, 299) in 0..255
    bright_enough = plain > 10  # ratios of near-zero pixels are all rounding noise
    for seed in range(5):
        result = distort(PIXELS, np.random.default_rng(seed), False, 0, 0, 40)
        brightened = result * 128 + 128  # undo (x - 128)/128
        ratio = brightened[bright_enough] / plain[bright_enough]
        factor = float(np.median(ratio))
        assert 0.6 <= factor <= 1.4
        np.testing.assert_allclose(ratio, factor, rtol=1e-4)  # one factor for the whole image


def test_crop_is_a_window_of_the_enlarged_image():
    # random_crop 10 -> margin 1.1 -> int(1.1 * 40) = 44: the result is a 40x40 window of the
    # 44x44 resize, so it must equal one of the 5 x 5 possible windows.
    pixels = np.random.default_rng(3).uniform(0, 255, size=(50, 50, 3)).astype(np.float32)
    enlarged = to_backbone_input(resize_bilinear(pixels, 44, 44))  # (3, 44, 44)
    corners = set()
    rng = np.random.default_rng(4)
    for _ in range(30):
        result = distort(pixels, rng, False, 10, 0, 0, size=40)
        matches = [(top, left) for top in range(5) for left in range(5)
                   if np.array_equal(result, enlarged[:, top:top + 40, left:left + 40])]
        assert len(matches) == 1
        corners.add(matches[0])
    assert len(corners) > 5  # the corner really is random


def test_scale_enlarges_within_bounds():
    # random_scale 50 -> scale in [1, 1.5]: a centred feature grows by that factor.
    pixels = np.zeros((100, 100, 3), dtype=np.float32)
    pixels[40:60, 40:60] = 255  # a 20-pixel white square
    widths = []
    for seed in range(8):
        result = distort(pixels, np.random.default_rng(seed), False, 0, 50, 0, size=100)
        row = result[0].max(axis=0) > 0  # columns brighter than mid-grey (x > 128)
        widths.append(row.sum())
    assert min(widths) >= 19 and max(widths) <= 32
    assert max(widths) > min(widths)


def test_seeded_reproducibility():
    first = distort(PIXELS, np.random.default_rng(42), True, 10, 10, 10)
    second = distort(PIXELS, np.random.default_rng(42), True, 10, 10, 10)
    third = distort(PIXELS, np.random.default_rng(43), True, 10, 10, 10)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)


@pytest.mark.parametrize("crop, scale, brightness, message", [
    (-1, 0, 0, "random_crop"), (0, -5, 0, "random_scale"), (0, 0, -1, "random_brightness"),
    (0, 0, 100, "below 100"), (float("nan"), 0, 0, "random_crop"),
])
def test_distort_validates_percentages(crop, scale, brightness, message):
    with pytest.raises(ValueError, match=message):
        distort(PIXELS, np.random.default_rng(0), False, crop, scale, brightness)


def test_distortions_requested():
    assert not distortions_requested(False, 0, 0, 0)
    assert distortions_requested(True, 0, 0, 0)
    assert distortions_requested(False, 5, 0, 0)
    assert distortions_requested(False, 0, 5, 0)
    assert distortions_requested(False, 0, 0, 5)
