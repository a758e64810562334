"""The training loop of retrain.py: random batches of bottlenecks, one gradient descent step each, and its log lines.

    for step in 0 .. how_many_training_steps - 1:
        batch  = sample_batch(training labels)                     # class first, then an image, with replacement
        dW, db = gradients of the mean cross-entropy on the batch   # softmax_layer.unchecked_gradients
        W, b  -= learning_rate * (dW, db)                          # plain gradient descent
        every eval_step_interval steps, and at the last one:
            "Step N: Train accuracy = X%"       on the batch just trained on (after the step, as retrain.py)
            "Step N: Cross entropy = Y"         on that batch
            "Step N: Validation accuracy = Z% (N=M)"   on a fresh random validation batch

Only the final layer learns; the bottlenecks are fixed numbers, which is why thousands of steps take well under a
second. With distorted copies (`train_copies`, N cached distorted versions of every training film), each drawn film
gives one of its 1 + N versions, uniformly (sampling.sample_versions). With `distorted_bottlenecks` instead, each batch
comes from freshly distorted images (slow: the backbone runs at every step, as in retrain.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mini_retrain.core.sampling import group_by_class, sample_from_groups, sample_versions
from mini_retrain.core.softmax_layer import (
    compute_logits, cross_entropy, gradient_descent_step, init_final_layer, one_hot, unchecked_gradients)


class FinalLayer(NamedTuple):
    weights: np.ndarray  # (bottleneck_size, class_count) float32
    biases: np.ndarray  # (class_count,) float32


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
    how_many_training_steps: int = 4000,
    learning_rate: float = 0.01,
    train_batch_size: int = 100,
    validation_batch_size: int = 100,
    eval_step_interval: int = 10,
    log: Callable[[str], None] = print,
    distorted_bottlenecks: Callable[[np.ndarray], np.ndarray] | None = None,
    on_step: Callable[[int, FinalLayer], None] | None = None,
    class_balancing: bool = True,
    train_copies: np.ndarray | None = None,
) -> tuple[FinalLayer, list[dict]]:
    """Train the final layer; return it and the per-evaluation history (dicts, one per logged step).

    train_bottlenecks (n, D) float32 with train_labels (n,) int; validation likewise (may be empty).
    distorted_bottlenecks(indices) -> (batch, D), when given, supplies the training batch instead of the cache.
    on_step(step, layer) is called after every step (for intermediate graphs).
    class_balancing: True draws each batch as retrain.py does (a class uniformly, then one of its images:
    sampling.sample_batch); False draws every image with the same probability (sampling.uniform_batch).
    train_copies (copies, n, D): distorted copies of the training rows; each drawn row is then replaced by one of
    its 1 + copies versions, uniformly (version 0 = the row itself).
    """
    if how_many_training_steps < 1:
        raise ValueError(f"--how_many_training_steps must be at least 1, got {how_many_training_steps}")
    if learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {learning_rate}")
    if eval_step_interval < 1:
        raise ValueError(f"--eval_step_interval must be at least 1, got {eval_step_interval}")
    train_bottlenecks = np.ascontiguousarray(train_bottlenecks, dtype=np.float32)
    validation_bottlenecks = np.ascontiguousarray(validation_bottlenecks, dtype=np.float32)
    layer = FinalLayer(*init_final_layer(train_bottlenecks.shape[1], class_count, rng))
    history: list[dict] = []

    # Done once, not at every step: the class grouping of the labels, their one-hot rows, and the input
    # checks of softmax_layer.gradients (the loop calls its unchecked core, unchecked_gradients).
    train_labels, validation_labels = np.asarray(train_labels), np.asarray(validation_labels)
    if train_bottlenecks.ndim != 2 or train_labels.shape != (len(train_bottlenecks),):
        raise ValueError(f"train_bottlenecks (n, D) and train_labels (n,) must match, got shapes "
                         f"{train_bottlenecks.shape} and {train_labels.shape}")
    if train_labels.dtype.kind not in "iu" or train_labels.min() < 0 or train_labels.max() >= class_count:
        raise ValueError(f"train_labels must be class indices in [0, {class_count - 1}]")
    train_groups = group_by_class(train_labels)
    train_targets = one_hot(train_labels, class_count)  # (n, classes)
    validation_groups = group_by_class(validation_labels) if len(validation_labels) else None
    versions = None
    if train_copies is not None:
        if train_copies.ndim != 3 or train_copies.shape[1:] != train_bottlenecks.shape:
            raise ValueError(f"train_copies must be (copies, n, D) with (n, D) = {train_bottlenecks.shape}, got "
                             f"{train_copies.shape}")
        versions = np.concatenate([train_bottlenecks[None], train_copies.astype(np.float32)])  # (1 + copies, n, D)

    for step in range(how_many_training_steps):
        batch = sample_from_groups(train_groups, train_batch_size, rng, class_balancing)  # (batch,) indices
        if distorted_bottlenecks is not None:
            x = distorted_bottlenecks(batch)  # (batch, D): the backbone on freshly distorted images
        elif versions is not None:
            version = sample_versions(batch.size, len(versions), rng)  # (batch,) 0 = the film, 1.. = a copy
            x = versions[version, batch]  # (batch, D)
        else:
            x = train_bottlenecks[batch]  # (batch, D) gathered rows
        d_weights, d_biases = unchecked_gradients(x, train_targets[batch], layer.weights, layer.biases)
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
    return layer, history


def train_layer(bottlenecks: np.ndarray, labels: np.ndarray, class_count: int, rng: np.random.Generator,
                how_many_training_steps: int = 4000, learning_rate: float = 0.01, train_batch_size: int = 100,
                class_balancing: bool = True, train_copies: np.ndarray | None = None) -> FinalLayer:
    """train_final_layer without its log lines and validation: one fold of crossval, one setting of sweep.

    bottlenecks (n, D), labels (n,), train_copies (copies, n, D) or None. Each step: a batch (class-balanced or
    uniform over images, then a version of each, see sampling.py), then one gradient descent step on the batch's
    mean cross-entropy.
    """
    no_validation = np.zeros((0, bottlenecks.shape[1]), np.float32), np.zeros(0, np.int64)
    layer, _ = train_final_layer(bottlenecks, labels, *no_validation, class_count, rng,
                                 how_many_training_steps=how_many_training_steps, learning_rate=learning_rate,
                                 train_batch_size=train_batch_size, eval_step_interval=how_many_training_steps,
                                 log=lambda line: None, class_balancing=class_balancing, train_copies=train_copies)
    return layer
