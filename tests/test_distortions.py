"""Tests for mini_retrain.pipeline.distortions: bilinear resize against a slow reference, distort's steps, and the
properties of the four X-ray distortions (identity at 0, shapes, range, one seed one picture)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_retrain.pipeline.distortions import (
    Distortions, add_noise, adjust_contrast, adjust_gamma, check_distortions, describe, distort, distortions_requested,
    resize_bilinear, rotate_bilinear)
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
        result = distort(PIXELS, rng, Distortions(True, 10, 20, 30, 5, 20, 20, 3), size=size)
        assert result.shape == (3, size, size) and result.dtype == np.float32


def test_distort_with_nothing_switched_on_is_plain_resize():
    result = distort(PIXELS, np.random.default_rng(0), Distortions())
    np.testing.assert_array_equal(result, to_backbone_input(resize_bilinear(PIXELS, 299, 299)))


def test_distort_scales_as_the_backbone_says():
    """Another backbone's sidecar may ask for another mean and std; the distorted images follow it."""
    result = distort(PIXELS, np.random.default_rng(0), Distortions(), mean=100.0, std=50.0)
    expected = (resize_bilinear(PIXELS, 299, 299).transpose(2, 0, 1) - 100.0) / 50.0  # (3, 299, 299)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_flip_flips():
    # With flip on and nothing else, each draw is either the plain image or its mirror.
    plain = to_backbone_input(resize_bilinear(PIXELS, 299, 299))
    mirrored = plain[:, :, ::-1]
    rng = np.random.default_rng(5)
    seen = {"plain": 0, "mirrored": 0}
    for _ in range(40):
        result = distort(PIXELS, rng, Distortions(flip_left_right=True))
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
        result = distort(PIXELS, np.random.default_rng(seed), Distortions(random_brightness=40))
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
        result = distort(pixels, rng, Distortions(random_crop=10), size=40)
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
        result = distort(pixels, np.random.default_rng(seed), Distortions(random_scale=50), size=100)
        row = result[0].max(axis=0) > 0  # columns brighter than mid-grey (x > 128)
        widths.append(row.sum())
    assert min(widths) >= 19 and max(widths) <= 32
    assert max(widths) > min(widths)


def test_seeded_reproducibility():
    first = distort(PIXELS, np.random.default_rng(42), Distortions(True, 10, 10, 10))
    second = distort(PIXELS, np.random.default_rng(42), Distortions(True, 10, 10, 10))
    third = distort(PIXELS, np.random.default_rng(43), Distortions(True, 10, 10, 10))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)


@pytest.mark.parametrize("crop, scale, brightness, message", [
    (-1, 0, 0, "random_crop"), (0, -5, 0, "random_scale"), (0, 0, -1, "random_brightness"),
    (0, 0, 100, "below 100"), (float("nan"), 0, 0, "random_crop"),
])
def test_distort_validates_percentages(crop, scale, brightness, message):
    with pytest.raises(ValueError, match=message):
        distort(PIXELS, np.random.default_rng(0), Distortions(False, crop, scale, brightness))


def test_distortions_requested_and_described():
    assert not distortions_requested(Distortions())
    for field in Distortions._fields:
        value = True if field == "flip_left_right" else 5.0
        assert distortions_requested(Distortions(**{field: value}))
    assert describe(Distortions()) == "none"
    assert describe(Distortions(True, 10, random_rotation=2.5)) == "flip_left_right,random_crop=10,random_rotation=2.5"


@pytest.mark.parametrize("distortions, message", [
    (Distortions(random_rotation=-1), "random_rotation is degrees"), (Distortions(random_rotation=200), "180"),
    (Distortions(random_contrast=100), "random_contrast must be a percentage below 100"),
    (Distortions(random_gamma=float("inf")), "random_gamma"), (Distortions(random_noise=-0.5), "random_noise"),
    (Distortions(flip_left_right=1), "flip_left_right must be True or False"),
])
def test_x_ray_settings_are_checked(distortions, message):
    with pytest.raises(ValueError, match=message):
        check_distortions(distortions)


# ------------------------------------------------------------------------------------ the four X-ray distortions

SMALL = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))


def small_pixels(shape) -> np.ndarray:
    height, width, seed = shape
    return np.random.default_rng(seed).uniform(0, 255, size=(height, width, 3)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(shape=SMALL, degrees=st.floats(-180, 180))
def test_rotation_keeps_the_shape_and_stays_within_the_grey_levels_it_had(shape, degrees):
    pixels = small_pixels(shape)
    rotated = rotate_bilinear(pixels, degrees)
    assert rotated.shape == pixels.shape and rotated.dtype == np.float32
    # each output pixel blends source pixels with weights >= 0 that sum to 1
    assert rotated.min() >= pixels.min() - 1e-3 and rotated.max() <= pixels.max() + 1e-3


@settings(max_examples=20, deadline=None)
@given(shape=SMALL)
def test_rotation_by_0_is_the_identity_and_by_90_is_rot90(shape):
    pixels = small_pixels(shape)
    np.testing.assert_array_equal(rotate_bilinear(pixels, 0.0), pixels)
    square = pixels[:min(pixels.shape[:2]), :min(pixels.shape[:2])]
    np.testing.assert_allclose(rotate_bilinear(square, 90.0), np.rot90(square), atol=1e-3)


def test_rotation_turns_counter_clockwise():
    pixels = np.zeros((5, 5, 3), np.float32)
    pixels[2, 4] = 255  # a dot at the right edge, on the middle row
    turned = rotate_bilinear(pixels, 90.0)
    assert turned[0, 2, 0] == pytest.approx(255, abs=1e-3)  # now at the top edge, in the middle column
    assert turned.sum() == pytest.approx(3 * 255, abs=1e-2)


@settings(max_examples=40, deadline=None)
@given(shape=SMALL, gamma=st.floats(0.2, 5.0), contrast=st.floats(0.0, 2.0), sigma=st.floats(0, 80))
def test_gamma_contrast_and_noise_keep_shape_and_the_0_255_range(shape, gamma, contrast, sigma):
    pixels = small_pixels(shape)
    noise = np.random.default_rng(shape[2]).standard_normal(pixels.shape[:2])
    for result in (adjust_gamma(pixels, gamma), adjust_contrast(pixels, contrast), add_noise(pixels, sigma, noise)):
        assert result.shape == pixels.shape and result.dtype == np.float32
        assert result.min() >= 0 and result.max() <= 255
    grey = np.repeat(pixels[..., :1], 3, axis=2)  # a grey film stays grey: one noise field for the three channels
    noisy = add_noise(grey, sigma, noise)
    assert np.array_equal(noisy[..., 0], noisy[..., 1]) and np.array_equal(noisy[..., 0], noisy[..., 2])


@settings(max_examples=40, deadline=None)
@given(shape=SMALL, gamma=st.floats(0.2, 5.0))
def test_gamma_keeps_black_white_and_the_order_of_grey_levels(shape, gamma):
    pixels = np.concatenate([small_pixels(shape), np.zeros((1, shape[1], 3), np.float32)])  # 2 rows or more
    pixels[0, 0], pixels[-1, -1] = 0, 255
    result = adjust_gamma(pixels, gamma)
    assert result[0, 0, 0] == 0 and result[-1, -1, 0] == pytest.approx(255)
    order = np.argsort(pixels.ravel(), kind="stable")
    assert np.all(np.diff(result.ravel()[order]) >= -1e-3)


@settings(max_examples=20, deadline=None)
@given(shape=SMALL)
def test_gamma_1_contrast_1_and_no_noise_change_nothing(shape):
    pixels = small_pixels(shape)
    np.testing.assert_allclose(adjust_gamma(pixels, 1.0), pixels, atol=1e-3)
    np.testing.assert_allclose(adjust_contrast(pixels, 1.0), pixels, atol=1e-3)
    np.testing.assert_array_equal(add_noise(pixels, 0.0, np.ones(pixels.shape[:2])), pixels)


def test_contrast_scales_distances_from_the_mean():
    pixels = np.array([[[100.0] * 3, [200.0] * 3]], np.float32)  # mean 150
    np.testing.assert_allclose(adjust_contrast(pixels, 0.5)[0, :, 0], [125, 175])
    np.testing.assert_allclose(adjust_contrast(pixels, 2.0)[0, :, 0], [50, 250])


X_RAY_SETTINGS = st.builds(lambda rotation, contrast, gamma, noise: Distortions(
    random_rotation=rotation, random_contrast=contrast, random_gamma=gamma, random_noise=noise),
    st.floats(0, 20), st.floats(0, 60), st.floats(0, 60), st.floats(0, 20))


@settings(max_examples=25, deadline=None)
@given(distortions=X_RAY_SETTINGS, seed=st.integers(0, 2**32 - 1), size=st.integers(8, 40))
def test_x_ray_distortions_shape_range_and_one_seed_one_picture(distortions, seed, size):
    pixels = np.random.default_rng(seed).uniform(0, 255, size=(size + 5, size + 3, 3)).astype(np.float32)
    first = distort(pixels, np.random.default_rng(seed), distortions, size=size)
    again = distort(pixels, np.random.default_rng(seed), distortions, size=size)
    assert first.shape == (3, size, size) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    grey = first * 128 + 128  # undo (x - 128) / 128: without brightness the film keeps its 0..255
    assert grey.min() >= -1e-3 and grey.max() <= 255 + 1e-3


@pytest.mark.parametrize("field, value", [("random_rotation", 10.0), ("random_contrast", 30.0),
                                          ("random_gamma", 30.0), ("random_noise", 5.0)])
def test_each_x_ray_distortion_at_0_is_the_identity_and_on_changes_the_picture(field, value):
    plain = distort(PIXELS, np.random.default_rng(7), Distortions(True, 10, 10, 10))
    again = distort(PIXELS, np.random.default_rng(7), Distortions(True, 10, 10, 10, **{field: 0.0}))
    changed = distort(PIXELS, np.random.default_rng(7), Distortions(True, 10, 10, 10, **{field: value}))
    np.testing.assert_array_equal(plain, again)
    assert not np.allclose(plain, changed, atol=1e-2)


def test_settings_drawn_with_one_seed_differ_only_in_what_they_change():
    """The eight random numbers are drawn whatever is on: the rotated copy is the plain copy, turned."""
    base = Distortions(random_crop=10, random_brightness=0)
    plain = distort(PIXELS, np.random.default_rng(3), base)  # (3, 299, 299)
    rotated = distort(PIXELS, np.random.default_rng(3), base._replace(random_rotation=10))
    rng = np.random.default_rng(3)
    angle = (2 * rng.random(8)[5] - 1) * 10
    expected = rotate_bilinear(plain.transpose(1, 2, 0) * 128 + 128, angle)  # (299, 299, 3)
    np.testing.assert_allclose(rotated, to_backbone_input(expected), atol=1e-4)


def test_a_grey_film_distorted_as_one_channel_gives_the_numbers_of_its_rgb_copy():
    grey = PIXELS[:, :, :1]  # (H, W, 1)
    every = Distortions(True, 10, 10, 10, 5, 20, 20, 3)
    np.testing.assert_array_equal(distort(grey, np.random.default_rng(9), every),
                                  distort(np.repeat(grey, 3, axis=2), np.random.default_rng(9), every))
    with pytest.raises(ValueError, match="shape"):
        rotate_bilinear(np.zeros((4, 4, 2)), 5.0)


def test_the_settings_and_the_distortions_name_the_same_flags_in_the_same_order():
    """settings.DISTORTION_FLAGS (checked in RetrainSettings) and Distortions (what distort reads) list one set."""
    from mini_retrain.settings import DISTORTION_FLAGS

    assert Distortions._fields == DISTORTION_FLAGS
