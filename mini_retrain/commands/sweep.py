"""A grid search over the final layer's settings: chosen on the validation split only, then tested once.

    for learning_rate in --learning_rates, steps in --training_steps, balancing in --class_balancing:
        train the final layer on the training split        (the same seed for every setting: only the setting differs)
        accuracy and cross-entropy on the WHOLE validation split
    winner = highest validation accuracy (ties: lowest validation cross-entropy, then the first in the grid)
    test the winner, once

Why the test split must take no part in the choice: keep the best of 12 settings on the test images and you keep,
in part, the setting that was lucky on those particular images; its test accuracy is then biased upwards and no longer
an honest estimate for new patients. The validation split is there to absorb that optimism, so the code below does
not even read the test bottlenecks until the winner is fixed.

class balancing, i.e. how each training batch is drawn:
    on   retrain.py's sampler (sampling.sample_batch): a class uniformly, then one of its images. Every class weighs
         the same in the loss however rare it is (1000 normal vs 10 tuberculosis still gives ~50% / ~50%).
    off  every training image equally likely (sampling.uniform_batch): batches mirror the class frequencies, so the layer also
         learns how common each class is: often higher accuracy on equally imbalanced data, fewer rare-class finds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.paths import write_bytes_atomically
from mini_retrain.commands.crossval import check_output_json
from mini_retrain.evaluation.metrics import evaluate, format_evaluation, wilson_interval
from mini_retrain.pipeline.dataset import Dataset, load_dataset
from mini_retrain.settings import RetrainSettings
from mini_retrain.core.softmax_layer import compute_logits, cross_entropy, softmax
from mini_retrain.core.train import FinalLayer, train_layer

def choose_setting(rows: list[dict]) -> int:
    """Index of the winner: highest validation accuracy; ties: lowest validation cross-entropy; then the first row.

    rows: dicts with "validation_accuracy" {"successes", "n", ...} and "validation_cross_entropy" (all on the same
    validation images, so comparing successes is comparing accuracies). Nothing else is looked at.
    """
    if not rows:
        raise ValueError("no settings to choose from; give at least one value to each grid flag")
    # max() returns the first of equal keys, so a full tie goes to the earlier setting.
    return max(range(len(rows)), key=lambda i: (rows[i]["validation_accuracy"]["successes"],
                                                -rows[i]["validation_cross_entropy"]))


def _validation_row(layer: FinalLayer, bottlenecks: np.ndarray, labels: np.ndarray) -> tuple[dict, float]:
    logits = compute_logits(bottlenecks, layer.weights, layer.biases)  # (n_val, D) @ (D, classes) -> (n_val, classes)
    successes, n = int(np.sum(logits.argmax(axis=1) == labels)), int(labels.size)
    low, high = wilson_interval(successes, n)
    return {"estimate": successes / n, "successes": successes, "n": n, "ci": [low, high]}, cross_entropy(logits, labels)


def grid_search(dataset: Dataset, learning_rates: list[float], training_steps: list[int],
                class_balancing: list[bool], random_seed: int = 0, train_batch_size: int = 100,
                positive_label: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train every setting of the grid on the training split, choose on validation, test the winner once.

    Returns a JSON-serialisable dict: settings (one row per setting, grid order: learning_rate, training_steps,
    class_balancing, validation_accuracy, validation_cross_entropy), chosen_index, chosen, and test
    (metrics.evaluate of the winner on the test split; None when there are no test images).
    """
    train_x, train_y, _ = dataset.split("training")
    validation_x, validation_y, _ = dataset.split("validation")
    if not len(validation_y):
        raise ValueError(f"{dataset.image_dir}: no validation images to choose on; raise --validation_percentage")

    rows, layers = [], []
    for learning_rate, steps, balanced in itertools.product(learning_rates, training_steps, class_balancing):
        # A fresh generator with the same seed for every setting: the same initial weights and, for the same
        # sampler, the same batches, so the settings differ only in what the grid changes.
        rng = np.random.default_rng(random_seed)
        layer = train_layer(train_x, train_y, len(dataset.labels), rng, steps, learning_rate, train_batch_size,
                            balanced)
        accuracy, validation_cross_entropy = _validation_row(layer, validation_x, validation_y)
        rows.append({"learning_rate": learning_rate, "training_steps": steps,
                     "class_balancing": "on" if balanced else "off", "validation_accuracy": accuracy,
                     "validation_cross_entropy": validation_cross_entropy})
        layers.append(layer)
    best = choose_setting(rows)
    for line in _table(rows, best):
        log(line)
    chosen = rows[best]
    log(f"Chosen on validation only (highest accuracy; ties: lowest cross-entropy): learning_rate "
        f"{chosen['learning_rate']:g}, {chosen['training_steps']} steps, class balancing {chosen['class_balancing']}")

    # Only now, with the winner fixed, are the test images read: once, for one setting.
    test_x, test_y, _ = dataset.split("testing")
    if len(test_y):
        probabilities = softmax(compute_logits(test_x, layers[best].weights, layers[best].biases))  # (n, classes)
        test = evaluate(probabilities, test_y, dataset.labels, positive_label)
        for line in format_evaluation(test, title="Final test accuracy"):
            log(line)
    else:
        log("WARNING: no test images (raise --testing_percentage); no final test accuracy")
        test = None
    return {"selection": "highest validation accuracy; ties: lowest validation cross-entropy; then grid order",
            "random_seed": random_seed, "train_batch_size": train_batch_size, "n_training": int(train_y.size),
            "settings": rows, "chosen_index": best, "chosen": chosen, "test": test}


def _table(rows: list[dict], best: int) -> list[str]:
    """One line per setting; '*' marks the winner."""
    accuracies = [f"{100 * r['estimate']:.1f}% ({r['successes']}/{r['n']}, "
                  f"95% CI {100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f}%)"
                  for r in (row["validation_accuracy"] for row in rows)]
    width = max(len(text) for text in accuracies + ["validation accuracy"])
    lines = [f"Validation results of {len(rows)} settings (N={rows[0]['validation_accuracy']['n']} validation images; "
             "test images not used):",
             f"  {'learning_rate':>13}  {'steps':>6}  {'class_balancing':>15}  {'validation accuracy':<{width}}  "
             "cross-entropy"]
    for i, (row, accuracy) in enumerate(zip(rows, accuracies)):
        lines.append(f"{'*' if i == best else ' '} {row['learning_rate']:>13g}  {row['training_steps']:>6d}  "
                     f"{row['class_balancing']:>15}  {accuracy:<{width}}  {row['validation_cross_entropy']:.4f}")
    return lines


def _items(text: str, flag: str, example: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",")]
    if any(item == "" for item in items):
        raise ValueError(f"{flag} {text!r} has an empty item; give values separated by commas, e.g. {example}")
    return items


def parse_grid(learning_rates: str, training_steps: str, class_balancing: str) -> tuple[list[float], list[int],
                                                                                         list[bool]]:
    """The three comma-separated grid flags as lists: "0.001,0.01" -> [0.001, 0.01]; "off,on" -> [False, True]."""
    rates = []
    for item in _items(learning_rates, "--learning_rates", "0.001,0.01,0.1"):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"--learning_rates: {item!r} is not a positive number; "
                             "e.g. --learning_rates 0.001,0.01,0.1")
        rates.append(rate)
    steps = []
    for item in _items(training_steps, "--training_steps", "500,4000"):
        if not (item.isdigit() and int(item) >= 1):
            raise ValueError(f"--training_steps: {item!r} is not a whole number >= 1; e.g. --training_steps 500,4000")
        steps.append(int(item))
    balancing = []
    for item in _items(class_balancing, "--class_balancing", "off,on"):
        if item not in ("on", "off"):
            raise ValueError(f"--class_balancing: {item!r} is neither 'on' nor 'off'; e.g. --class_balancing off,on")
        balancing.append(item == "on")
    return rates, steps, balancing


def sweep(settings: RetrainSettings, learning_rates: list[float], training_steps: list[int],
          class_balancing: list[bool], output_json: Path = Path("sweep.json"),
          log: Callable[[str], None] = print) -> dict:
    """`mini_retrain sweep`: load the bottlenecks (cached) and the hash split, run the grid search, write the JSON.

    Uses image_dir, bottleneck_dir, backbone, device, precision, on_bad_image, validation_percentage,
    testing_percentage, train_batch_size, random_seed and positive_label of `settings`.
    """
    output_json = check_output_json(output_json)  # checked now, before the bottlenecks, not after them
    dataset = load_dataset(settings, log)
    result = grid_search(dataset, learning_rates, training_steps, class_balancing, settings.random_seed,
                         settings.train_batch_size, settings.positive_label, log)
    chosen = result["chosen"]
    log(f"To retrain with these settings: mini_retrain retrain --image_dir DIR --learning_rate {chosen['learning_rate']:g} "
        f"--how_many_training_steps {chosen['training_steps']} --class_balancing {chosen['class_balancing']} "
        f"--train_batch_size {settings.train_batch_size} --validation_percentage {settings.validation_percentage:g} "
        f"--testing_percentage {settings.testing_percentage:g} --random_seed {settings.random_seed}")
    write_bytes_atomically(output_json, (json.dumps(result, indent=2) + "\n").encode())
    log(f"Wrote {output_json}")
    return result
