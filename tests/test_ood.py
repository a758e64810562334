"""Tests for mini_retrain.evaluation.ood on synthetic bottlenecks whose distribution we know."""

from typing import NamedTuple

import numpy as np
import pytest

from mini_retrain.evaluation.ood import (
    THRESHOLD_MARGIN,
    OODModel,
    fit_ood_model,
    is_out_of_distribution,
    mahalanobis_distance,
    power_normalise,
)


class Population(NamedTuple):
    """Two or more Gaussian classes with one shared covariance (low rank + isotropic noise)."""

    means: np.ndarray  # (classes, d)
    loadings: np.ndarray  # (d, rank)
    noise: float


def make_population(seed: int, d: int, class_count: int = 2, rank: int = 5) -> Population:
    rng = np.random.default_rng(seed)
    means = 1.0 + 0.5 * rng.normal(size=(1, d)) + 0.3 * rng.normal(size=(class_count, d))
    return Population(means=means, loadings=0.4 * rng.normal(size=(d, rank)), noise=0.3)


def from_gaussian(z: np.ndarray) -> np.ndarray:
    """The bottlenecks x whose power normalisation r(x) = sign(x) sqrt(|x|) is z: x = sign(z) z^2.

    ood.py models r(x) as Gaussian, so the synthetic populations are Gaussian in r-space."""
    return np.sign(z) * z * z


def sample(population: Population, rng, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n bottlenecks (classes in turn) and their labels; shift moves every feature (in r-space) by the same amount."""
    class_count, d = population.means.shape
    labels = np.arange(n) % class_count
    factors = rng.normal(size=(n, population.loadings.shape[1]))
    x = population.means[labels] + factors @ population.loadings.T + population.noise * rng.normal(size=(n, d))
    return from_gaussian(x + shift), labels


# ---------------------------------------------------------------- the distance itself


def ledoit_wolf_by_definition(deviations):
    """Ledoit & Wolf (2004) straight from the paper: <A, B> = trace(A B^T) / d, one sample at a time."""
    n, d = deviations.shape
    identity = np.eye(d)
    S = deviations.T @ deviations / n

    def inner(a, b):
        return np.trace(a @ b.T) / d

    m = inner(S, identity)
    delta2 = inner(S - m * identity, S - m * identity)
    beta_bar2 = sum(inner(np.outer(x, x) - S, np.outer(x, x) - S) for x in deviations) / n**2
    shrinkage = min(beta_bar2, delta2) / delta2
    return shrinkage, shrinkage * m * identity + (1 - shrinkage) * S


@pytest.mark.parametrize("n, d", [(10, 6), (5, 8), (40, 12)])  # n > d, n < d, n >> d
def test_distance_equals_direct_mahalanobis_computation(n, d):
    rng = np.random.default_rng(n * 100 + d)
    bottlenecks = rng.random((n, d)) * 3.0
    labels = np.arange(n) % 2
    model = fit_ood_model(bottlenecks, labels, class_count=2)

    features = power_normalise(bottlenecks)  # r(x), what the model is fit on
    means = np.stack([features[labels == c].mean(axis=0) for c in range(2)])
    shrinkage, sigma = ledoit_wolf_by_definition(features - means[labels])
    assert model.shrinkage == pytest.approx(shrinkage, rel=1e-9)
    np.testing.assert_allclose(model.means, means, rtol=1e-6)

    queries = rng.random((7, d)) * 4.0
    inverse = np.linalg.inv(sigma)
    expected = [
        min(np.sqrt((x - mu) @ inverse @ (x - mu)) for mu in means) for x in power_normalise(queries)
    ]
    np.testing.assert_allclose(mahalanobis_distance(model, queries), expected, rtol=1e-4)
    np.testing.assert_allclose(model.precision, inverse, rtol=1e-4, atol=1e-4 * np.abs(inverse).max())


def test_threshold_follows_the_documented_leave_one_out_rule():
    # n = 8 <= 10, so the K-fold rule is leave-one-out: each image is scored by a model fit without it.
    rng = np.random.default_rng(7)
    bottlenecks = rng.random((8, 5)) * 2.0
    labels = np.array([0, 1] * 4)
    model = fit_ood_model(bottlenecks, labels, class_count=2)
    held_out = []
    for i in range(8):
        keep = np.arange(8) != i
        without_i = fit_ood_model(bottlenecks[keep], labels[keep], class_count=2)
        held_out.append(mahalanobis_distance(without_i, bottlenecks[i : i + 1])[0])
    assert model.threshold == pytest.approx(THRESHOLD_MARGIN * np.quantile(held_out, 0.99), rel=1e-5)
    # Training images sit closer to a model fit on them than held-out ones do: that is why we hold out.
    assert np.median(mahalanobis_distance(model, bottlenecks)) < np.median(held_out)


def test_lower_quantile_gives_lower_threshold():
    population = make_population(3, d=40)
    bottlenecks, labels = sample(population, np.random.default_rng(0), 60)
    assert fit_ood_model(bottlenecks, labels, 2, quantile=0.5).threshold < fit_ood_model(
        bottlenecks, labels, 2, quantile=0.99
    ).threshold


# ---------------------------------------------------------------- shrinkage


def test_shrinkage_is_in_unit_interval_and_falls_with_more_images():
    population = make_population(1, d=50)
    rng = np.random.default_rng(1)
    shrinkages = []
    for n in (16, 60, 300):
        bottlenecks, labels = sample(population, rng, n)
        shrinkages.append(fit_ood_model(bottlenecks, labels, 2).shrinkage)
    assert all(0.0 <= s <= 1.0 for s in shrinkages)
    assert shrinkages[0] > shrinkages[1] > shrinkages[2]


def test_isotropic_data_is_shrunk_more_than_structured_data():
    # If the true covariance is a multiple of I, the identity target is right and s should be large;
    # with strongly correlated features (low rank + small noise) the sample covariance carries
    # real structure and s should be smaller.
    rng = np.random.default_rng(2)
    isotropic = 5.0 + rng.normal(size=(30, 60))
    structured = 5.0 + rng.normal(size=(30, 3)) @ rng.normal(size=(3, 60)) + 0.1 * rng.normal(size=(30, 60))
    single_class = np.zeros(30, dtype=int)
    s_isotropic = fit_ood_model(from_gaussian(isotropic), single_class, 1).shrinkage
    s_structured = fit_ood_model(from_gaussian(structured), single_class, 1).shrinkage
    assert 0.0 <= s_structured < 0.5 < s_isotropic <= 1.0


# ---------------------------------------------------------------- the flag rates


@pytest.mark.parametrize(
    "n, d, seed",
    [
        (300, 50, 0),  # plenty of images
        (60, 200, 1),  # n < d
        (16, 100, 2),  # the smallest training set we support in practice
        (16, 2048, 3),  # ... at Inception's real width
        (24, 150, 4),
    ],
)
def test_same_distribution_rarely_flagged_and_far_samples_always(n, d, seed):
    population = make_population(seed, d)
    rng = np.random.default_rng(100 + seed)
    train, labels = sample(population, rng, n)
    model = fit_ood_model(train, labels, class_count=2)

    new_same, _ = sample(population, rng, 1000)
    assert np.mean(is_out_of_distribution(model, new_same)) <= 0.05

    # Every feature moved by 1.5 (5 noise standard deviations): nothing like the training data.
    far, _ = sample(population, rng, 200, shift=1.5)
    assert is_out_of_distribution(model, far).all()
    # A different kind of image altogether: features of the wrong scale and no class structure.
    other = np.random.default_rng(seed).random((50, d)) * 10.0
    assert is_out_of_distribution(model, other).all()


def test_nearest_class_decides():
    # A sample from either class is near its own class mean, even if far from the other one.
    population = make_population(5, d=30)
    population = population._replace(means=population.means + np.array([[0.0], [3.0]]))  # classes far apart
    rng = np.random.default_rng(5)
    train, labels = sample(population, rng, 200)
    model = fit_ood_model(train, labels, class_count=2)
    new, new_labels = sample(population, rng, 400)
    assert np.mean(is_out_of_distribution(model, new[new_labels == 0])) <= 0.05
    assert np.mean(is_out_of_distribution(model, new[new_labels == 1])) <= 0.05
    # Halfway between the two classes is far from both.
    midway = population.means.mean(axis=0)
    assert is_out_of_distribution(model, midway[None, :])[0]


def test_class_with_a_single_image_still_fits():
    # When that image is held out, its class is absent from the fold; the fold scores the others.
    population = make_population(6, d=20, class_count=3)
    train, labels = sample(population, np.random.default_rng(6), 12)
    labels = np.array([0, 1] * 5 + [0, 2])
    model = fit_ood_model(train, labels, class_count=3)
    assert np.isfinite(model.threshold) and model.threshold > 0
    assert model.means.shape == (3, 20)


def test_is_out_of_distribution_is_distance_above_threshold():
    population = make_population(8, d=30)
    rng = np.random.default_rng(8)
    train, labels = sample(population, rng, 40)
    model = fit_ood_model(train, labels, 2)
    queries = np.concatenate([sample(population, rng, 20)[0], sample(population, rng, 20, shift=0.6)[0]])
    distances = mahalanobis_distance(model, queries)
    assert distances.shape == (40,)
    np.testing.assert_array_equal(is_out_of_distribution(model, queries), distances > model.threshold)
    # A threshold exactly at a distance: "above" means strictly above.
    at_threshold = model._replace(threshold=float(mahalanobis_distance(model, queries[:1])[0]))
    assert not is_out_of_distribution(at_threshold, queries[:1])[0]


# ---------------------------------------------------------------- input checks


def test_fit_rejects_bad_input_with_clear_messages():
    rng = np.random.default_rng(10)
    bottlenecks = rng.random((12, 8))
    labels = np.arange(12) % 2
    with pytest.raises(ValueError, match="shape"):
        fit_ood_model(bottlenecks[0], labels, 2)
    with pytest.raises(ValueError, match="no training images"):
        fit_ood_model(bottlenecks, labels, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_ood_model(bottlenecks, labels + 1, 2)
    with pytest.raises(ValueError, match="at least 4"):
        fit_ood_model(bottlenecks[:3], labels[:3], 2)
    with pytest.raises(ValueError, match="quantile"):
        fit_ood_model(bottlenecks, labels, 2, quantile=99)
    with pytest.raises(ValueError, match="NaN"):
        fit_ood_model(np.where(bottlenecks > 0.9, np.nan, bottlenecks), labels, 2)
    with pytest.raises(ValueError, match="do not vary"):
        fit_ood_model(np.ones((12, 8)), labels, 2)


def test_distance_rejects_wrong_width_and_single_vector():
    rng = np.random.default_rng(11)
    model = fit_ood_model(rng.random((12, 8)), np.arange(12) % 2, 2)
    with pytest.raises(ValueError, match="9 numbers per image, expected 8"):
        mahalanobis_distance(model, rng.random((3, 9)))
    with pytest.raises(ValueError, match="reshape"):
        mahalanobis_distance(model, rng.random(8))


def test_power_normalise_is_signed_square_root():
    x = np.array([[0.0, 4.0, 2.25, -9.0]])
    np.testing.assert_allclose(power_normalise(x), [[0.0, 2.0, 1.5, -3.0]])
