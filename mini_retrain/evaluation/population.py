"""Another population: "were these X-rays taken like the training X-rays?"

The OOD distance (ood.py) works on pool_3, the top of the network, and separates photos from X-rays. It does not
separate adult films from children's films: ImageNet's top layers see "a chest X-ray" in both. An earlier block
still sees how the film was taken (the body's proportions, the exposure, the machine's processing, the view), so a
second distance on the global average `a` of that block (POPULATION_LAYER) tells a model trained on children's films
that an adult film is not one of them:

    z        = (a - mu) V                             the first k principal components of the training a's
    distance = sqrt(z^T Sigma^-1 z)                   Sigma: Ledoit-Wolf shrunk covariance of the training z's

One Gaussian for all training images (a population is not a class). Why PCA first: a block average has 768 numbers,
many of which vary little and noisily between X-rays; the first k directions in which the training films vary carry
what tells films apart, and in k dimensions the covariance is better estimated. Sigma is shrunk towards a scaled
identity with the Ledoit-Wolf choice (ood._shrunk_gaussian, the same formula as the OOD model).

The threshold is the QUANTILE-th quantile of held-out distances (K = min(10, n) folds; PCA and covariance refit
without the fold, as ood.py does for its threshold): about 1 in 100 new films like the training ones lies above it.

How the layer and k were chosen (docs/algorithm.md, section 13, has the figures and commands): a model of 314
pediatric films of kermany-train-400 (retrain's 80% training split, and five other 80% splits by child) against
100 adult TBX11K films (adult-tb-100), the 16 pediatric pneumonia-demo films and photos. pool_3 and mixed_7 miss
most adult films (k = 160: 39%, 30%); raw averages beat power-normalised ones (as ood.py uses) wherever the goal
came near (mixed_4, k = 96: 99% against 88% of the adult films); a small k misses adults (mixed_4, k = 64: 66-77%),
a large one flags the demo films too (mixed_4, k = 256: 2-5 of 16), which are sharp originals where the training
films are 224-pixel copies. mixed_6 with k = 160 flagged 95-98% of the adult films in all six splits and none of
the demo films. The same data chose the layer and k and measured them, so those figures are optimistic.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mini_retrain.core.checks import check_bottlenecks
from mini_retrain.evaluation.ood import (
    MAX_FOLDS, _shrunk_gaussian, _nearest_class_distance, shrunk_precision, stratified_folds)

POPULATION_LAYER = "mixed_6"  # the block whose global average the distance is measured on (chosen by measurement)
COMPONENTS = 160  # k principal components kept (at most n - 1)
QUANTILE = 0.99  # threshold = this quantile of the held-out distances: about 1% of films like the training ones above
MIN_IMAGES = 5  # fewer training images give no population model

POPULATION_WARNING = ("WARNING: unlike the training X-rays (another population, machine or view?): distance "
                      "{distance:.1f} > {threshold:.1f}; no score for such images was ever tested")


class PopulationModel(NamedTuple):
    """A Gaussian of the training images' principal components, and the distance above which an image is unlike them."""

    layer: str  # the backbone layer whose global average is measured, e.g. mixed_4
    mean: np.ndarray  # (d,) float32, mean of the training averages a
    components: np.ndarray  # (d, k) float32, V: the first k principal directions
    precision: np.ndarray  # (k, k) float32, Sigma^-1
    threshold: float
    shrinkage: float  # Ledoit-Wolf weight s of the scaled identity, in [0, 1]


class _Fit(NamedTuple):
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (d, k)
    gaussian: object  # ood._ShrunkGaussian of the (n, k) scores, one class


def _fit(features: np.ndarray, components: int) -> _Fit:
    """PCA of (n, d) float64 averages, then the shrunk Gaussian of their (n, k) scores."""
    mean = features.mean(axis=0)  # (d,)
    centred = features - mean  # (n, d)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)  # rows: principal directions, largest first
    k = min(components, len(features) - 1, features.shape[1])
    basis = directions[:k].T  # (d, k)
    scores = centred @ basis  # (n, d) @ (d, k) -> (n, k)
    return _Fit(mean, basis, _shrunk_gaussian(scores, np.zeros(len(scores), np.int64), 1))


def _distance(fit: _Fit, features: np.ndarray) -> np.ndarray:
    """(q,) distance of (q, d) averages under `fit`."""
    scores = (features - fit.mean) @ fit.components  # (q, d) @ (d, k) -> (q, k)
    return _nearest_class_distance(fit.gaussian, scores)


def fit_population_model(pooled: np.ndarray, layer: str = POPULATION_LAYER, components: int = COMPONENTS,
                         quantile: float = QUANTILE) -> PopulationModel:
    """Fit the population distance to (n, d) training averages `pooled` of `layer` (all classes together).

    threshold = quantile-th quantile of K-fold held-out distances (K = min(10, n); each fold's PCA and covariance
    fit without it)."""
    features = check_bottlenecks(pooled, name="pooled", finite=True).astype(np.float64)  # (n, d)
    n = features.shape[0]
    if n < MIN_IMAGES:
        raise ValueError(f"the population model needs at least {MIN_IMAGES} training images, got {n}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], e.g. 0.99, got {quantile!r}")
    if isinstance(components, bool) or int(components) != components or components < 1:
        raise ValueError(f"components must be a whole number >= 1, got {components!r}")
    fold = stratified_folds(np.zeros(n, np.int64), min(MAX_FOLDS, n))  # (n,)
    held_out = np.empty(n)
    for k in np.unique(fold):
        out = fold == k
        held_out[out] = _distance(_fit(features[~out], components), features[out])
    fit = _fit(features, components)
    return PopulationModel(layer=layer, mean=fit.mean.astype(np.float32), components=fit.components.astype(np.float32),
                           precision=shrunk_precision(fit.gaussian).astype(np.float32),
                           threshold=float(np.quantile(held_out, quantile)), shrinkage=fit.gaussian.shrinkage)


def population_distance(model: PopulationModel, pooled: np.ndarray) -> np.ndarray:
    """(n,) sqrt(z^T Sigma^-1 z), z = (a - mu) V, for (n, d) averages `pooled` of model.layer."""
    features = check_bottlenecks(pooled, name="pooled", size=model.mean.shape[0], finite=True).astype(np.float64)
    scores = (features - model.mean.astype(np.float64)) @ model.components.astype(np.float64)  # (n, k)
    squared = np.sum((scores @ model.precision.astype(np.float64)) * scores, axis=1)  # (n,)
    return np.sqrt(np.maximum(squared, 0.0))


def population_warning(distance: float, threshold: float) -> str:
    """The line `label` and `explain` print for an image above the threshold."""
    return POPULATION_WARNING.format(distance=distance, threshold=threshold)
