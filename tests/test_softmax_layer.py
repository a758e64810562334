"""Tests for mini_retrain.core.softmax_layer: the equations, checked against hand values and finite differences."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from mini_retrain.core.softmax_layer import (
    compute_logits,
    cross_entropy,
    gradient_descent_step,
    gradients,
    init_final_layer,
    one_hot,
    softmax,
)

finite = st.floats(min_value=-5, max_value=5, allow_nan=False, allow_infinity=False)


@st.composite
def layer_problem(draw):
    """Random float64 (bottlenecks, labels, weights, biases) of random small shapes."""
    batch, size, classes = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(2, 5))
    bottlenecks = draw(hnp.arrays(np.float64, (batch, size), elements=finite))
    weights = draw(hnp.arrays(np.float64, (size, classes), elements=finite))
    biases = draw(hnp.arrays(np.float64, (classes,), elements=finite))
    labels = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    return bottlenecks, labels, weights, biases


def loss_at(bottlenecks, labels, weights, biases):
    return cross_entropy(compute_logits(bottlenecks, weights, biases), labels)


@given(layer_problem())
@settings(deadline=None)
def test_analytic_gradient_matches_central_finite_differences(problem):
    bottlenecks, labels, weights, biases = problem
    d_weights, d_biases = gradients(bottlenecks, one_hot(labels, weights.shape[1]), weights, biases)

    eps = 1e-6
    numeric_w = np.zeros_like(weights)
    for index in np.ndindex(weights.shape):
        plus, minus = weights.copy(), weights.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric_w[index] = (loss_at(bottlenecks, labels, plus, biases)
                            - loss_at(bottlenecks, labels, minus, biases)) / (2 * eps)
    numeric_b = np.zeros_like(biases)
    for j in range(biases.size):
        plus, minus = biases.copy(), biases.copy()
        plus[j] += eps
        minus[j] -= eps
        numeric_b[j] = (loss_at(bottlenecks, labels, weights, plus)
                        - loss_at(bottlenecks, labels, weights, minus)) / (2 * eps)
    np.testing.assert_allclose(d_weights, numeric_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_biases, numeric_b, rtol=1e-4, atol=1e-6)


def test_gradient_by_hand_for_one_example():
    # x = [1, 2], W = 0, b = 0, y = 1, two classes: p = [1/2, 1/2], dL/dz = p - onehot = [1/2, -1/2],
    # dW = x^T dL/dz = [[1/2, -1/2], [1, -1]], db = [1/2, -1/2], L = log 2.
    x, y, w, b = np.array([[1.0, 2.0]]), np.array([1]), np.zeros((2, 2)), np.zeros(2)
    d_weights, d_biases = gradients(x, one_hot(y, 2), w, b)
    np.testing.assert_allclose(d_weights, [[0.5, -0.5], [1.0, -1.0]])
    np.testing.assert_allclose(d_biases, [0.5, -0.5])
    assert loss_at(x, y, w, b) == pytest.approx(math.log(2))


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
                  elements=st.floats(-50, 50)),
       st.floats(-1e3, 1e3))
def test_softmax_rows_sum_to_one_and_ignore_a_per_row_constant(logits, shift):
    probabilities = softmax(logits)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
    row_shifts = shift * np.arange(logits.shape[0])[:, None]  # a different constant for every row
    np.testing.assert_allclose(softmax(logits + row_shifts), probabilities, rtol=1e-9, atol=1e-12)
    # Independent naive formula (no overflow risk in this range).
    naive = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, naive, rtol=1e-9, atol=1e-300)


def test_no_overflow_or_nan_at_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        probabilities = softmax(logits)
        loss_true_is_max = cross_entropy(logits[:1], np.array([0]))
        loss_true_is_min = cross_entropy(logits[:1], np.array([1]))
    np.testing.assert_allclose(probabilities, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # By hand: logsumexp([1e4, -1e4, 0]) = 1e4 (up to e^-1e4), so the losses are 0 and 2e4.
    assert loss_true_is_max == pytest.approx(0.0, abs=1e-12)
    assert loss_true_is_min == pytest.approx(2e4)
    float32 = softmax(logits.astype(np.float32))
    assert float32.dtype == np.float32 and np.all(np.isfinite(float32))


def test_cross_entropy_single_example_is_minus_log_p_of_true_class():
    # p_0 = e^1 / (e^1 + e^2 + e^3), computed with the math module.
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert cross_entropy(np.array([[1.0, 2.0, 3.0]]), np.array([0])) == pytest.approx(expected, rel=1e-12)


@given(layer_problem())
def test_cross_entropy_is_non_negative_and_the_batch_mean(problem):
    bottlenecks, labels, weights, biases = problem
    logits = compute_logits(bottlenecks, weights, biases)
    loss = cross_entropy(logits, labels)
    assert loss >= 0
    per_example = [cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(len(labels))]
    assert loss == pytest.approx(np.mean(per_example), rel=1e-12, abs=1e-12)


@given(layer_problem())
def test_compute_logits_is_x_w_plus_b(problem):
    bottlenecks, _, weights, biases = problem
    by_loops = np.array([[sum(bottlenecks[i, d] * weights[d, j] for d in range(weights.shape[0])) + biases[j]
                          for j in range(weights.shape[1])] for i in range(bottlenecks.shape[0])])
    np.testing.assert_allclose(compute_logits(bottlenecks, weights, biases), by_loops, rtol=1e-9, atol=1e-9)


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_gradient_descent_lowers_loss_on_linearly_separable_bottlenecks(seed):
    rng = np.random.default_rng(seed)
    bottlenecks = rng.standard_normal((200, 32)).astype(np.float32)
    labels = (bottlenecks @ rng.standard_normal(32) > 0).astype(np.int64)  # separable by construction
    weights, biases = init_final_layer(32, 2, rng)
    start_loss = loss_at(bottlenecks, labels, weights, biases)
    for _ in range(50):
        d_weights, d_biases = gradients(bottlenecks, one_hot(labels, 2), weights, biases)
        gradient_descent_step(weights, biases, d_weights, d_biases, 0.5)
    end_loss = loss_at(bottlenecks, labels, weights, biases)
    assert weights.dtype == np.float32 and biases.dtype == np.float32
    assert end_loss < 0.5 * start_loss  # starts at ~log 2
    accuracy = np.mean(compute_logits(bottlenecks, weights, biases).argmax(axis=1) == labels)
    assert accuracy > 0.9


def test_gradient_descent_step_updates_in_place():
    weights, biases = np.ones((3, 2), np.float32), np.zeros(2, np.float32)
    same_weights, same_biases = weights, biases
    gradient_descent_step(weights, biases, np.full((3, 2), 2.0, np.float32), np.array([1.0, -1.0], np.float32), 0.25)
    assert same_weights is weights and same_biases is biases
    np.testing.assert_array_equal(weights, np.full((3, 2), 0.5))  # 1 - 0.25 * 2
    np.testing.assert_array_equal(biases, [-0.25, 0.25])


def test_init_matches_truncated_normal_stddev_0_001():
    weights, biases = init_final_layer(2048, 50, np.random.default_rng(0))
    assert weights.shape == (2048, 50) and weights.dtype == np.float32
    assert biases.dtype == np.float32 and np.array_equal(biases, np.zeros(50))
    assert np.all(np.abs(weights) <= 0.002)
    truncated = stats.truncnorm(-2, 2)  # independent reference: scipy's truncated standard normal
    n = weights.size
    assert abs(weights.mean()) < 5 * 0.001 * truncated.std() / math.sqrt(n)
    assert weights.std() == pytest.approx(0.001 * truncated.std(), rel=0.01)  # ~0.88 * 0.001
    # Redrawn, not clipped: no pile-up at +-0.002, and the shape matches the truncated normal.
    assert np.mean(np.abs(weights) >= 0.00199) < 0.003
    assert stats.kstest(weights.ravel().astype(np.float64) / 0.001, truncated.cdf).pvalue > 1e-3


def test_init_is_reproducible_and_validates():
    first = init_final_layer(8, 3, np.random.default_rng(5))
    again = init_final_layer(8, 3, np.random.default_rng(5))
    np.testing.assert_array_equal(first[0], again[0])
    with pytest.raises(ValueError, match="bottleneck_size"):
        init_final_layer(0, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="class_count"):
        init_final_layer(8, 1, np.random.default_rng(0))
