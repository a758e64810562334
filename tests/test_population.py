"""The population distance ("unlike the training X-rays"): its formula, its threshold rule, its place in the graph,
and its warning in label and explain. On synthetic numbers and a tiny backbone (conftest.tiny_layered_backbone);
the figures on real X-rays are in docs/algorithm.md, section 13."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mini_retrain.evaluation.population import fit_population_model, population_distance, population_warning


def gaussian_rows(n, d, seed):
    """Correlated Gaussian rows: a fixed random mixing of independent normals."""
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing


@settings(max_examples=20, deadline=None)
@given(n=st.integers(8, 60), d=st.integers(3, 30), components=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_distance_is_mahalanobis_of_the_principal_components_under_the_shrunk_covariance(n, d, components, seed):
    """distance(x) = sqrt(z^T Sigma^-1 z), z = (x - mu) V with V the first k right singular vectors of the centred
    training rows, Sigma = (1 - s) S + s m I (S = Z^T Z / n, m = trace(S) / k), computed here directly."""
    train, new = gaussian_rows(n, d, seed), gaussian_rows(5, d, seed + 1)
    model = fit_population_model(train, components=components)
    mean = train.mean(axis=0)
    _, _, directions = np.linalg.svd(train - mean, full_matrices=False)
    k = min(components, n - 1, d)
    assert model.components.shape == (d, k)
    basis = directions[:k].T
    np.testing.assert_allclose(np.abs(model.components.T @ basis), np.eye(k), atol=1e-3)  # same directions (+- sign)
    scores = (train - mean) @ basis  # (n, k)
    covariance = scores.T @ scores / n
    s = model.shrinkage
    assert 0.0 <= s <= 1.0
    sigma = (1 - s) * covariance + s * np.trace(covariance) / k * np.eye(k)
    z = (new - mean) @ basis
    expected = np.sqrt(np.einsum("ij,jk,ik->i", z, np.linalg.inv(sigma), z))
    np.testing.assert_allclose(population_distance(model, new), expected, rtol=2e-3, atol=2e-3)


def test_about_one_in_a_hundred_alike_are_flagged_and_another_population_is():
    """The threshold is the 99th percentile of held-out distances: new rows from the training distribution lie
    above it about 1% of the time, rows of a population that varies three times as much nearly always."""
    train = gaussian_rows(500, 40, 0)
    model = fit_population_model(train, components=20)
    alike = population_distance(model, gaussian_rows(4000, 40, 1)) > model.threshold
    assert 0.002 < alike.mean() < 0.03
    other = population_distance(model, 3 * gaussian_rows(200, 40, 2)) > model.threshold
    assert other.mean() > 0.95
    # a lower quantile, a lower threshold
    assert fit_population_model(train, components=20, quantile=0.9).threshold < model.threshold


def test_bad_input_is_refused_with_the_parameter_named():
    rows = gaussian_rows(20, 6, 0)
    with pytest.raises(ValueError, match="at least 5 training images"):
        fit_population_model(rows[:4])
    with pytest.raises(ValueError, match="components must be a whole number"):
        fit_population_model(rows, components=0)
    with pytest.raises(ValueError, match="quantile"):
        fit_population_model(rows, quantile=1.5)
    model = fit_population_model(rows)
    with pytest.raises(ValueError, match="has 5 features but the model was fit on 6"):
        population_distance(model, rows[:, :5])
    assert population_warning(12.34, 5.0) == (
        "WARNING: unlike the training X-rays (another population, machine or view?): distance 12.3 > 5.0; "
        "no score for such images was ever tested")
