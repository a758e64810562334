"""Tests for mini_retrain.core.train: the fast loop is exactly the textbook loop, and it checks its data once."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_retrain.core.sampling import sample_batch, uniform_batch
from mini_retrain.core.softmax_layer import gradient_descent_step, gradients, init_final_layer
from mini_retrain.core.train import train_final_layer


def textbook_loop(x, y, classes, rng, steps, learning_rate, batch_size, class_balancing):
    """The loop as the docs write it: draw a batch, gradients with all checks, one step. No buffers, no grouping."""
    weights, biases = init_final_layer(x.shape[1], classes, rng)
    draw = sample_batch if class_balancing else uniform_batch
    for _ in range(steps):
        batch = draw(y, batch_size, rng)
        d_weights, d_biases, _ = gradients(x[batch], y[batch], weights, biases)
        gradient_descent_step(weights, biases, d_weights, d_biases, learning_rate)
    return weights, biases


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(2, 40), classes=st.integers(2, 5),
       batch_size=st.sampled_from([1, 7, 32, -1]), class_balancing=st.booleans())
def test_train_final_layer_is_the_textbook_loop(seed, rows, classes, batch_size, class_balancing):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    layer, history = train_final_layer(x, y, np.empty((0, 12)), np.empty(0, np.int64), classes,
                                       np.random.default_rng(seed), how_many_training_steps=30,
                                       learning_rate=0.1, train_batch_size=batch_size, eval_step_interval=1000,
                                       log=lambda line: None, class_balancing=class_balancing)
    weights, biases = textbook_loop(x, y, classes, np.random.default_rng(seed), 30, 0.1, batch_size,
                                    class_balancing)
    np.testing.assert_array_equal(layer.weights, weights)
    np.testing.assert_array_equal(layer.biases, biases)
    assert [row["step"] for row in history] == [0, 29]


def test_log_lines_are_retrains():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 8)).astype(np.float32), np.repeat([0, 1], 20)
    lines: list[str] = []
    train_final_layer(x, y, x[:10], y[:10], 2, rng, how_many_training_steps=11, eval_step_interval=10,
                      validation_batch_size=-1, log=lines.append)
    assert lines[0].startswith("Step 0: Train accuracy = ") and lines[0].endswith("%")
    assert lines[1].startswith("Step 0: Cross entropy = ")
    assert lines[2].startswith("Step 0: Validation accuracy = ") and lines[2].endswith("(N=10)")
    assert [line.split(":")[0] for line in lines] == ["Step 0"] * 3 + ["Step 10"] * 3


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), r"class indices in \[0, 1\]"),
    (np.array([0, -1, 1]), r"class indices in \[0, 1\]"),
    (np.array([0.0, 1.0, 1.0]), r"class indices"),
    (np.array([0, 1]), "must match"),
])
def test_bad_training_labels_are_refused_before_the_first_step(labels, message):
    with pytest.raises(ValueError, match=message):
        train_final_layer(np.zeros((3, 4), np.float32), labels, np.empty((0, 4)), np.empty(0, np.int64), 2,
                          np.random.default_rng(0), how_many_training_steps=5, log=lambda line: None)
