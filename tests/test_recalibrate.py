"""Tests for mini_retrain.core.recalibrate: derivatives against finite differences, known optima, refusals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mini_retrain.core.recalibrate import (
    design_matrix, fit_recalibration, no_change, objective, recalibrated_logits, scale_and_bias)
from mini_retrain.core.softmax_layer import cross_entropy, softmax

finite = st.floats(min_value=-5, max_value=5, allow_nan=False, allow_infinity=False)


@st.composite
def recalibration_problem(draw):
    """Random (design J, labels, theta, l2) of small shapes, both parametrisations."""
    n, classes, shared = draw(st.integers(1, 8)), draw(st.integers(2, 4)), draw(st.booleans())
    logits = draw(hnp.arrays(np.float64, (n, classes), elements=finite))
    labels = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    parameters = (1 if shared else classes) + classes - 1
    theta = draw(hnp.arrays(np.float64, (parameters,), elements=st.floats(-3, 3)))
    l2 = draw(st.floats(0.0, 1.0))
    return design_matrix(logits, shared), labels, theta, l2, logits, shared


@given(recalibration_problem())
@settings(deadline=None)
def test_gradient_and_hessian_match_central_finite_differences(problem):
    design, labels, theta, l2, _, _ = problem
    loss, gradient, hessian = objective(theta, design, labels, l2)
    eps = 1e-6
    numeric_gradient = np.zeros_like(theta)
    numeric_hessian = np.zeros((theta.size, theta.size))
    for j in range(theta.size):
        plus, minus = theta.copy(), theta.copy()
        plus[j] += eps
        minus[j] -= eps
        loss_plus, gradient_plus, _ = objective(plus, design, labels, l2)
        loss_minus, gradient_minus, _ = objective(minus, design, labels, l2)
        numeric_gradient[j] = (loss_plus - loss_minus) / (2 * eps)
        numeric_hessian[:, j] = (gradient_plus - gradient_minus) / (2 * eps)
    np.testing.assert_allclose(gradient, numeric_gradient, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hessian, numeric_hessian, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)


@given(recalibration_problem())
@settings(deadline=None)
def test_the_design_matrix_is_a_z_plus_c(problem):
    """J theta, the linear form the Newton step works on, is z' = a z + c with c_0 = 0; the loss is its cross-entropy."""
    design, labels, theta, _, logits, shared = problem
    scale, bias = scale_and_bias(theta, logits.shape[1], shared)
    assert bias[0] == 0.0
    np.testing.assert_allclose(design @ theta, recalibrated_logits(logits, scale, bias), atol=1e-12)
    loss, _, _ = objective(theta, design, labels, l2=0.0)
    assert loss == pytest.approx(cross_entropy(recalibrated_logits(logits, scale, bias), labels), abs=1e-12)
    np.testing.assert_array_equal(scale_and_bias(no_change(logits.shape[1], shared), logits.shape[1], shared)[0], 1.0)


def sampled_labels(logits, scale, bias, rng):
    """Labels drawn from softmax(a z + c): the sample a known recalibration would explain exactly."""
    probabilities = softmax(recalibrated_logits(logits, scale, bias))  # (n, K)
    uniform = rng.uniform(size=(len(logits), 1))
    return (uniform > probabilities.cumsum(axis=1)).sum(axis=1)  # inverse CDF per row


@pytest.mark.parametrize("scale, bias, shared", [
    ([0.5, 0.5], [0.0, 1.2], None),  # two classes: a temperature T = 2 and a bias
    ([0.5, 1.5, 1.0], [0.0, 1.0, -0.5], False),  # three classes, a scale per class
    ([2.0, 2.0, 2.0], [0.0, -1.0, 0.5], True),  # three classes, one temperature
])
def test_a_known_recalibration_is_recovered_from_logits_it_generated(scale, bias, shared):
    rng = np.random.default_rng(13)
    classes = len(scale)
    logits = rng.normal(0.0, 2.0, size=(20000, classes))  # (n, K)
    labels = sampled_labels(logits, np.array(scale), np.array(bias), rng)
    fitted = fit_recalibration(logits, labels, shared_scale=shared)
    assert fitted.converged and fitted.steps < 20
    # 20000 draws: the maximum-likelihood estimate is within a few standard errors (about 0.02-0.04 here).
    np.testing.assert_allclose(fitted.scale, scale, atol=0.1)
    np.testing.assert_allclose(fitted.bias, bias, atol=0.1)
    # And it is the optimum of L: the gradient vanishes there (to what the stopping rule, L within 1e-12, asks).
    theta = np.r_[fitted.scale[:1] if classes == 2 or shared else fitted.scale, fitted.bias[1:]]
    _, gradient, _ = objective(theta, design_matrix(logits, classes == 2 if shared is None else shared), labels)
    assert np.abs(gradient).max() < 1e-6


def test_constant_logits_give_the_log_odds_of_the_sample_as_bias():
    """z = 0 everywhere: only c_1 matters, and p(class 1) = sigmoid(c_1) must equal the share 15/20: c_1 = log 3."""
    labels = np.array([0] * 5 + [1] * 15)
    fitted = fit_recalibration(np.zeros((20, 2)), labels, l2=1e-9)
    assert fitted.bias[1] == pytest.approx(math.log(3), abs=1e-5)
    assert fitted.scale[0] == pytest.approx(1.0)  # nothing to learn about the scale: the pull keeps it at 1


def test_a_separable_sample_gets_a_finite_fit_and_a_weaker_pull_a_larger_scale():
    """Every image right with a margin: without the L2 pull the scale would grow without end."""
    logits = np.array([[1.0, -1.0]] * 10 + [[-1.0, 1.0]] * 10)
    labels = np.array([0] * 10 + [1] * 10)
    strong, weak = fit_recalibration(logits, labels, l2=1.0), fit_recalibration(logits, labels, l2=0.01)
    assert strong.converged and weak.converged
    assert 1.0 < strong.scale[0] < weak.scale[0] < 20.0
    assert np.all(np.isfinite(weak.bias))


def test_fewer_than_five_images_of_a_class_are_refused_by_name():
    logits = np.zeros((9, 2))
    with pytest.raises(ValueError, match=r"class 'pneumonia' has 4 image\(s\).*at least 5"):
        fit_recalibration(logits, np.array([0] * 5 + [1] * 4), ["normal", "pneumonia"])
    with pytest.raises(ValueError, match=r"class 'c' has 0 image"):
        fit_recalibration(np.zeros((10, 3)), np.array([0] * 5 + [1] * 5), ["a", "b", "c"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="logits"):
        fit_recalibration(np.zeros(10), np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        fit_recalibration(np.zeros((10, 2)), np.full(10, 2))
    with pytest.raises(ValueError, match="l2"):
        fit_recalibration(np.zeros((10, 2)), np.array([0, 1] * 5), l2=0.0)


def test_a_capped_fit_says_it_did_not_converge():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 2)) * 5
    labels = np.array([0, 1] * 20)
    assert not fit_recalibration(logits, labels, max_steps=1).converged
    assert fit_recalibration(logits, labels).converged
