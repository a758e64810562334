"""The training loop of retrain.py: random batches of bottlenecks, one gradient descent step each, and its log lines.

    for step in 0 .. how_many_training_steps - 1:
        batch  = sample_batch(training labels)                     # class first, then an image, with replacement
        dW, db = gradients of the mean cross-entropy on the batch   # softmax_layer.gradients
        W, b  -= learning_rate * (dW, db)                          # plain gradient descent
        every eval_step_interval steps, and at the last one:
            "Step N: Train accuracy = X%"       on the batch just trained on (after the step, as retrain.py)
            "Step N: Cross entropy = Y"         on that batch
            "Step N: Validation accuracy = Z% (N=M)"   on a fresh random validation batch

Only the final layer learns; the bottlenecks are fixed numbers, which is why thousands of steps take well under a
second. Features of an earlier block (--bottleneck_layers mixed_6, ...) are far smaller than pool_3's (a typical
standard deviation of 0.02-0.06 against 0.2), so at retrain.py's learning rate the layer barely moves from its
start; they are trained standardised, (x - mean) / scale with the training rows' mean and standard deviation, and
the scaling is then folded into the layer (`standardisation`, `folded`), so the graph still computes x W + b.

With distorted copies (`train_copies`, N cached distorted versions of every training film), each drawn film
gives one of its 1 + N versions, uniformly (sampling.sample_versions). With `distorted_bottlenecks` instead, each batch
comes from freshly distorted images (slow: the backbone runs at every step, as in retrain.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mini_retrain.core.checks import (
    check_batch_size, check_bottlenecks, check_train_copies, check_labels, check_positive)
from mini_retrain.core.sampling import group_by_class, sample_from_groups, sample_versions
from mini_retrain.core.softmax_layer import (
    compute_logits, cross_entropy, gradient_descent_step, gradients, init_final_layer, one_hot)


class FinalLayer(NamedTuple):
    weights: np.ndarray  # (bottleneck_size, class_count) float32
    biases: np.ndarray  # (class_count,) float32


def standardisation(bottlenecks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), scale (D,)) of (n, D) training rows: each feature's mean and standard deviation (a feature that
    never varies keeps scale 1), float32."""
    bottlenecks = np.asarray(bottlenecks, dtype=np.float64)
    mean, scale = bottlenecks.mean(axis=0), bottlenecks.std(axis=0)  # (D,), (D,)
    return mean.astype(np.float32), np.where(scale > 0, scale, 1.0).astype(np.float32)


def folded(layer: FinalLayer, mean: np.ndarray, scale: np.ndarray) -> FinalLayer:
    """A layer trained on (x - mean) / scale, as the same function of x itself:

        ((x - m) / s) W + b = x W' + b',   W' = W / s (row by row),   b' = b - (m / s) W
    """
    weights = layer.weights / scale[:, None]  # (D, C): row d divided by s_d
    biases = layer.biases - (mean / scale) @ layer.weights  # (C,) - (D,) @ (D, C)
    return FinalLayer(weights.astype(np.float32), biases.astype(np.float32))


def accuracy(layer: FinalLayer, bottlenecks: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is the true class (softmax does not change the argmax)."""
    predictions = compute_logits(bottlenecks, layer.weights, layer.biases).argmax(axis=1)
    return float((predictions == labels).mean())


def train_final_layer(
    train_bottlenecks: np.ndarray,
    train_labels: np.ndarray,
    validation_bottlenecks: np.ndarray,
    validation_labels: np.ndarray,
    class_count: int,
    rng: np.random.Generator,
    *,
    how_many_training_steps: int,
    learning_rate: float,
    train_batch_size: int,
    validation_batch_size: int,
    eval_step_interval: int,
    class_balancing: bool,
    log: Callable[[str], None] = print,
    distorted_bottlenecks: Callable[[np.ndarray], np.ndarray] | None = None,
    on_step: Callable[[int, FinalLayer], None] | None = None,
    on_evaluation: Callable[[dict], None] | None = None,
    train_copies: np.ndarray | None = None,
) -> tuple[FinalLayer, list[dict]]:
    """Train the final layer; return it and the per-evaluation history (dicts, one per logged step).

    train_bottlenecks (n, D) float32 with train_labels (n,) int; validation likewise (may be empty).
    The settings are retrain.py's flags of the same names, with no defaults here: RetrainSettings
    (mini_retrain/settings.py) holds them, and the caller passes them on.
    distorted_bottlenecks(indices) -> (batch, D), when given, supplies the training batch instead of the cache.
    on_step(step, layer) is called after every step (for intermediate graphs); on_evaluation(row) with each history
    row as it is made (for a progress display).
    class_balancing: True draws each batch as retrain.py does (a class uniformly, then one of its images:
    sampling.sample_batch); False draws every image with the same probability (sampling.uniform_batch).
    train_copies (copies, n, D): distorted copies of the training rows; each drawn row is then replaced by one of
    its 1 + copies versions, uniformly (version 0 = the row itself).
    """
    # The checks, once, before the first step (the functions called 4000 times below check nothing).
    check_positive(how_many_training_steps, "how_many_training_steps", integer=True)
    check_positive(learning_rate, "learning_rate")
    check_positive(eval_step_interval, "eval_step_interval", integer=True)
    check_batch_size(train_batch_size, "train_batch_size")
    check_batch_size(validation_batch_size, "validation_batch_size")
    train_bottlenecks = check_bottlenecks(train_bottlenecks, name="train_bottlenecks")
    size = train_bottlenecks.shape[1]
    validation_bottlenecks = check_bottlenecks(validation_bottlenecks, name="validation_bottlenecks", size=size)
    train_labels = check_labels(train_labels, class_count, name="train_labels", rows=len(train_bottlenecks),
                                allow_empty=False)
    validation_labels = check_labels(validation_labels, class_count, name="validation_labels",
                                     rows=len(validation_bottlenecks))
    train_bottlenecks = np.ascontiguousarray(train_bottlenecks, dtype=np.float32)
    validation_bottlenecks = np.ascontiguousarray(validation_bottlenecks, dtype=np.float32)
    layer = FinalLayer(*init_final_layer(size, class_count, rng))
    history: list[dict] = []

    # Done once, not at every step: the class grouping of the labels and their one-hot rows.
    train_groups = group_by_class(train_labels)
    train_targets = one_hot(train_labels, class_count)  # (n, classes)
    validation_groups = group_by_class(validation_labels) if len(validation_labels) else None
    versions = None
    if train_copies is not None:
        train_copies = check_train_copies(train_copies, train_bottlenecks.shape)
        versions = np.concatenate([train_bottlenecks[None], train_copies])  # (1 + copies, n, D)

    for step in range(how_many_training_steps):
        batch = sample_from_groups(train_groups, train_batch_size, rng, class_balancing)  # (batch,) indices
        if distorted_bottlenecks is not None:
            x = distorted_bottlenecks(batch)  # (batch, D): the backbone on freshly distorted images
        elif versions is not None:
            version = sample_versions(batch.size, len(versions), rng)  # (batch,) 0 = the film, 1.. = a copy
            x = versions[version, batch]  # (batch, D)
        else:
            x = train_bottlenecks[batch]  # (batch, D) gathered rows
        d_weights, d_biases = gradients(x, train_targets[batch], layer.weights, layer.biases)
        gradient_descent_step(layer.weights, layer.biases, d_weights, d_biases, learning_rate)
        if on_step is not None:
            on_step(step, layer)

        is_last_step = step + 1 == how_many_training_steps
        if step % eval_step_interval == 0 or is_last_step:
            # retrain.py measures the batch just trained on, after the update.
            logits = compute_logits(x, layer.weights, layer.biases)  # (batch, classes)
            y = train_labels[batch]  # (batch,)
            row = {
                "step": step,
                "train_accuracy": float((logits.argmax(axis=1) == y).mean()),
                "cross_entropy": cross_entropy(logits, y),
            }
            log(f"Step {step}: Train accuracy = {row['train_accuracy'] * 100:.1f}%")
            log(f"Step {step}: Cross entropy = {row['cross_entropy']:f}")
            if len(validation_labels):
                chosen = sample_from_groups(validation_groups, validation_batch_size, rng)
                row["validation_accuracy"] = accuracy(layer, validation_bottlenecks[chosen], validation_labels[chosen])
                row["validation_n"] = int(len(chosen))
                log(f"Step {step}: Validation accuracy = {row['validation_accuracy'] * 100:.1f}% (N={len(chosen)})")
            history.append(row)
            if on_evaluation is not None:
                on_evaluation(row)
    return layer, history


def train_layer(bottlenecks: np.ndarray, labels: np.ndarray, class_count: int, rng: np.random.Generator, *,
                how_many_training_steps: int, learning_rate: float, train_batch_size: int,
                class_balancing: bool, standardise: bool = False,
                train_copies: np.ndarray | None = None) -> FinalLayer:
    """train_final_layer without its log lines and validation: one fold of crossval, one setting of sweep.

    bottlenecks (n, D), labels (n,), train_copies (copies, n, D) or None. Each step: a batch (class-balanced or
    uniform over images, then a version of each, see sampling.py), then one gradient descent step on the batch's
    mean cross-entropy. standardise: train on the standardised rows (and copies, with the rows' own mean and
    scale) and return the layer folded back onto the raw ones (`standardisation`, `folded`).
    """
    if standardise:
        mean, scale = standardisation(bottlenecks)
        bottlenecks = (bottlenecks - mean) / scale  # (n, D)
        if train_copies is not None:
            train_copies = (train_copies - mean) / scale  # (copies, n, D): the films' own mean and scale
    no_validation = np.zeros((0, np.shape(bottlenecks)[1]), np.float32), np.zeros(0, np.int64)
    layer, _ = train_final_layer(bottlenecks, labels, *no_validation, class_count, rng,
                                 how_many_training_steps=how_many_training_steps, learning_rate=learning_rate,
                                 train_batch_size=train_batch_size, validation_batch_size=-1,
                                 eval_step_interval=how_many_training_steps, class_balancing=class_balancing,
                                 log=lambda line: None, train_copies=train_copies)
    return folded(layer, mean, scale) if standardise else layer
