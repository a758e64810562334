"""Out-of-distribution check: "is this image like the training images?"

A softmax layer must split all of image space between its classes, so a photo of a cow still
gets "normal (score = 0.99828)". The score says which side of the boundary the image falls on,
not whether it belongs anywhere near the training data. So, before trusting a prediction, we ask
a separate question of the bottleneck x (2048 numbers from Inception v3):

    distance(x) = min over classes c of sqrt((r(x) - mu_c)^T Sigma^-1 (r(x) - mu_c))

the Mahalanobis distance to the nearest class mean, under a Gaussian model of the training
bottlenecks: one mean mu_c per class and one covariance Sigma shared by all classes. Far from
every class (distance above a threshold) -> "out of distribution": do not trust the label.

r(x) = sign(x) sqrt(|x|), elementwise ("power normalisation"). pool_3 features are averages of
ReLU outputs: non-negative and right-skewed, most near 0 and a few large. The square root brings
them closer to Gaussian, so one large feature no longer dominates the distance. On the real
features below it widened the gap between the farthest held-out X-ray and the nearest photo
from about 1.17x to about 1.38x. For bottlenecks (never negative) r(x) is just sqrt(x).

Two practical problems, and what we do about them:

1. Too few images for the covariance. Sigma has 2048 x 2049 / 2 entries and we may have 16
   images; the sample covariance S (pooled over classes: each image minus its own class mean,
   divided by n) is then singular. We shrink it toward a scaled identity,

       Sigma = (1 - s) S + s m I,      m = trace(S) / d,

   with the Ledoit-Wolf (2004) closed-form choice of s in [0, 1]: the s that minimises the
   expected squared (Frobenius) error to the true covariance, estimated from the data itself.
   Few images -> s near 1 (trust the identity); many images -> s near 0 (trust S).

2. Training images look closer than new images. An image that helped fit mu_c and Sigma is
   optimistically near them (with 16 images in 2048-d every training image sits at the same
   small distance); thresholding on those distances would flag nearly every new X-ray. So the
   threshold is set on held-out distances: split the training set into K = min(10, n) folds
   (stratified by class), fit on K - 1 folds, and measure the held-out fold. With n <= 10 this
   is leave-one-out.

The threshold rule:

    threshold = THRESHOLD_MARGIN * quantile_q(held-out distances),   q = 0.99 by default

The held-out models see (K-1)/K of the data, so their distances run a little larger than the
final model's on new images of the same kind. The margin covers what a small training set
cannot estimate: the 99th percentile of 16 numbers is close to their maximum, and a new image
of the same kind exceeds the maximum of n held-out ones about 1/(n + 1) of the time.

How the margin was chosen: real Inception bottlenecks of 16 pediatric chest X-rays and 26
scikit-image photos (cat, coffee, astronaut, text, moon, a CT phantom, ...). For each X-ray, a
model was fit on r(x) of the other 15 and its distance measured, as were distances of 6 cropped,
brightened and rotated copies of it and of every photo. Relative to the 99th-percentile rule
alone (margin 1), held-out X-rays reached 1.03, their altered copies 1.18, and the nearest
photo in the worst split 1.45. A margin of 1.3 sits between those: no held-out X-ray or copy
flagged, every photo flagged in every split (the nearest at 1.11 times the threshold). Fewer
images narrow the gap (fit on 5, some photos fall among the held-out X-rays), so treat the
check as meaningful from about 16 training images; with more, the covariance learns how X-rays
vary and the shrinkage toward "every direction varies alike" fades.

Cost: each of the K + 1 fits works with the smaller Gram matrix, n x n or d x d: O(min(n, d)^2 max(n, d)) time and
min(n, d)^2 memory (10k images: d x d = 32 MB, where n x n would be 800 MB per matrix and an n^3 Cholesky);
1000 images x 2048 features fit in about 1-2 s on 2 cores.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.linalg import solve_triangular

from mini_retrain.core.checks import check_bottlenecks, check_labels

# What label and explain print under an image beyond the threshold.
OOD_WARNING = ("WARNING: this image is unlike the training images (out of distribution: distance {distance:.1f} > "
               "threshold {threshold:.1f}); the scores above should not be trusted")
THRESHOLD_MARGIN = 1.3  # threshold = margin * held-out quantile; see the module docstring
MAX_FOLDS = 10  # K = min(MAX_FOLDS, n) folds for the held-out distances
MIN_SHRINKAGE = 1e-6  # keeps Sigma invertible when n < d even if Ledoit-Wolf says "no shrinkage"


class OODModel(NamedTuple):
    """Gaussian model of training bottlenecks and the distance above which an image is "unlike" them."""

    means: np.ndarray  # (classes, d) float32, mean bottleneck per class
    precision: np.ndarray  # (d, d) float32, inverse of the shrunk shared covariance
    threshold: float  # Mahalanobis distance above which an image is out of distribution
    shrinkage: float  # Ledoit-Wolf weight s of the scaled identity, in [0, 1]


class _ShrunkGaussian(NamedTuple):
    """Sigma = a X^T X + f I, kept as the Cholesky factor of the smaller of its two Gram forms.

    X (n, d) holds each training feature vector minus its class mean, a = (1 - s) / n and f = s m, so
    a X^T X = (1 - s) S. With fewer images than features (n <= d, the usual case), distances never need the d x d
    matrix: by the Woodbury identity

        Sigma^-1 = (I - a X^T (a X X^T + f I)^-1 X) / f,

    so with the Cholesky factor L L^T = a X X^T + f I (n x n) and k = X z,

        z^T Sigma^-1 z = (||z||^2 - a ||L^-1 k||^2) / f.

    With more images than features (n > d), L is the d x d factor of Sigma itself and z^T Sigma^-1 z = ||L^-1 z||^2:
    an n x n matrix would cost n^2 memory and n^3 time (10k images: 800 MB per matrix).
    """

    means: np.ndarray  # (classes, d) float64, NaN rows for a class absent from this fit
    deviations: np.ndarray | None  # (n, d) X when n <= d (Woodbury form), else None
    cholesky: np.ndarray  # lower-triangular L: (n, n) with L L^T = a X X^T + f I, or (d, d) with L L^T = Sigma
    weight: float  # a = (1 - s) / n
    floor: float  # f = s m, the variance Sigma keeps in every direction
    shrinkage: float  # s


def power_normalise(bottlenecks: np.ndarray) -> np.ndarray:
    """r(x) = sign(x) sqrt(|x|), elementwise: makes skewed, non-negative pool_3 features closer to Gaussian."""
    root = np.sqrt(np.abs(bottlenecks))  # one new array, then everything in place
    return np.copysign(root, bottlenecks, out=root)


def _shrunk_gaussian(features: np.ndarray, labels: np.ndarray, class_count: int) -> _ShrunkGaussian:
    """Class means + Ledoit-Wolf shrunk pooled covariance, for float64 (n, d) features.

    Everything comes from one Gram matrix, the smaller of X X^T (n x n) and X^T X (d x d): both have the same trace
    and the same Frobenius norm, which is all that Ledoit-Wolf needs."""
    n, d = features.shape
    means = np.full((class_count, d), np.nan)  # (classes, d); NaN rows for classes with no images here
    for c in np.unique(labels):
        means[c] = features[labels == c].mean(axis=0)
    deviations = features - means[labels]  # (n, d) X: each image minus its own class mean
    woodbury = n <= d
    gram = deviations @ deviations.T if woodbury else deviations.T @ deviations  # (n, n) X X^T, or (d, d) X^T X

    # Ledoit & Wolf (2004), with the normalised norm ||A||^2 = trace(A A^T) / d:
    #   S = X^T X / n,  m = trace(S) / d,  delta^2 = ||S - m I||^2 = ||S||_F^2 / d - m^2,
    #   beta_bar^2 = (1/n^2) sum_k ||x_k x_k^T - S||^2,  s = min(beta_bar^2, delta^2) / delta^2.
    # trace(S) = sum_k ||x_k||^2 / n and ||S||_F^2 = ||X X^T||_F^2 / n^2 = ||X^T X||_F^2 / n^2; since
    # ||x x^T - S||_F^2 = ||x||^4 - 2 x^T S x + ||S||_F^2 with sum_k x_k^T S x_k = n ||S||_F^2,
    # beta_bar^2 = (mean_k ||x_k||^4 - ||S||_F^2) / (n d).
    norms2 = np.einsum("kj,kj->k", deviations, deviations)  # (n,) ||x_k||^2
    m = norms2.sum() / n / d
    if m <= 0.0:
        raise ValueError(
            "bottlenecks do not vary within any class (every image equals its class mean); "
            "the OOD model needs at least two different images of some class"
        )
    frobenius2 = np.vdot(gram, gram) / (n * n)  # ||S||_F^2
    delta2 = frobenius2 / d - m * m
    beta2_bar = (np.mean(norms2 * norms2) - frobenius2) / (n * d)
    shrinkage = 1.0 if delta2 <= 0.0 else min(beta2_bar, delta2) / delta2
    shrinkage = float(min(1.0, max(shrinkage, MIN_SHRINKAGE)))

    weight, floor = (1.0 - shrinkage) / n, shrinkage * m
    gram *= weight
    gram[np.diag_indices_from(gram)] += floor  # in place: a X X^T + f I, or a X^T X + f I = Sigma
    cholesky = np.linalg.cholesky(gram)  # (n, n) or (d, d)
    return _ShrunkGaussian(means, deviations if woodbury else None, cholesky, weight, floor, shrinkage)


def _squared_distances(gaussian: _ShrunkGaussian, z: np.ndarray) -> np.ndarray:
    """(q,) z^T Sigma^-1 z of (q, d) vectors z, from the Cholesky factor (see _ShrunkGaussian)."""
    if gaussian.deviations is None:  # L L^T = Sigma
        solved = solve_triangular(gaussian.cholesky, z.T, lower=True)  # (d, q) L^-1 z
        return np.sum(solved * solved, axis=0)
    k = z @ gaussian.deviations.T  # (q, d) @ (d, n) -> (q, n)
    solved = solve_triangular(gaussian.cholesky, k.T, lower=True)  # (n, q) L^-1 k
    return (np.sum(z * z, axis=1) - gaussian.weight * np.sum(solved * solved, axis=0)) / gaussian.floor


def _nearest_class_distance(gaussian: _ShrunkGaussian, features: np.ndarray) -> np.ndarray:
    """(q,) distance of (q, d) features to the nearest class mean."""
    squared = np.full((features.shape[0], gaussian.means.shape[0]), np.inf)  # (q, classes)
    for c, mean in enumerate(gaussian.means):
        if not np.isnan(mean[0]):  # NaN: class absent from this fold's training part
            squared[:, c] = _squared_distances(gaussian, features - mean)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def stratified_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """(n,) fold of each image: stratified and deterministic (sort by class, then deal the images out like cards)."""
    fold = np.empty(labels.size, dtype=np.int64)
    fold[np.argsort(labels, kind="stable")] = np.arange(labels.size) % folds
    return fold


def shrunk_precision(gaussian: _ShrunkGaussian) -> np.ndarray:
    """The (d, d) Sigma^-1, once, for fast use at prediction time:
    Woodbury: (I - a W^T W) / f with W = L^-1 X (n, d);  otherwise (L L^T)^-1 = L^-T L^-1."""
    if gaussian.deviations is None:
        inverse = solve_triangular(gaussian.cholesky, np.eye(len(gaussian.cholesky)), lower=True)  # (d, d) L^-1
        return inverse.T @ inverse
    solved = solve_triangular(gaussian.cholesky, gaussian.deviations, lower=True)  # (n, d)
    precision = -gaussian.weight * (solved.T @ solved)  # (d, n) @ (n, d) -> (d, d)
    precision[np.diag_indices_from(precision)] += 1.0
    precision /= gaussian.floor
    return precision


def _held_out_distances(features: np.ndarray, labels: np.ndarray, class_count: int) -> np.ndarray:
    """(n,) distance of each training image under a model fit without its fold (K = min(10, n))."""
    n = labels.size
    folds = min(MAX_FOLDS, n)
    fold = stratified_folds(labels, folds)
    distances = np.empty(n)
    for k in range(folds):
        held_out = fold == k
        gaussian = _shrunk_gaussian(features[~held_out], labels[~held_out], class_count)
        distances[held_out] = _nearest_class_distance(gaussian, features[held_out])
    return distances


def fit_ood_model(
    bottlenecks: np.ndarray, labels: np.ndarray, class_count: int, quantile: float = 0.99
) -> OODModel:
    """Fit class means and a shrunk shared covariance to (n, d) training bottlenecks.

    threshold = THRESHOLD_MARGIN * quantile-th quantile of K-fold held-out distances.
    """
    bottlenecks = check_bottlenecks(bottlenecks, finite=True).astype(np.float64)  # (n, d)
    features = power_normalise(bottlenecks)  # (n, d) r(x)
    n = features.shape[0]
    labels = check_labels(labels, class_count, rows=n)
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], e.g. 0.99, got {quantile!r}")
    missing = np.flatnonzero(np.bincount(labels, minlength=class_count) == 0)
    if missing.size:
        raise ValueError(f"classes {missing.tolist()} have no training images; every class needs some")
    if n < class_count + 2:
        raise ValueError(
            f"the OOD model needs at least {class_count + 2} training images for {class_count} classes, got {n}"
        )
    held_out = _held_out_distances(features, labels, class_count)  # first: its K fits are freed before the last
    threshold = THRESHOLD_MARGIN * float(np.quantile(held_out, quantile))
    gaussian = _shrunk_gaussian(features, labels, class_count)
    return OODModel(
        means=gaussian.means.astype(np.float32),
        precision=shrunk_precision(gaussian).astype(np.float32),
        threshold=threshold,
        shrinkage=gaussian.shrinkage,
    )


def mahalanobis_distance(model: OODModel, bottlenecks: np.ndarray) -> np.ndarray:
    """(n,) sqrt((r(x) - mu_c)^T Sigma^-1 (r(x) - mu_c)) for the nearest class mean mu_c (means of r(x))."""
    bottlenecks = check_bottlenecks(bottlenecks, size=model.means.shape[1], finite=True).astype(np.float64)  # (n, d)
    features = power_normalise(bottlenecks)  # (n, d) r(x)
    precision = model.precision.astype(np.float64)  # (d, d)
    squared = np.empty((features.shape[0], model.means.shape[0]))  # (n, classes)
    for c, mean in enumerate(model.means.astype(np.float64)):
        z = features - mean  # (n, d)
        squared[:, c] = np.sum((z @ precision) * z, axis=1)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def is_out_of_distribution(model: OODModel, bottlenecks: np.ndarray) -> np.ndarray:
    """(n,) bool: True where the image is farther than model.threshold from every class."""
    return mahalanobis_distance(model, bottlenecks) > model.threshold
