"""The one layer we train: a fully connected layer + softmax on top of the frozen bottlenecks.

retrain.py's `add_final_retrain_ops`, written out. For a batch of B bottlenecks x (B, D), with
weights W (D, K) and biases b (K,) over K classes:

    logits         z = x W + b                                 (B, K)
    probabilities  p = softmax(z),  p_ij = exp(z_ij) / sum_k exp(z_ik)
    loss           L = -(1/B) sum_i log p_{i, y_i}             (mean cross-entropy, y_i the true class)
    update         W <- W - lr dL/dW,   b <- b - lr dL/db      (plain gradient descent)

The weights start from a truncated normal with stddev 0.001 and the biases at zero, as in retrain.py.
Arrays are float32 in training (init_final_layer makes them so); the other functions keep the
dtype they are given, so the tests can check them in float64. They check nothing: the caller checks its
inputs once (checks.py), as the training loop does before its first step.
"""

import numpy as np

from mini_retrain.core.checks import check_class_count, check_positive

INIT_STDDEV = 0.001  # retrain.py: tf.truncated_normal([bottleneck_size, class_count], stddev=0.001)


def init_final_layer(
    bottleneck_size: int, class_count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Initial (weights (bottleneck_size, class_count), biases (class_count,)), float32.

    weights ~ truncated normal, stddev 0.001: like tf.truncated_normal, a draw more than 2 stddev
    from the mean is thrown away and drawn again, so every |w| <= 0.002 (and the std of what is
    kept is ~0.88 * 0.001). biases = 0.
    """
    check_positive(bottleneck_size, "bottleneck_size", integer=True)
    check_class_count(class_count)
    shape = (int(bottleneck_size), int(class_count))
    standard = rng.standard_normal(shape, dtype=np.float32)    # (D, K) ~ N(0, 1)
    too_far = np.abs(standard) > 2.0                            # beyond 2 stddev: redraw those only
    while too_far.any():
        standard[too_far] = rng.standard_normal(int(too_far.sum()), dtype=np.float32)
        too_far = np.abs(standard) > 2.0
    weights = standard * np.float32(INIT_STDDEV)                # (D, K) float32
    biases = np.zeros(shape[1], dtype=np.float32)               # (K,)
    return weights, biases


def compute_logits(bottlenecks: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """z = x W + b: (batch, bottleneck_size) @ (bottleneck_size, classes) + (classes,) -> (batch, classes)."""
    return bottlenecks @ weights + biases                       # (B, D) @ (D, K) + (K,) -> (B, K)


def softmax(logits: np.ndarray) -> np.ndarray:
    """p_ij = exp(z_ij - m_i) / sum_k exp(z_ik - m_i), m_i = max_k z_ik; along the last axis.

    Subtracting the row max m_i changes nothing mathematically (it cancels in the ratio) but keeps
    every exponent <= 0, so exp never overflows, and the largest term is exp(0) = 1, so the sum is
    >= 1 and never 0.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)       # (B, K), every entry <= 0
    exps = np.exp(shifted)                                      # (B, K), in [0, 1]
    return exps / exps.sum(axis=-1, keepdims=True)              # (B, K), rows sum to 1


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """L = (1/B) sum_i -log p_{i, y_i} = (1/B) sum_i [logsumexp(z_i) - z_{i, y_i}].

    logsumexp(z_i) = m_i + log sum_k exp(z_ik - m_i) with m_i the row max (stable, as in softmax).
    Working with log p directly avoids log(0) = -inf when p underflows to 0.
    logits (B, K) with B >= 1, labels (B,) class indices (checks.check_labels).
    """
    rows = np.arange(logits.shape[0])                           # (B,)
    shifted = logits - logits.max(axis=1, keepdims=True)        # (B, K) = z - m
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1))           # (B,)  = logsumexp(z) - m
    return float(np.mean(log_sum_exp - shifted[rows, labels]))  # the m's cancel


def one_hot(labels: np.ndarray, class_count: int) -> np.ndarray:
    """(n,) class indices -> (n, class_count) float32 rows, 1 in the column of the class, 0 elsewhere."""
    return np.eye(class_count, dtype=np.float32)[labels]        # row y of the identity is onehot(y)


def gradients(
    bottlenecks: np.ndarray, targets: np.ndarray, weights: np.ndarray, biases: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dW (D, K), dL/db (K,)) of the mean cross-entropy of one batch: the backward pass.

    bottlenecks x (B, D), targets onehot(y) (B, K) (see one_hot), weights W (D, K), biases b (K,).

    Derivation. Per example, l_i = logsumexp(z_i) - z_{i, y_i}, and d logsumexp(z_i) / dz_ij = p_ij, so

        dL/dz_ij = (p_ij - [j == y_i]) / B                      i.e. dL/dz = (softmax(z) - onehot(y)) / B

    z_ij = sum_d x_id W_dj + b_j, so by the chain rule (sum over the batch i):

        dL/dW_dj = sum_i x_id dL/dz_ij                          i.e. dL/dW = x^T dL/dz
        dL/db_j  = sum_i dL/dz_ij                               i.e. dL/db = column sums of dL/dz

    No checks and no loss: the training loop checks its data once (checks.py) and calls this at every step; it
    computes the loss (cross_entropy) only at the steps it logs.
    """
    probabilities = softmax(compute_logits(bottlenecks, weights, biases))  # p = softmax(x W + b)   (B, K)
    d_logits = (probabilities - targets) / bottlenecks.shape[0]  # dL/dz = (p - onehot(y)) / B     (B, K)
    d_weights = bottlenecks.T @ d_logits                        # (D, B) @ (B, K) -> (D, K)
    d_biases = d_logits.sum(axis=0)                             # (K,)
    return d_weights, d_biases


def gradient_descent_step(
    weights: np.ndarray, biases: np.ndarray, d_weights: np.ndarray, d_biases: np.ndarray, learning_rate: float
) -> None:
    """W <- W - lr dW, b <- b - lr db, in place (the caller's arrays are updated)."""
    weights -= learning_rate * d_weights                        # (D, K)
    biases -= learning_rate * d_biases                          # (K,)
