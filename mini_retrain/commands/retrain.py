"""retrain.py, step by step: image folders -> bottlenecks -> a trained final layer -> test metrics -> one ONNX file.

    1. find_images       one subfolder per class                                    (image_lists.py)
    2. split             stable hash of each relative path -> training/validation/testing   (split.py)
    3. bottlenecks       pool_3 (or --bottleneck_layers) of every image, cached       (bottlenecks.py)
    4. train             softmax layer, cross-entropy, gradient descent, random batches   (train.py)
                         with a distortion flag: cached distorted copies of the training films  (distorted_copies.py)
    5. test              "Final test accuracy = X% (N=M)", with confidence intervals  (metrics.py)
    6. write             the graph (backbone + final layer + OOD and population distances), labels, weights,
                         metrics  (export.py)

Before step 1, settings.check_settings checks every flag and output path, so nothing fails after the bottlenecks.
Every output goes beside --output_graph, named after it (settings.output_files). The log says the split sizes, and
points to crossval when a test class holds fewer than metrics.FEW_IMAGES images.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain import __version__
from mini_retrain.core.split import SPLITS
from mini_retrain.core.train import FinalLayer, folded, standardisation, train_final_layer
from mini_retrain.evaluation.population import POPULATION_LAYER
from mini_retrain.paths import write_bytes_atomically
from mini_retrain.pipeline.backbone import parse_layers, run_backbone
from mini_retrain.pipeline.dataset import load_dataset, standardises
from mini_retrain.pipeline.distorted_copies import distorted_copies_of
from mini_retrain.pipeline.distortions import distortions_of, distortions_requested
from mini_retrain.settings import RetrainSettings, check_settings, output_files


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def retrain(settings: RetrainSettings, log: Callable[[str], None] = print,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Run the whole of retrain.py; return the test evaluation (also written as JSON beside the graph).

    progress(row), when given, receives each evaluation row instead of the step lines going to `log` (the command
    line passes commands.progress.progress_line on a terminal)."""
    check_settings(settings)  # every flag and output path, before the first image is decoded (or scipy imported)
    outputs = output_files(settings)

    from mini_retrain.pipeline.export import build_retrained_model, write_final_layer, write_labels, write_retrained_graph
    from mini_retrain.evaluation.metrics import FEW_IMAGES, evaluate, format_evaluation
    from mini_retrain.evaluation.ood import fit_ood_model
    from mini_retrain.core.softmax_layer import compute_logits, softmax

    # 1-3. Images, their labels and splits, their bottlenecks; from the same forward pass, pool_3 for the OOD
    # distance and an earlier block for the population distance (when the backbone offers it).
    dataset = load_dataset(settings, log, extra_layers=("pool_3",), optional_layers=(POPULATION_LAYER,))
    backbone, labels = dataset.backbone, dataset.labels
    train_x, train_y, train_files = dataset.split("training")
    validation_x, validation_y, _ = dataset.split("validation")
    test_x, test_y, test_files = dataset.split("testing")
    counts = split_counts(dataset)
    log(format_split(counts))

    # 4. Train; an earlier block's features standardised by the training rows, the scaling folded in after (train.py).
    rng = np.random.default_rng(settings.random_seed)
    distortions = distortions_of(settings)
    distorted, train_copies = None, None  # 4a. distortions: cached copies of the training films, or retrain.py's way
    if distortions_requested(distortions) and settings.distort_every_step:
        log("Distorting every training image at every step (--distort_every_step): the backbone runs on every batch")
        distorted = _distorted_bottlenecks(settings, backbone, train_files, rng)
    elif distortions_requested(distortions):
        train_copies = distorted_copies_of(dataset, np.flatnonzero(dataset.splits == "training"), settings,
                                           distortions, log)
    if distorted is None:
        # Only --distort_every_step runs the network again. Its onnxruntime session holds the memory arena of the
        # batches (about 0.75 GB after batches of 32) for as long as it lives, so it goes now; the export needs only
        # the backbone's file and sidecar (benchmarks/README.md, "Memory of a whole run").
        backbone = backbone._replace(session=None)
        dataset = dataset._replace(backbone=backbone)
    step_log = (lambda line: None) if progress is not None else log
    on_step, intermediate = (_intermediate_writer(settings, backbone, labels, step_log)
                             if settings.intermediate_store_frequency > 0 else (None, []))
    # Drawing 16 images with replacement from 8 is no bigger a batch than the 8 themselves: cap it.
    batch_size = min(settings.train_batch_size, len(train_y))
    scaled = standardises(dataset.layers)
    if scaled:
        mean, scale = standardisation(train_x)
        log(f"Features standardised for training (mean and standard deviation of the {len(train_y)} training "
            "images), then folded into the final layer")
        train_x, validation_x = (train_x - mean) / scale, (validation_x - mean) / scale
        if train_copies is not None:  # the copies scaled like the films they were made from
            train_copies = (train_copies - mean) / scale  # (copies, n_train, D)
        if distorted is not None:  # freshly distorted bottlenecks, scaled like the cached ones
            distorted = lambda indices, raw=distorted: (raw(indices) - mean) / scale  # noqa: E731
        if on_step is not None:  # intermediate graphs compute x W + b on the raw features too
            on_step = lambda step, layer, write=on_step: write(step, folded(layer, mean, scale))  # noqa: E731
    started = time.perf_counter()
    layer, history = train_final_layer(
        train_x, train_y, validation_x, validation_y, len(labels), rng,
        how_many_training_steps=settings.how_many_training_steps, learning_rate=settings.learning_rate,
        train_batch_size=batch_size, validation_batch_size=settings.validation_batch_size,
        eval_step_interval=settings.eval_step_interval, log=step_log, distorted_bottlenecks=distorted,
        on_step=on_step, class_balancing=settings.class_balancing, on_evaluation=progress, train_copies=train_copies,
    )
    capped = (f"batch {batch_size}: --train_batch_size {settings.train_batch_size} capped at the training set"
              if batch_size < settings.train_batch_size else f"batch {batch_size}")
    log(f"Trained {settings.how_many_training_steps} steps in {time.perf_counter() - started:.2f} s "
        f"({len(train_y)} training images, {capped})")
    if intermediate:
        log(f"Wrote {len(intermediate)} intermediate graphs (the final layer only, without the backbone) to "
            f"{outputs['intermediate_graphs']}")
    if scaled:
        layer = folded(layer, mean, scale)  # now a function of the raw features, as the graph computes it

    # 5. Test, once, on images the training never saw.
    if len(test_y):
        chosen = np.arange(len(test_y)) if settings.test_batch_size < 0 else \
            rng.choice(len(test_y), size=min(settings.test_batch_size, len(test_y)), replace=False)
        probabilities = softmax(compute_logits(test_x[chosen], layer.weights, layer.biases))  # (n, classes)
        evaluation = evaluate(probabilities, test_y[chosen], labels, settings.positive_label)
        for line in format_evaluation(evaluation):
            log(line)
        predictions = probabilities.argmax(axis=1)
        misclassified = [(test_files[i], labels[p], labels[test_y[i]], float(probabilities[j, p]))
                         for j, (i, p) in enumerate(zip(chosen, predictions)) if p != test_y[i]]
        if settings.print_misclassified_test_images:
            log("=== MISCLASSIFIED TEST IMAGES ===")
            for file, predicted, _true, _score in misclassified:
                log(f"{file:>70}  {predicted}")
        evaluation["misclassified"] = [{"file": f, "predicted": p, "true": t, "score": score}
                                       for f, p, t, score in misclassified]
        small = small_test_classes(counts, FEW_IMAGES)
        if small:
            log(f"NOTE: the test set holds only {small} image(s), fewer than {FEW_IMAGES} per class, so the "
                f"intervals above are wide and rest on a few images; for an honest interval on every image, run "
                f"mini_retrain crossval --image_dir {shlex.quote(str(settings.image_dir))}")
    else:
        log("WARNING: no test images (raise --testing_percentage); no final test accuracy")
        evaluation, misclassified = {"n": 0}, []

    # 6. Write everything.
    ood = fit_ood_model(dataset.split("training", ("pool_3",))[0], train_y, len(labels))  # whatever layer is trained
    population = _fit_population(dataset, log)
    internal_test = None if not evaluation["n"] else {
        "n": evaluation["n"], "correct": evaluation["accuracy"]["successes"],
        "accuracy": evaluation["accuracy"]["estimate"], "ci": evaluation["accuracy"]["ci"]}
    model = build_retrained_model(backbone, layer.weights, layer.biases, labels, settings.final_tensor_name, ood,
                                  settings.fast_decode, internal_test, dataset.layers, population)
    write_retrained_graph(outputs["graph"], model)
    write_labels(outputs["labels"], labels)
    write_final_layer(outputs["weights"], layer.weights, layer.biases, labels)
    evaluation["history"] = history
    evaluation["bottleneck_layers"] = list(dataset.layers)
    evaluation["feature_scaling"] = "standardised, folded into the final layer" if scaled else "none"
    evaluation["ood_threshold"] = float(ood.threshold)
    evaluation["run"] = run_record(settings, "retrain", counts, ood_threshold=float(ood.threshold))
    # Which image went where, for an audit (one patient in two splits?): paths relative to image_dir.
    evaluation["splits"] = {split: sorted(f for f, s in zip(dataset.files, dataset.splits) if s == split)
                            for split in ("training", "validation", "testing")}
    if population is not None:
        evaluation["population_layer"] = population.layer
        evaluation["population_threshold"] = float(population.threshold)
    _write_text(outputs["metrics"], json.dumps(evaluation, indent=2) + "\n")
    if settings.summaries_dir is not None:
        _write_summaries(settings.summaries_dir, history)
    heat_maps = {}
    if settings.explain_misclassified is not None and misclassified:
        from mini_retrain.evaluation.cam import explain_images

        explained = explain_images(outputs["graph"], [settings.image_dir / f for f, *_ in misclassified],
                                   settings.explain_misclassified, log=log)
        heat_maps = {file: Path(result["heat_map"]) for (file, *_), result in zip(misclassified, explained)}
    if settings.report is not None:
        from mini_retrain.evaluation.report import write_report

        log(f"Wrote report {write_report(settings.report, history, evaluation, labels, heat_maps=heat_maps, log=log)}")
    log(f"Wrote {outputs['graph']}, {outputs['labels']}, {outputs['weights']} and {outputs['metrics']}")
    return evaluation


def split_counts(dataset) -> dict[str, dict[str, int]]:
    """{label: {"training": n, "validation": n, "testing": n}} of the usable images."""
    return {label: {split: int(np.sum((dataset.class_indices == c) & (dataset.splits == split))) for split in SPLITS}
            for c, label in enumerate(dataset.labels)}


def format_split(counts: dict[str, dict[str, int]]) -> str:
    """'Split: training 10 (normal 5, pneumonia 5), validation 3 (...), testing 3 (...)'."""
    parts = []
    for split in SPLITS:
        total = sum(row[split] for row in counts.values())
        parts.append(f"{split} {total} (" + ", ".join(f"{label} {row[split]}" for label, row in counts.items()) + ")")
    return "Split: " + ", ".join(parts)


def small_test_classes(counts: dict[str, dict[str, int]], few: int) -> str:
    """'2 normal and 1 pneumonia' when a class has fewer than `few` test images, else ''."""
    if all(row["testing"] >= few for row in counts.values()):
        return ""
    return " and ".join(f"{row['testing']} {label}" for label, row in counts.items())


def run_record(settings: RetrainSettings, command: str, counts: dict[str, dict[str, int]],
               skip: tuple[str, ...] = (), extra_flags: tuple[str, ...] = (), **extra) -> dict:
    """What the report and the metrics JSON say about the run: the command that repeats it, the data (class counts
    per split), every flag, seed, version and date; `extra` adds entries (the OOD threshold, crossval's folds)."""
    flags = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name in skip:
            continue
        if field.name == "class_balancing":
            value = "on" if value else "off"
        flags[field.name] = None if value is None else value if isinstance(value, bool | int | float) else str(value)
    return {"command": " ".join([command_line(settings, command, skip), *extra_flags]),
            "image_dir": str(Path(settings.image_dir).resolve()), "classes": counts,
            "flags": flags, "random_seed": settings.random_seed, "version": __version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}


def command_line(settings: RetrainSettings, command: str, skip: tuple[str, ...] = ()) -> str:
    """The command that repeats this run: `mini_retrain retrain --image_dir lungs` + every flag not at its default."""
    words = ["mini_retrain", command, "--image_dir", shlex.quote(str(settings.image_dir))]
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name == "image_dir" or field.name in skip or value == field.default:
            continue
        if field.name == "class_balancing":
            words += ["--class_balancing", "on" if value else "off"]
        elif isinstance(value, bool):
            words.append(f"--{field.name}")
        else:
            words += [f"--{field.name}", shlex.quote(f"{value:g}" if isinstance(value, float) else str(value))]
    return " ".join(words)


def _fit_population(dataset, log: Callable[[str], None]):
    """The population distance on the training images (population.py), or None with a line saying why not."""
    from mini_retrain.evaluation.population import MIN_IMAGES, fit_population_model

    if POPULATION_LAYER not in (dataset.pooled or {}):
        log(f"WARNING: the backbone {dataset.backbone.path} has no layer {POPULATION_LAYER}, so the graph gets no "
            "warning for X-rays of another population; rebuild it with `mini_retrain backbone`")
        return None
    pooled = dataset.split("training", (POPULATION_LAYER,))[0]  # (n_train, 768) for mixed_6
    if len(pooled) < MIN_IMAGES:
        log(f"WARNING: {len(pooled)} training images are too few for the population distance "
            f"(at least {MIN_IMAGES}); the graph gets no warning for X-rays of another population")
        return None
    population = fit_population_model(pooled, POPULATION_LAYER)
    log(f"Population distance on {POPULATION_LAYER}: threshold {population.threshold:.1f} (99% of held-out "
        "training images below it)")
    return population


def _distorted_bottlenecks(settings: RetrainSettings, backbone, train_files: list[str], rng: np.random.Generator):
    """retrain.py's slow path (--distort_every_step): each training batch is distorted afresh and run through the
    backbone at every step. Images are decoded once and kept in memory, shrunk to the largest size a distortion can
    ask for."""
    from mini_retrain.pipeline.distortions import distort, distortions_of, read_for_distortion

    layers = parse_layers(settings.bottleneck_layers)
    distortions = distortions_of(settings)
    size = backbone.sidecar["input_size"][0]
    decoded: dict[int, np.ndarray] = {}

    def bottlenecks_for(indices: np.ndarray) -> np.ndarray:
        batch = []
        for i in indices.tolist():
            if i not in decoded:
                decoded[i] = read_for_distortion(settings.image_dir / train_files[i], distortions, size,
                                                 settings.fast_decode)
            batch.append(distort(decoded[i].astype(np.float32), rng, distortions, size,
                                 backbone.sidecar["input_mean"], backbone.sidecar["input_std"]))
        return run_backbone(backbone, np.stack(batch), layers=layers)  # (batch, D)

    return bottlenecks_for


def _intermediate_writer(settings: RetrainSettings, backbone, labels: list[str], log: Callable[[str], None]):
    """on_step for --intermediate_store_frequency N: every N steps, the final layer as a small ONNX graph (no backbone
    copy: see export.build_final_layer_model); returns (on_step, the list of paths written so far)."""
    from mini_retrain.pipeline.export import build_final_layer_model, write_retrained_graph

    folder = output_files(settings)["intermediate_graphs"]
    written: list[Path] = []

    def on_step(step: int, layer: FinalLayer) -> None:
        if step > 0 and step % settings.intermediate_store_frequency == 0:
            path = folder / f"intermediate_{step}.onnx"
            model = build_final_layer_model(backbone, layer.weights, layer.biases, labels, settings.final_tensor_name,
                                            settings.fast_decode, step,
                                            layers=parse_layers(settings.bottleneck_layers))
            write_retrained_graph(path, model)
            written.append(path)
            log(f"Save intermediate result to : {path}")

    return on_step, written


def _write_summaries(folder: Path, history: list[dict]) -> None:
    """Per-step metrics as CSV (for a spreadsheet) and JSON lines (for a script)."""
    columns = ["step", "train_accuracy", "cross_entropy", "validation_accuracy", "validation_n"]
    csv = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in history]
    _write_text(folder / "metrics.csv", "\n".join(csv) + "\n")
    _write_text(folder / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
