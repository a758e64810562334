"""Recalibration for a new site: refit the scale and the bias of the final logits on a small labelled sample.

A layer trained on one hospital's films often still ranks another hospital's films well (its ROC AUC carries over)
but puts its threshold in the wrong place, and is too sure or too unsure of itself there. Before use, a clinic can
label a few films of its own and refit, on the trained layer's logits z (n, K), one scale a_k and one bias c_k per
class (Platt 1999; the temperature scaling of Guo et al. 2017, with biases):

    recalibrated logits   z'_ik = a_k z_ik + c_k                                      (n, K)
    probabilities         p_i = softmax(z'_i)                                         (n, K)
    objective             L = (1/n) sum_i [logsumexp(z'_i) - z'_{i, y_i}]  +  (l2 / 2n) |theta - theta_0|^2

Which numbers are free:
  * softmax(z' + t) = softmax(z') for a number t added to every class, so only differences of the biases matter:
    c_0 = 0 is fixed and c_1 ... c_{K-1} are fitted.
  * Two classes: p(class 1) = sigmoid(z'_1 - z'_0) = sigmoid(a_1 z_1 - a_0 z_0 + c_1). The layer was trained with
    opposite gradients for its two logits (dL/dz_0 = -dL/dz_1), so z_0 = -z_1 up to its tiny random initial weights,
    and a_0 and a_1 could hardly be told apart (a near-singular Hessian). They share one scale a = 1/T:

        p(class 1) = sigmoid(a (z_1 - z_0) + c_1)                 a temperature T = 1/a and a bias c_1

    (Platt scaling of the logit difference). Three or more classes get a scale per class; shared_scale=True gives
    them one (temperature scaling plus biases).
  * A shared scale a > 0 never changes which logit is largest, so for two classes only the bias moves the threshold
    and changes the accuracy; the ranking of the films, hence the ROC curve and its AUC, stays as it was.

The fit is Newton's method. z' is linear in the parameters theta = (scales, c_1 ... c_{K-1}), (P,):

    z'_i = J_i theta       J_i (K, P): the column of a_k holds z_ik in row k (a shared scale: all of z_i),
                           the column of c_k holds a 1 in row k
    gradient  g = (1/n) [sum_i J_i^T (p_i - onehot(y_i))          + l2 (theta - theta_0)]
    Hessian   H = (1/n) [sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i  + l2 I]
    step      theta <- theta - s H^{-1} g,   s = 1, 1/2, 1/4, ... until L has decreased enough (Armijo)

theta_0 = (1, ..., 1, 0, ..., 0) is "no change", and the start. The cross-entropy is convex in z' and z' is linear
in theta, so L has no minimum but the global one; the l2 term makes L strictly convex, so that minimum exists, is
unique, and Newton with the halving step reaches it, in a handful of steps. Without it, a sample that the layer
already separates perfectly has no minimum: L keeps falling as a -> infinity. The pull l2 = 0.1 is a Gaussian prior
of standard deviation 1/sqrt(0.1) = 3.2 around "no change" (written in the sum over the sample, so it does not grow
with n): weak against 40 films, enough to keep a separable sample's numbers finite. The step count is capped
(max_steps); the result says whether the fit converged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mini_retrain.core.softmax_layer import cross_entropy, one_hot, softmax

MIN_IMAGES_PER_CLASS = 5  # fewer films of a class than this: no recalibration (its bias would be a guess)
L2 = 0.1  # the pull toward "no change": a Gaussian prior of standard deviation 1/sqrt(L2) on (a, c)


class Recalibration(NamedTuple):
    scale: np.ndarray  # (K,) a_k; one value repeated when the classes share a scale
    bias: np.ndarray  # (K,) c_k, with c_0 = 0
    steps: int  # Newton steps taken
    converged: bool  # the Newton decrement fell below the tolerance within max_steps
    loss: float  # the objective L at the result


def recalibrated_logits(logits: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """z' = a z + c: (n, K) * (K,) + (K,) -> (n, K)."""
    return logits * scale + bias


def design_matrix(logits: np.ndarray, shared_scale: bool) -> np.ndarray:
    """J (n, K, P) with z'_i = J_i theta; P = (1 if shared_scale else K) scales + (K - 1) biases."""
    n, classes = logits.shape
    scales = 1 if shared_scale else classes
    design = np.zeros((n, classes, scales + classes - 1))  # (n, K, P)
    if shared_scale:
        design[:, :, 0] = logits  # z'_ik = a z_ik + ...
    else:
        design[:, np.arange(classes), np.arange(classes)] = logits  # z'_ik = a_k z_ik + ...
    design[:, np.arange(1, classes), scales + np.arange(classes - 1)] = 1.0  # ... + c_k, k >= 1 (c_0 = 0)
    return design


def scale_and_bias(theta: np.ndarray, classes: int, shared_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """theta (P,) -> (a (K,), c (K,)), with c_0 = 0."""
    scales = 1 if shared_scale else classes
    scale = np.broadcast_to(theta[:scales], (classes,)).copy()  # (K,)
    bias = np.r_[0.0, theta[scales:]]  # (K,)
    return scale, bias


def no_change(classes: int, shared_scale: bool) -> np.ndarray:
    """theta_0 (P,): every scale 1, every bias 0, i.e. z' = z."""
    scales = 1 if shared_scale else classes
    return np.r_[np.ones(scales), np.zeros(classes - 1)]


def objective(theta: np.ndarray, design: np.ndarray, labels: np.ndarray,
              l2: float = L2) -> tuple[float, np.ndarray, np.ndarray]:
    """(L, gradient g (P,), Hessian H (P, P)) at theta, for J = design (n, K, P) and labels (n,); see the module."""
    n, classes, _ = design.shape
    logits = design @ theta  # (n, K, P) @ (P,) -> (n, K): z'
    probabilities = softmax(logits)  # (n, K)
    shared_scale = design.shape[2] == classes  # P = 1 + (K - 1) with a shared scale, K + (K - 1) without
    pull = theta - no_change(classes, shared_scale)  # (P,) theta - theta_0
    loss = cross_entropy(logits, labels) + l2 / (2 * n) * float(pull @ pull)
    d_logits = (probabilities - one_hot(labels, classes)) / n  # (n, K) dL/dz'
    gradient = np.einsum("ikp,ik->p", design, d_logits) + l2 / n * pull  # (P,) sum_i J_i^T dL/dz'_i
    curvature = (np.einsum("ik,kl->ikl", probabilities, np.eye(classes))  # (n, K, K) diag(p_i) - p_i p_i^T
                 - np.einsum("ik,il->ikl", probabilities, probabilities))
    hessian = (np.einsum("ikp,ikl,ilq->pq", design, curvature, design)  # (P, P) sum_i J_i^T W_i J_i
               + l2 * np.eye(design.shape[2])) / n
    return loss, gradient, hessian


def check_sample(labels: np.ndarray, classes: int, class_names: list[str] | None = None) -> None:
    """A clear refusal unless every one of the K classes has MIN_IMAGES_PER_CLASS images in the sample."""
    counts = np.bincount(labels, minlength=classes)  # (K,)
    for k in range(classes):
        if counts[k] < MIN_IMAGES_PER_CLASS:
            name = repr(class_names[k]) if class_names is not None else str(k)
            raise ValueError(f"class {name} has {counts[k]} image(s) in the calibration sample; recalibration needs "
                             f"at least {MIN_IMAGES_PER_CLASS} of every class (20 or more is better): add labelled "
                             f"images of {name}")


def fit_recalibration(logits: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None,
                      shared_scale: bool | None = None, l2: float = L2, max_steps: int = 50,
                      tolerance: float = 1e-12) -> Recalibration:
    """The scale a and bias c that minimise L on the sample: logits (n, K), labels (n,) class indices.

    shared_scale: None = one scale for two classes, one per class otherwise (see the module). class_names only make
    the refusal readable. Stops when the Newton decrement g^T H^-1 g / 2 (the expected fall of L) is below tolerance.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2 or not np.all(np.isfinite(logits)):
        raise ValueError(f"logits must be finite, of shape (images, classes >= 2), got shape {logits.shape}")
    classes = logits.shape[1]
    if labels.shape != (logits.shape[0],) or labels.dtype.kind not in "iu" or (
            labels.size and (labels.min() < 0 or labels.max() >= classes)):
        raise ValueError(f"labels must be {logits.shape[0]} class indices in [0, {classes - 1}], one per row of logits")
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"class_names has {len(class_names)} names for {classes} columns of logits")
    if not (np.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a positive number (it keeps a separable sample's fit finite), got {l2!r}")
    check_sample(labels, classes, class_names)
    shared_scale = classes == 2 if shared_scale is None else shared_scale

    design = design_matrix(logits, shared_scale)  # (n, K, P)
    theta = no_change(classes, shared_scale)  # (P,)
    loss, gradient, hessian = objective(theta, design, labels, l2)
    converged, steps = False, 0
    while steps < max_steps:
        direction = -np.linalg.solve(hessian, gradient)  # (P,) the Newton step; H is positive definite
        decrement = -float(gradient @ direction) / 2  # g^T H^-1 g / 2
        if decrement < tolerance:
            converged = True
            break
        step = 1.0
        while True:  # halve until L falls by at least a fraction of what the straight line promises (Armijo)
            new_theta = theta + step * direction
            new_loss, new_gradient, new_hessian = objective(new_theta, design, labels, l2)
            if new_loss <= loss - 1e-4 * step * 2 * decrement or step < 1e-10:
                break
            step /= 2
        theta, loss, gradient, hessian = new_theta, new_loss, new_gradient, new_hessian
        steps += 1
    scale, bias = scale_and_bias(theta, classes, shared_scale)
    return Recalibration(scale, bias, steps, converged, loss)
