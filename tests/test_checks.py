"""Tests for mini_retrain.core.checks: each check passes good input through and names the parameter in its error."""

import numpy as np
import pytest

from mini_retrain.core.checks import (
    check_batch_size, check_bottlenecks, check_class_count, check_labels, check_layer, check_positive)


def test_check_labels_returns_int64_class_indices():
    labels = check_labels(np.array([2, 0, 1], np.uint8), 3)
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]
    assert check_labels(np.array([]), 2).shape == (0,)  # np.array([]) is float64, but empty: nothing wrong in it


@pytest.mark.parametrize("labels, kwargs, message", [
    (np.array([0, 2]), {}, r"labels must be class indices in \[0, 1\], got values in \[0, 2\]"),
    (np.array([0, -1]), {}, r"class indices in \[0, 1\]"),
    (np.array([0.0, 1.0]), {}, "labels must hold integer class indices, got dtype float64"),
    (np.zeros((2, 2), int), {}, r"labels must be a 1-D array of shape \(n,\), got shape \(2, 2\)"),
    (np.array([0, 1]), {"rows": 3}, r"shape \(3,\), one class index per row, got shape \(2,\)"),
    (np.array([], int), {"allow_empty": False}, "must be a non-empty 1-D array"),
    (np.array([0, 5]), {"name": "train_labels"}, r"^train_labels must be class indices"),
])
def test_check_labels_names_the_parameter_and_the_fault(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_labels(labels, 2, **kwargs)


def test_check_bottlenecks():
    x = np.ones((3, 4), np.float32)
    assert check_bottlenecks(x, size=4) is x
    with pytest.raises(ValueError, match=r"bottlenecks must have shape \(images, bottleneck_size\).*reshape"):
        check_bottlenecks(np.ones(4))
    with pytest.raises(ValueError, match="validation_bottlenecks has 4 numbers per image, expected 5"):
        check_bottlenecks(x, name="validation_bottlenecks", size=5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_bottlenecks(np.array([[1.0, np.inf]]), finite=True)
    check_bottlenecks(np.array([[1.0, np.inf]]))  # finiteness is asked for only where it matters


def test_check_layer():
    check_layer(np.zeros((3, 2)), np.zeros(2), 3)
    with pytest.raises(ValueError, match=r"weights must have shape \(bottleneck_size, class_count\) = \(4, K\)"):
        check_layer(np.zeros((3, 2)), np.zeros(2), 4)
    with pytest.raises(ValueError, match=r"biases must have shape \(2,\)"):
        check_layer(np.zeros((3, 2)), np.zeros(3), 3)


@pytest.mark.parametrize("value, integer, ok", [
    (0.01, False, True), (1, False, True), (0, False, False), (-0.1, False, False), (float("nan"), False, False),
    (float("inf"), False, False), ("0.1", False, False), (True, False, False),
    (1, True, True), (np.int64(4000), True, True), (0, True, False), (2.0, True, False), (True, True, False),
])
def test_check_positive(value, integer, ok):
    if ok:
        check_positive(value, "learning_rate", integer=integer)
    else:
        with pytest.raises(ValueError, match="^learning_rate must be a"):
            check_positive(value, "learning_rate", integer=integer)


def test_check_batch_size_and_class_count():
    for good in (1, 100, -1):
        check_batch_size(good)
    for bad in (0, 2.5, "100", None):
        with pytest.raises(ValueError, match="^train_batch_size must be a positive whole number, or -1"):
            check_batch_size(bad, "train_batch_size")
    check_class_count(2)
    with pytest.raises(ValueError, match="class_count must be a whole number >= 2"):
        check_class_count(1)
