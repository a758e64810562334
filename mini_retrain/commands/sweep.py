"""A grid search over the final layer's settings: chosen on the validation split only, then tested once.

    for layers in --bottleneck_layers, distortion in --distortions, learning_rate in --learning_rates,
            steps in --how_many_training_steps,
            balancing in --class_balancing:
        train the final layer on the training split        (the same seed for every setting: only the setting differs)
                                                           and the training films' cached distorted copies, if any
        accuracy and cross-entropy on the WHOLE validation split
    winner = highest validation accuracy (ties: lowest validation cross-entropy, then the first in the grid)
    test the winner, once

Why the test split must take no part in the choice: keep the best of 12 settings on the test images and you keep,
in part, the setting that was lucky on those particular images; its test accuracy is then biased upwards and no longer
an honest estimate for new patients. The validation split is there to absorb that optimism, so the code below does
not even read the test bottlenecks until the winner is fixed.

--bottleneck_layers is a list of alternatives separated by ';', each what retrain's --bottleneck_layers takes:
"pool_3;mixed_8;pool_3,mixed_8" tries pool_3 alone, mixed_8 alone, and the two side by side. Every layer of every
alternative comes from one pass through the backbone (and the cache), so trying layers costs no more forward passes.

class balancing, i.e. how each training batch is drawn:
    on   retrain.py's sampler (sampling.sample_batch): a class uniformly, then one of its images. Every class weighs
         the same in the loss however rare it is (1000 normal vs 10 tuberculosis still gives ~50% / ~50%).
    off  every training image equally likely (sampling.uniform_batch): batches mirror the class frequencies, so the layer also
         learns how common each class is: often higher accuracy on equally imbalanced data, fewer rare-class finds.

distortions, named settings of the distortion flags (distortions.parse_distortions), each given as [NAME:]SETTINGS:
    --distortions none crop:random_crop=10,random_scale=10 rotate:random_rotation=5,flip_left_right
Each setting other than `none` trains on the films and --distorted_copies cached copies of each training film
(distorted_copies.py): made once, so a second sweep, or retrain with the winner's flags, finds them in the cache.
Validation and test films are never distorted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.paths import write_bytes_atomically
from mini_retrain.evaluation.metrics import evaluate, format_evaluation, wilson_interval
from mini_retrain.evaluation.population import POPULATION_LAYER
from mini_retrain.pipeline.backbone import parse_layers, split_layers
from mini_retrain.pipeline.dataset import Dataset, load_dataset, standardises
from mini_retrain.pipeline.distorted_copies import distorted_copies_of
from mini_retrain.pipeline.distortions import NO_DISTORTIONS, Distortions, describe, distortions_requested
from mini_retrain.settings import RetrainSettings, bottleneck_folder, check_writable
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


def grid_search(dataset: Dataset, learning_rates: list[float], how_many_training_steps: list[int],
                class_balancing: list[bool], *, random_seed: int, train_batch_size: int,
                positive_label: str | None = None, log: Callable[[str], None] = print,
                layer_choices: list[tuple[str, ...]] | None = None,
                distortions: list[tuple[str, dict[str, np.ndarray] | None]] | None = None) -> dict:
    """Train every setting of the grid on the training split, choose on validation, test the winner once.

    layer_choices: alternatives for the bottleneck layers, each loaded in `dataset` (default: its own layers).
    distortions: (name, copies) pairs, copies {layer: (N, n_training, size)} the distorted copies of the training
    rows for every layer of the choices, or None for the films alone; default [("none", None)].
    Returns a JSON-serialisable dict: settings (one row per setting, grid order: bottleneck_layers, distortions,
    learning_rate, how_many_training_steps, class_balancing, validation_accuracy, validation_cross_entropy),
    chosen_index, chosen, and test
    (metrics.evaluate of the winner on the test split; None when there are no test images).
    """
    layer_choices = [tuple(choice) for choice in layer_choices or [dataset.layers]]
    validation_y = dataset.split("validation")[1]
    if not len(validation_y):
        raise ValueError(f"{dataset.image_dir}: no validation images to choose on; raise validation_percentage")

    rows, layers = [], []
    for choice in layer_choices:
        train_x, train_y, _ = dataset.split("training", choice)
        validation_x = dataset.split("validation", choice)[0]
        batch_size = min(train_batch_size, int(train_y.size))  # capped at the training set, as in retrain
        for (name, copies), learning_rate, steps, balanced in itertools.product(
                distortions or [("none", None)], learning_rates, how_many_training_steps, class_balancing):
            # A fresh generator with the same seed for every setting: the same initial weights and, for the same
            # sampler, the same batches, so the settings differ only in what the grid changes.
            rng = np.random.default_rng(random_seed)
            train_copies = None if copies is None else np.concatenate([copies[layer] for layer in choice], axis=2)
            layer = train_layer(train_x, train_y, len(dataset.labels), rng, how_many_training_steps=steps,
                                learning_rate=learning_rate, train_batch_size=batch_size, class_balancing=balanced,
                                standardise=standardises(choice), train_copies=train_copies)
            accuracy, validation_cross_entropy = _validation_row(layer, validation_x, validation_y)
            rows.append({"bottleneck_layers": ",".join(choice), "distortions": name,
                         "distorted_copies": 0 if train_copies is None else len(train_copies),
                         "learning_rate": learning_rate, "how_many_training_steps": steps,
                         "class_balancing": "on" if balanced else "off",
                         "validation_accuracy": accuracy, "validation_cross_entropy": validation_cross_entropy})
            layers.append(layer)
    best = choose_setting(rows)
    for line in _table(rows, best):
        log(line)
    chosen = rows[best]
    log("Chosen on validation only (highest accuracy; ties: lowest cross-entropy): "
        + (f"distortions {chosen['distortions']}, " if len({row['distortions'] for row in rows}) > 1 else "")
        + f"learning_rate {chosen['learning_rate']:g}, {chosen['how_many_training_steps']} steps, "
        f"class balancing {chosen['class_balancing']}"
        + (f", bottleneck layers {chosen['bottleneck_layers']}" if len(layer_choices) > 1 else ""))

    # Only now, with the winner fixed, are the test images read: once, for one setting.
    test_x, test_y, _ = dataset.split("testing", tuple(chosen["bottleneck_layers"].split(",")))
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
    """One line per setting; '*' marks the winner. The layers get a column when there is more than one choice."""
    accuracies = [f"{100 * r['estimate']:.1f}% ({r['successes']}/{r['n']}, "
                  f"95% CI {100 * r['ci'][0]:.1f}-{100 * r['ci'][1]:.1f}%)"
                  for r in (row["validation_accuracy"] for row in rows)]
    width = max(len(text) for text in accuracies + ["validation accuracy"])
    # The bottleneck_layers and distortions columns only when there are alternatives to tell apart.
    def column_of(key: str):
        values = [row[key] for row in rows]
        if len(set(values)) < 2 and (key != "distortions" or values[0] == "none"):
            return lambda text: ""
        width = max(len(text) for text in values + [key])
        return lambda text: f"{text:<{width}}  "

    layer_column, distortion_column = column_of("bottleneck_layers"), column_of("distortions")
    lines = [f"Validation results of {len(rows)} settings (N={rows[0]['validation_accuracy']['n']} validation images; "
             "test images not used):",
             f"  {layer_column('bottleneck_layers')}{distortion_column('distortions')}{'learning_rate':>13}  "
             f"{'steps':>6}  {'class_balancing':>15}  {'validation accuracy':<{width}}  cross-entropy"]
    for i, (row, accuracy) in enumerate(zip(rows, accuracies)):
        lines.append(f"{'*' if i == best else ' '} {layer_column(row['bottleneck_layers'])}"
                     f"{distortion_column(row['distortions'])}{row['learning_rate']:>13g}  "
                     f"{row['how_many_training_steps']:>6d}  {row['class_balancing']:>15}  {accuracy:<{width}}  "
                     f"{row['validation_cross_entropy']:.4f}")
    return lines


def _items(text: str, name: str, example: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",")]
    if any(item == "" for item in items):
        raise ValueError(f"{name} {text!r} has an empty item; give values separated by commas, e.g. {example}")
    return items


def parse_grid(learning_rates: str, how_many_training_steps: str, class_balancing: str) -> tuple[list[float], list[int],
                                                                                         list[bool]]:
    """The three comma-separated grid flags as lists: "0.001,0.01" -> [0.001, 0.01]; "off,on" -> [False, True]."""
    rates = []
    for item in _items(learning_rates, "learning_rates", "0.001,0.01,0.1"):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"learning_rates: {item!r} is not a positive number; "
                             "e.g. learning_rates=0.001,0.01,0.1")
        rates.append(rate)
    steps = []
    for item in _items(how_many_training_steps, "how_many_training_steps", "500,4000"):
        if not (item.isdigit() and int(item) >= 1):
            raise ValueError(f"how_many_training_steps: {item!r} is not a whole number >= 1; "
                             "e.g. how_many_training_steps=500,4000")
        steps.append(int(item))
    balancing = []
    for item in _items(class_balancing, "class_balancing", "off,on"):
        if item not in ("on", "off"):
            raise ValueError(f"class_balancing: {item!r} is neither 'on' nor 'off'; e.g. class_balancing=off,on")
        balancing.append(item == "on")
    return rates, steps, balancing


def parse_layer_choices(text: str) -> list[tuple[str, ...]]:
    """sweep's --bottleneck_layers: "pool_3;mixed_8;pool_3,mixed_8" -> [("pool_3",), ("mixed_8",), ("pool_3", "mixed_8")]."""
    choices = [parse_layers(item.strip()) for item in str(text).split(";")]
    if len(set(choices)) != len(choices):
        raise ValueError(f"bottleneck_layers {text!r} gives the same alternative twice")
    return choices


def sweep(settings: RetrainSettings, learning_rates: list[float], how_many_training_steps: list[int],
          class_balancing: list[bool], output_json: Path = Path("sweep.json"),
          log: Callable[[str], None] = print, distortions: list[tuple[str, Distortions]] | None = None) -> dict:
    """`mini_retrain sweep`: load the bottlenecks (cached) and the hash split, make (or find) the distorted copies of
    the training films for each named distortion setting, run the grid search, write the JSON.

    Uses image_dir, bottleneck_dir, backbone, device, precision, on_bad_image, validation_percentage, testing_percentage,
    train_batch_size, random_seed, positive_label, distorted_copies and fast_decode of `settings`, and its
    bottleneck_layers as alternatives separated by ';' (parse_layer_choices); its own distortion flags are not used
    (the settings to compare are `distortions`, default [("none", no distortion)]). Every flag and output is checked
    before the first image is decoded.
    """
    choices = parse_layer_choices(settings.bottleneck_layers)
    output_json = Path(output_json)
    check_writable(output_json, "--output_json", is_folder=False)  # now, before the bottlenecks, not after them
    check_writable(bottleneck_folder(settings), "--bottleneck_dir", is_folder=True)
    distortions = distortions or [("none", NO_DISTORTIONS)]
    if len({name for name, _ in distortions}) < len(distortions):
        raise ValueError("--distortions: two settings have the same name; give each its own NAME: prefix")
    every_layer = tuple(dict.fromkeys(layer for choice in choices for layer in choice))
    dataset = load_dataset(dataclasses.replace(settings, bottleneck_layers=",".join(choices[0])), log,
                           extra_layers=every_layer,  # and, for a later retrain, what it needs besides
                           optional_layers=("pool_3", POPULATION_LAYER))
    training_rows = np.flatnonzero(dataset.splits == "training")
    with_copies = [(name, _copies_by_layer(dataset, training_rows, settings, d, every_layer, log)
                    if distortions_requested(d) else None) for name, d in distortions]
    result = grid_search(dataset, learning_rates, how_many_training_steps, class_balancing,
                         random_seed=settings.random_seed, train_batch_size=settings.train_batch_size,
                         positive_label=settings.positive_label, log=log, layer_choices=choices,
                         distortions=with_copies)
    chosen = result["chosen"]
    chosen["distortion_flags"] = describe(dict(distortions)[chosen["distortions"]])
    log("To retrain with these settings: " + retrain_command(settings, chosen, dict(distortions)[chosen["distortions"]]))
    write_bytes_atomically(output_json, (json.dumps(result, indent=2) + "\n").encode())
    log(f"Wrote {output_json}")
    return result


def _copies_by_layer(dataset: Dataset, rows: np.ndarray, settings: RetrainSettings, distortions: Distortions,
                     layers: tuple[str, ...], log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The distorted copies of the training rows for every layer of the choices, from one backbone pass per copy:
    {layer: (copies, n_training, size)}."""
    copies = distorted_copies_of(dataset, rows, settings, distortions, log, layers=layers)  # (copies, n, D_all)
    return split_layers(copies, dataset.backbone.sidecar, layers)


def retrain_command(settings: RetrainSettings, chosen: dict, distortions: Distortions = NO_DISTORTIONS) -> str:
    """The retrain command with the winner's settings (its distortion flags too), on the folder the sweep ran on."""
    layers = chosen.get("bottleneck_layers", "pool_3")
    flags = "".join(f"--{name} " if value is True else f"--{name} {value:g} "
                    for name, value in distortions._asdict().items() if value)
    if flags:
        flags += f"--distorted_copies {settings.distorted_copies} "
    return (f"mini_retrain retrain --image_dir {shlex.quote(str(settings.image_dir))} "
            + (f"--bottleneck_layers {layers} " if layers != "pool_3" else "") + flags
            + f"--learning_rate {chosen['learning_rate']:g} "
            f"--how_many_training_steps {chosen['how_many_training_steps']} "
            f"--class_balancing {chosen['class_balancing']} --train_batch_size {settings.train_batch_size} "
            f"--validation_percentage {settings.validation_percentage:g} "
            f"--testing_percentage {settings.testing_percentage:g} --random_seed {settings.random_seed}")
