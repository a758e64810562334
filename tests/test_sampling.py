"""Tests for mini_retrain.core.sampling: class-balanced batches drawn with replacement, as in retrain.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mini_retrain.core.sampling import sample_batch


def unbalanced_labels(rng: np.random.Generator) -> np.ndarray:
    """1000 images of class 0 and 10 of class 1, shuffled so classes are interleaved."""
    return rng.permutation(np.repeat([0, 1], [1000, 10]))


def test_classes_are_drawn_uniformly_however_unbalanced():
    labels = unbalanced_labels(np.random.default_rng(0))
    drawn = labels[sample_batch(labels, 200_000, np.random.default_rng(1))]
    class_counts = np.bincount(drawn, minlength=2)
    # Class-uniform: ~50% / ~50%, although class 1 has 1% of the images.
    assert stats.chisquare(class_counts).pvalue > 1e-4
    assert abs(class_counts[1] / drawn.size - 0.5) < 0.01


def test_images_within_a_class_are_drawn_uniformly():
    labels = unbalanced_labels(np.random.default_rng(0))
    indices = sample_batch(labels, 200_000, np.random.default_rng(2))
    for klass in (0, 1):
        members = np.flatnonzero(labels == klass)
        per_image = np.bincount(indices, minlength=labels.size)[members]
        assert per_image.sum() > 0
        assert stats.chisquare(per_image).pvalue > 1e-4


def test_every_index_has_probability_one_over_classes_times_class_size():
    # Independent statement of retrain.py's distribution: P(i) = 1 / (n_classes * count[label[i]]).
    labels = np.random.default_rng(3).permutation(np.repeat([7, 2, 40], [1, 5, 50]))  # gaps in class ids
    draws = 300_000
    observed = np.bincount(sample_batch(labels, draws, np.random.default_rng(4)), minlength=labels.size)
    class_size = {c: np.sum(labels == c) for c in np.unique(labels)}
    expected = np.array([draws / (3 * class_size[c]) for c in labels])
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_same_seed_same_batch_different_seed_different_batch():
    labels = unbalanced_labels(np.random.default_rng(0))
    first = sample_batch(labels, 100, np.random.default_rng(42))
    again = sample_batch(labels, 100, np.random.default_rng(42))
    other = sample_batch(labels, 100, np.random.default_rng(43))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("batch_size", [-1, -100])
def test_negative_batch_size_returns_every_index(batch_size):
    labels = np.array([1, 0, 1, 1, 0])
    np.testing.assert_array_equal(sample_batch(labels, batch_size, np.random.default_rng(0)), np.arange(5))


@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=300),
    st.integers(1, 500),
    st.integers(0, 2**32 - 1),
)
@settings(deadline=None)
def test_indices_are_always_valid(label_list, batch_size, seed):
    labels = np.array(label_list)
    indices = sample_batch(labels, batch_size, np.random.default_rng(seed))
    assert indices.shape == (batch_size,)
    assert indices.dtype.kind == "i"
    assert indices.min() >= 0 and indices.max() < labels.size


@given(st.lists(st.integers(0, 3), min_size=1, max_size=50), st.integers(0, 2**32 - 1))
@settings(deadline=None)
def test_every_present_class_is_reachable(label_list, seed):
    labels = np.array(label_list)
    drawn = labels[sample_batch(labels, 2000, np.random.default_rng(seed))]
    # With at most 4 classes, each has P >= 1/4 per draw; missing one in 2000 draws has P < 1e-240.
    assert set(drawn) == set(label_list)


@pytest.mark.parametrize(
    "labels, batch_size, message",
    [
        (np.array([], dtype=int), 10, "non-empty"),
        (np.zeros((2, 3), dtype=int), 10, "1-D"),
        (np.array([0.0, 1.0]), 10, "integer"),
        (np.array([0, 1]), 0, "batch_size"),
        (np.array([0, 1]), 2.5, "batch_size"),
    ],
)
def test_bad_input_raises_clear_value_error(labels, batch_size, message):
    with pytest.raises(ValueError, match=message):
        sample_batch(labels, batch_size, np.random.default_rng(0))
