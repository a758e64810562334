"""Tests for mini_retrain.core.train: the fast loop is exactly the textbook loop, it checks its data once, and what it
logs is measured on the weights it trained."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from mini_retrain.core.sampling import sample_batch, uniform_batch
from mini_retrain.core.softmax_layer import gradient_descent_step, gradients, init_final_layer, one_hot
from mini_retrain.core.train import train_final_layer

# The knobs train_final_layer requires (RetrainSettings holds the product's defaults); each test overrides some.
KNOBS = dict(how_many_training_steps=30, learning_rate=0.1, train_batch_size=32, validation_batch_size=100,
             eval_step_interval=10, class_balancing=True)
NO_VALIDATION = (np.empty((0, 12)), np.empty(0, np.int64))


def quiet(line: str) -> None:
    pass


def textbook_loop(x, y, classes, rng, steps, learning_rate, batch_size, class_balancing):
    """The loop as the docs write it: draw a batch, its gradients, one step. No buffers, no grouping."""
    weights, biases = init_final_layer(x.shape[1], classes, rng)
    draw = sample_batch if class_balancing else uniform_batch
    for _ in range(steps):
        batch = draw(y, batch_size, rng)
        d_weights, d_biases = gradients(x[batch], one_hot(y[batch], classes), weights, biases)
        gradient_descent_step(weights, biases, d_weights, d_biases, learning_rate)
    return weights, biases


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(2, 40), classes=st.integers(2, 5),
       batch_size=st.sampled_from([1, 7, 32, -1]), class_balancing=st.booleans())
def test_train_final_layer_is_the_textbook_loop(seed, rows, classes, batch_size, class_balancing):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    layer, history = train_final_layer(x, y, *NO_VALIDATION, classes, np.random.default_rng(seed),
                                       **{**KNOBS, "train_batch_size": batch_size, "eval_step_interval": 1000,
                                          "class_balancing": class_balancing}, log=quiet)
    weights, biases = textbook_loop(x, y, classes, np.random.default_rng(seed), 30, 0.1, batch_size,
                                    class_balancing)
    np.testing.assert_array_equal(layer.weights, weights)
    np.testing.assert_array_equal(layer.biases, biases)
    assert [row["step"] for row in history] == [0, 29]


def reference_loop(x, y, classes, rng, steps, learning_rate, batch_size):
    """The same loop in float64 with SciPy's softmax: an implementation that shares no arithmetic with ours."""
    weights, biases = (array.astype(np.float64) for array in init_final_layer(x.shape[1], classes, rng))
    x = x.astype(np.float64)
    for _ in range(steps):
        batch = sample_batch(y, batch_size, rng)
        d_logits = (special.softmax(x[batch] @ weights + biases, axis=1) - np.eye(classes)[y[batch]]) / len(batch)
        weights -= learning_rate * x[batch].T @ d_logits
        biases -= learning_rate * d_logits.sum(axis=0)
    return weights, biases


def test_huge_bottlenecks_train_as_the_reference_does():
    """Bottlenecks of size 1e4 make logits of 1e7 after one step: exp(1e7) overflows unless softmax subtracts the row
    maximum first, and the weights become NaN. With the shift the loop agrees with SciPy's (stable) softmax."""
    rng = np.random.default_rng(7)
    x = (1e4 * rng.standard_normal((60, 12))).astype(np.float32)
    y = rng.integers(0, 3, 60)
    with np.errstate(over="raise", invalid="raise"):  # underflow of exp(-1e7) to 0 is expected and fine
        layer, history = train_final_layer(x, y, *NO_VALIDATION, 3, np.random.default_rng(8),
                                           **{**KNOBS, "how_many_training_steps": 20}, log=quiet)
    assert np.all(np.isfinite(layer.weights)) and np.all(np.isfinite(layer.biases))
    assert all(np.isfinite(row["cross_entropy"]) for row in history)
    weights, biases = reference_loop(x, y, 3, np.random.default_rng(8), 20, KNOBS["learning_rate"], 32)
    assert np.abs(x @ weights).max() > 1e5  # the regime the test is about: exp overflows float32 beyond 88
    np.testing.assert_allclose(layer.weights, weights, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(layer.biases, biases, rtol=1e-4, atol=1e-6)


def test_logged_values_are_measured_on_the_weights_just_trained():
    """Every logged train accuracy and cross-entropy is that of the batch just trained on, under the weights after
    that step (recorded here through on_step); validation accuracy is that of the same weights on the validation set."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 30)
    x = (rng.standard_normal((90, 12)) + 2.0 * np.eye(12)[y]).astype(np.float32)  # separable, not trivially
    validation_x, validation_y = x[::3] + rng.standard_normal((30, 12)).astype(np.float32), y[::3]
    batches, layers = [], []

    def recorded_batch(indices):  # the training batch, exactly as the cached path gathers it
        batches.append(indices.copy())
        return x[indices]

    layer, history = train_final_layer(
        x, y, validation_x, validation_y, 3, np.random.default_rng(4),
        **{**KNOBS, "how_many_training_steps": 10, "eval_step_interval": 3, "validation_batch_size": -1,
           "learning_rate": 0.5},
        log=quiet, distorted_bottlenecks=recorded_batch,
        on_step=lambda step, trained: layers.append((trained.weights.copy(), trained.biases.copy())))
    assert [row["step"] for row in history] == [0, 3, 6, 9]
    np.testing.assert_array_equal(layers[-1][0], layer.weights)
    for row in history:
        weights, biases = (array.astype(np.float64) for array in layers[row["step"]])
        batch = batches[row["step"]]
        logits = x[batch].astype(np.float64) @ weights + biases
        expected_loss = np.mean(special.logsumexp(logits, axis=1) - logits[np.arange(len(batch)), y[batch]])
        assert row["cross_entropy"] == pytest.approx(expected_loss, rel=1e-5)
        assert row["train_accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == y[batch]))
        validation_logits = validation_x.astype(np.float64) @ weights + biases
        assert row["validation_accuracy"] == pytest.approx(np.mean(validation_logits.argmax(axis=1) == validation_y))
        assert row["validation_n"] == 30
    assert history[-1]["cross_entropy"] < 0.6 * history[0]["cross_entropy"]  # it learned: the weights moved


def test_validation_batches_are_drawn_class_first():
    """95 validation images of class 0 and 5 of class 1, all looking like class 0, so the layer calls every one
    class 0 and the validation accuracy is the share of class 0 in the batch: about 1/2 when the class is drawn
    first (retrain.py, docs/algorithm.md section 5), 0.95 if the images were drawn uniformly."""
    rng = np.random.default_rng(11)
    y = np.repeat([0, 1], 50)
    x = (np.where(y[:, None] == 0, 3.0, -3.0) * np.eye(12)[0] + 0.1 * rng.standard_normal((100, 12))).astype(np.float32)
    validation_y = rng.permutation(np.repeat([0, 1], [95, 5]))
    validation_x = np.tile(3.0 * np.eye(12, dtype=np.float32)[0], (100, 1))  # every one looks like class 0
    _, history = train_final_layer(x, y, validation_x, validation_y, 2, np.random.default_rng(12),
                                   **{**KNOBS, "how_many_training_steps": 50, "validation_batch_size": 1000},
                                   log=quiet)
    shares = np.array([row["validation_accuracy"] for row in history])  # share of class-0 draws, per logged step
    assert len(shares) == 6 and all(row["validation_n"] == 1000 for row in history)
    # Binomial(1000, 1/2): standard deviation 0.016 per step; uniform draws would give 0.95 +- 0.007.
    assert np.all(np.abs(shares - 0.5) < 0.06), shares


def test_log_lines_are_retrains():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 8)).astype(np.float32), np.repeat([0, 1], 20)
    lines: list[str] = []
    train_final_layer(x, y, x[:10], y[:10], 2, rng, **{**KNOBS, "how_many_training_steps": 11,
                                                       "validation_batch_size": -1}, log=lines.append)
    assert lines[0].startswith("Step 0: Train accuracy = ") and lines[0].endswith("%")
    assert lines[1].startswith("Step 0: Cross entropy = ")
    assert lines[2].startswith("Step 0: Validation accuracy = ") and lines[2].endswith("(N=10)")
    assert [line.split(":")[0] for line in lines] == ["Step 0"] * 3 + ["Step 10"] * 3


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), r"^train_labels must be class indices in \[0, 1\]"),
    (np.array([0, -1, 1]), r"class indices in \[0, 1\]"),
    (np.array([0.0, 1.0, 1.0]), r"^train_labels must hold integer class indices"),
    (np.array([0, 1]), r"^train_labels must be a 1-D array of shape \(3,\), one class index per row"),
])
def test_bad_training_labels_are_refused_before_the_first_step(labels, message):
    with pytest.raises(ValueError, match=message):
        train_final_layer(np.zeros((3, 4), np.float32), labels, np.empty((0, 4)), np.empty(0, np.int64), 2,
                          np.random.default_rng(0), **KNOBS, log=quiet)


@pytest.mark.parametrize("knob, value, message", [
    ("learning_rate", -0.1, "^learning_rate must be a finite number > 0, got -0.1"),
    ("learning_rate", float("nan"), "^learning_rate must be a finite number > 0"),
    ("how_many_training_steps", 0, "^how_many_training_steps must be a whole number >= 1, got 0"),
    ("eval_step_interval", 0, "^eval_step_interval must be a whole number >= 1"),
    ("train_batch_size", 0, "^train_batch_size must be a positive whole number, or -1"),
    ("validation_batch_size", 0, "^validation_batch_size must be a positive whole number, or -1"),
])
def test_bad_settings_are_refused_by_their_parameter_name(knob, value, message):
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=message):
        train_final_layer(x, y, x, y, 2, np.random.default_rng(0), **{**KNOBS, knob: value}, log=quiet)


def test_the_settings_have_no_defaults_here():
    """RetrainSettings is the one source of the defaults: train_final_layer requires every knob."""
    with pytest.raises(TypeError, match="learning_rate"):
        train_final_layer(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]), *NO_VALIDATION, 2,
                          np.random.default_rng(0), **{k: v for k, v in KNOBS.items() if k != "learning_rate"})
