"""The one layer we train: a fully connected layer + softmax on top of the frozen bottlenecks.

retrain.py's `add_final_retrain_ops`, written out. For a batch of B bottlenecks x (B, D), with
weights W (D, K) and biases b (K,) over K classes:

    logits         z = x W + b                                 (B, K)
    probabilities  p = softmax(z),  p_ij = exp(z_ij) / sum_k exp(z_ik)
    loss           L = -(1/B) sum_i log p_{i, y_i}             (mean cross-entropy, y_i the true class)
    update         W <- W - lr dL/dW,   b <- b - lr dL/db      (plain gradient descent)

The weights start from a truncated normal with stddev 0.001 and the biases at zero, as in retrain.py.
Arrays are float32 in training (init_final_layer makes them so); the other functions keep the
dtype they are given, so the tests can check them in float64.
"""

import numpy as np

INIT_STDDEV = 0.001  # retrain.py: tf.truncated_normal([bottleneck_size, class_count], stddev=0.001)


def init_final_layer(
    bottleneck_size: int, class_count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Initial (weights (bottleneck_size, class_count), biases (class_count,)), float32.

    weights ~ truncated normal, stddev 0.001: like tf.truncated_normal, a draw more than 2 stddev
    from the mean is thrown away and drawn again, so every |w| <= 0.002 (and the std of what is
    kept is ~0.88 * 0.001). biases = 0.
    """
    if int(bottleneck_size) != bottleneck_size or bottleneck_size < 1:
        raise ValueError(f"bottleneck_size must be a positive integer, got {bottleneck_size!r}.")
    if int(class_count) != class_count or class_count < 2:
        raise ValueError(f"class_count must be an integer >= 2 (a classifier needs two classes), got {class_count!r}.")
    shape = (int(bottleneck_size), int(class_count))
    standard = rng.standard_normal(shape, dtype=np.float32)    # (D, K) ~ N(0, 1)
    too_far = np.abs(standard) > 2.0                            # beyond 2 stddev: redraw those only
    while too_far.any():
        standard[too_far] = rng.standard_normal(int(too_far.sum()), dtype=np.float32)
        too_far = np.abs(standard) > 2.0
    weights = standard * np.float32(INIT_STDDEV)                # (D, K) float32
    biases = np.zeros(shape[1], dtype=np.float32)               # (K,)
    return weights, biases


def _check_layer(bottlenecks: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> None:
    if bottlenecks.ndim != 2:
        raise ValueError(f"bottlenecks must be 2-D (batch, bottleneck_size), got shape {bottlenecks.shape}.")
    if weights.ndim != 2 or weights.shape[0] != bottlenecks.shape[1]:
        raise ValueError(
            f"weights must have shape (bottleneck_size, class_count) = ({bottlenecks.shape[1]}, K) to match "
            f"bottlenecks {bottlenecks.shape}, got {weights.shape}."
        )
    if biases.shape != (weights.shape[1],):
        raise ValueError(
            f"biases must have shape ({weights.shape[1]},) to match weights {weights.shape}, got {biases.shape}."
        )


def _check_labels(labels: np.ndarray, batch: int, class_count: int) -> None:
    if labels.shape != (batch,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a 1-D integer array of shape ({batch},), one class index per row, "
            f"got shape {labels.shape} dtype {labels.dtype}."
        )
    if batch and (labels.min() < 0 or labels.max() >= class_count):
        raise ValueError(f"labels must be class indices in [0, {class_count - 1}], got values in "
                         f"[{labels.min()}, {labels.max()}].")


def compute_logits(bottlenecks: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """z = x W + b: (batch, bottleneck_size) @ (bottleneck_size, classes) + (classes,) -> (batch, classes)."""
    _check_layer(bottlenecks, weights, biases)
    return bottlenecks @ weights + biases                       # (B, D) @ (D, K) + (K,) -> (B, K)


def softmax(logits: np.ndarray) -> np.ndarray:
    """p_ij = exp(z_ij - m_i) / sum_k exp(z_ik - m_i), m_i = max_k z_ik; along the last axis.

    Subtracting the row max m_i changes nothing mathematically (it cancels in the ratio) but keeps
    every exponent <= 0, so exp never overflows, and the largest term is exp(0) = 1, so the sum is
    >= 1 and never 0.
    """
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class along the last axis, got shape {logits.shape}.")
    shifted = logits - logits.max(axis=-1, keepdims=True)       # (B, K), every entry <= 0
    exps = np.exp(shifted)                                      # (B, K), in [0, 1]
    return exps / exps.sum(axis=-1, keepdims=True)              # (B, K), rows sum to 1


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """L = (1/B) sum_i -log p_{i, y_i} = (1/B) sum_i [logsumexp(z_i) - z_{i, y_i}].

    logsumexp(z_i) = m_i + log sum_k exp(z_ik - m_i) with m_i the row max (stable, as in softmax).
    Working with log p directly avoids log(0) = -inf when p underflows to 0.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be 2-D (batch, classes), got shape {logits.shape}.")
    _check_labels(labels, logits.shape[0], logits.shape[1])
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one row; the mean over an empty batch is undefined.")
    rows = np.arange(logits.shape[0])                           # (B,)
    shifted = logits - logits.max(axis=1, keepdims=True)        # (B, K) = z - m
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1))           # (B,)  = logsumexp(z) - m
    return float(np.mean(log_sum_exp - shifted[rows, labels]))  # the m's cancel


def gradients(
    bottlenecks: np.ndarray, labels: np.ndarray, weights: np.ndarray, biases: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """(dL/dW (D, K), dL/db (K,), L) for one batch: the backward pass, and the loss before the step.

    Derivation. Per example, l_i = logsumexp(z_i) - z_{i, y_i}, and d logsumexp(z_i) / dz_ij = p_ij, so

        dL/dz_ij = (p_ij - [j == y_i]) / B                      i.e. dL/dz = (softmax(z) - onehot(y)) / B

    z_ij = sum_d x_id W_dj + b_j, so by the chain rule (sum over the batch i):

        dL/dW_dj = sum_i x_id dL/dz_ij                          i.e. dL/dW = x^T dL/dz
        dL/db_j  = sum_i dL/dz_ij                               i.e. dL/db = column sums of dL/dz
    """
    _check_layer(bottlenecks, weights, biases)
    labels = np.asarray(labels)
    if bottlenecks.shape[0] == 0:
        raise ValueError("bottlenecks must hold at least one row; the loss of an empty batch is undefined.")
    _check_labels(labels, bottlenecks.shape[0], weights.shape[1])
    d_weights, d_biases = unchecked_gradients(bottlenecks, one_hot(labels, weights.shape[1]), weights, biases)
    # The loss needs the logits again: a second forward pass, paid only by callers who ask for the loss
    # (the training loop does not; it measures cross-entropy only at its evaluation steps).
    return d_weights, d_biases, cross_entropy(compute_logits(bottlenecks, weights, biases), labels)


def one_hot(labels: np.ndarray, class_count: int) -> np.ndarray:
    """(n,) class indices -> (n, class_count) float32 rows, 1 in the column of the class, 0 elsewhere."""
    return np.eye(class_count, dtype=np.float32)[labels]        # row y of the identity is onehot(y)


def unchecked_gradients(
    bottlenecks: np.ndarray, targets: np.ndarray, weights: np.ndarray, biases: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dW, dL/db) as gradients(), from one-hot targets (B, K), without checks and without the loss.

    The training loop's hot path: it checks its data once and makes the one-hot rows of every training
    image once, then calls this 4000 times. Everything after the first product is in place on one (B, K) array.
    """
    batch = bottlenecks.shape[0]
    logits = bottlenecks @ weights                              # (B, D) @ (D, K) -> (B, K)
    logits += biases                                            # z = x W + b
    d_logits = logits                                           # the same array, turned into dL/dz in place:
    d_logits -= d_logits.max(axis=1, keepdims=True)             # z - m, as in softmax(): exp cannot overflow
    np.exp(d_logits, out=d_logits)                              # exp(z - m)
    d_logits /= d_logits.sum(axis=1, keepdims=True)             # softmax(z)
    d_logits -= targets                                         # softmax(z) - onehot(y)
    d_logits /= batch                                           # dL/dz = (softmax(z) - onehot(y)) / B
    d_weights = bottlenecks.T @ d_logits                        # (D, B) @ (B, K) -> (D, K)
    d_biases = d_logits.sum(axis=0)                             # (K,)
    return d_weights, d_biases


def gradient_descent_step(
    weights: np.ndarray, biases: np.ndarray, d_weights: np.ndarray, d_biases: np.ndarray, learning_rate: float
) -> None:
    """W <- W - lr dW, b <- b - lr db, in place (the caller's arrays are updated)."""
    if d_weights.shape != weights.shape or d_biases.shape != biases.shape:
        raise ValueError(
            f"gradients must match the parameters: d_weights {d_weights.shape} vs weights {weights.shape}, "
            f"d_biases {d_biases.shape} vs biases {biases.shape}."
        )
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}.")
    weights -= learning_rate * d_weights                        # (D, K)
    biases -= learning_rate * d_biases                          # (K,)
