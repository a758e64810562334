"""retrain.py, step by step: image folders -> bottlenecks -> a trained final layer -> test metrics -> one ONNX file.

    1. find_images       one subfolder per class                                    (image_lists.py)
    2. split             stable hash of each relative path -> training/validation/testing   (split.py)
    3. bottlenecks       pool_3 of every image, cached                                (bottlenecks.py)
    4. train             softmax layer, cross-entropy, gradient descent, random batches   (train.py)
    5. test              "Final test accuracy = X% (N=M)", with confidence intervals  (metrics.py)
    6. write             the graph (backbone + final layer + OOD distance), labels, weights, metrics  (export.py)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.core.train import FinalLayer, train_final_layer
from mini_retrain.paths import cache_dir, write_bytes_atomically
from mini_retrain.pipeline.backbone import run_backbone
from mini_retrain.pipeline.dataset import load_dataset
from mini_retrain.settings import RetrainSettings


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def retrain(settings: RetrainSettings, log: Callable[[str], None] = print) -> dict:
    """Run the whole of retrain.py; return the test evaluation (also written as JSON beside the graph)."""
    from mini_retrain.pipeline.export import build_retrained_model, write_final_layer, write_labels, write_retrained_graph
    from mini_retrain.evaluation.metrics import evaluate, format_evaluation
    from mini_retrain.evaluation.ood import fit_ood_model
    from mini_retrain.core.softmax_layer import compute_logits, softmax

    _check_outputs_writable(settings)

    # 1-3. Images, their labels and splits, their bottlenecks.
    dataset = load_dataset(settings, log)
    if not _wants_distortions(settings):
        # Only the distortions run the network again. Its onnxruntime session holds the memory arena of the batches
        # (about 0.9 GB after batches of 32) for as long as it lives, so it goes now; the export needs only the
        # backbone's file and sidecar (benchmarks/README.md, "Memory of a whole run").
        dataset = dataset._replace(backbone=dataset.backbone._replace(session=None))
    backbone, labels = dataset.backbone, dataset.labels
    train_x, train_y, train_files = dataset.split("training")
    validation_x, validation_y, _ = dataset.split("validation")
    test_x, test_y, test_files = dataset.split("testing")

    # 4. Train.
    rng = np.random.default_rng(settings.random_seed)
    distorted = _distorted_bottlenecks(settings, backbone, train_files, rng) if _wants_distortions(settings) else None
    on_step = _intermediate_writer(settings, backbone, labels, log) if settings.intermediate_store_frequency > 0 else None
    started = time.perf_counter()
    layer, history = train_final_layer(
        train_x, train_y, validation_x, validation_y, len(labels), rng,
        how_many_training_steps=settings.how_many_training_steps, learning_rate=settings.learning_rate,
        train_batch_size=settings.train_batch_size, validation_batch_size=settings.validation_batch_size,
        eval_step_interval=settings.eval_step_interval, log=log, distorted_bottlenecks=distorted, on_step=on_step,
        class_balancing=settings.class_balancing,
    )
    log(f"Trained {settings.how_many_training_steps} steps in {time.perf_counter() - started:.2f} s "
        f"({len(train_y)} training images, batch {settings.train_batch_size})")

    # 5. Test, once, on images the training never saw.
    if len(test_y):
        chosen = np.arange(len(test_y)) if settings.test_batch_size < 0 else \
            rng.choice(len(test_y), size=min(settings.test_batch_size, len(test_y)), replace=False)
        probabilities = softmax(compute_logits(test_x[chosen], layer.weights, layer.biases))  # (n, classes)
        evaluation = evaluate(probabilities, test_y[chosen], labels, settings.positive_label)
        for line in format_evaluation(evaluation):
            log(line)
        predictions = probabilities.argmax(axis=1)
        misclassified = [(test_files[i], labels[p], labels[test_y[i]])
                         for i, p in zip(chosen, predictions) if p != test_y[i]]
        if settings.print_misclassified_test_images:
            log("=== MISCLASSIFIED TEST IMAGES ===")
            for file, predicted, _true in misclassified:
                log(f"{file:>70}  {predicted}")
        evaluation["misclassified"] = [{"file": f, "predicted": p, "true": t} for f, p, t in misclassified]
    else:
        log("WARNING: no test images (raise --testing_percentage); no final test accuracy")
        evaluation, misclassified = {"n": 0}, []

    # 6. Write everything.
    ood = fit_ood_model(train_x, train_y, len(labels))
    model = build_retrained_model(backbone, layer.weights, layer.biases, labels, settings.final_tensor_name, ood,
                                  settings.fast_decode)
    write_retrained_graph(settings.output_graph, model)
    write_labels(settings.output_labels, labels)
    weights_path = settings.output_weights or settings.output_graph.with_suffix(".final_layer.npz")
    write_final_layer(weights_path, layer.weights, layer.biases, labels)
    evaluation["history"] = history
    evaluation["ood_threshold"] = float(ood.threshold)
    metrics_path = settings.output_graph.with_suffix(".metrics.json")
    _write_text(metrics_path, json.dumps(evaluation, indent=2) + "\n")
    if settings.summaries_dir is not None:
        _write_summaries(settings.summaries_dir, history)
    if settings.report is not None:
        from mini_retrain.evaluation.report import write_report

        log(f"Wrote report {write_report(settings.report, history, evaluation, labels)}")
    if settings.explain_misclassified is not None and misclassified:
        from mini_retrain.evaluation.cam import explain_images

        explain_images(settings.output_graph, [settings.image_dir / f for f, _, _ in misclassified],
                       settings.explain_misclassified, log=log)
    log(f"Wrote {settings.output_graph}, {settings.output_labels}, {weights_path} and {metrics_path}")
    return evaluation


def _check_outputs_writable(settings: RetrainSettings) -> None:
    """Fail before hours of work, not after: the folder of each output file, and each output folder (the bottleneck
    cache included), must exist (or be creatable) and be writable; an output file must not be an existing folder."""
    files = [path for path in (settings.output_graph, settings.output_labels, settings.output_weights) if path]
    folders = [settings.summaries_dir, settings.bottleneck_dir or cache_dir() / "bottlenecks",
               settings.explain_misclassified,
               settings.intermediate_output_graphs_dir if settings.intermediate_store_frequency > 0 else None]
    for path in files:
        if Path(path).is_dir():
            raise ValueError(f"{path}: is a folder, not a file name; choose another output path")
    targets = [(path, Path(path).resolve().parent) for path in files] + \
        [(folder, Path(folder).resolve()) for folder in folders if folder]
    for path, folder in targets:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".mini_retrain_write_test_{id(settings)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            # Below a regular file, mkdir says "File exists" or "Not a directory": name the file instead.
            blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
            reason = f"{blocking} is a file, not a folder" if blocking else f"cannot write there ({error.strerror})"
            raise ValueError(f"{path}: {reason}; choose another output path") from None


def _wants_distortions(settings: RetrainSettings) -> bool:
    from mini_retrain.pipeline.distortions import distortions_requested

    return distortions_requested(settings.flip_left_right, settings.random_crop, settings.random_scale,
                                 settings.random_brightness)


def _distorted_bottlenecks(settings: RetrainSettings, backbone, train_files: list[str], rng: np.random.Generator):
    """retrain.py's slow path: each training batch is read, distorted and run through the backbone at every step.

    Images are decoded once and kept in memory, shrunk to the largest size a distortion can ask for.
    """
    from mini_retrain.pipeline.distortions import distort
    from mini_retrain.pipeline.images import read_image

    size = backbone.sidecar["input_size"][0]
    largest = int(np.ceil(size * (1 + settings.random_crop / 100) * (1 + settings.random_scale / 100)))
    decoded: dict[int, np.ndarray] = {}

    def bottlenecks_for(indices: np.ndarray) -> np.ndarray:
        batch = []
        for i in indices.tolist():
            if i not in decoded:
                image = read_image(settings.image_dir / train_files[i], fast=settings.fast_decode)
                image = image.resize((largest, largest), reducing_gap=2.0 if settings.fast_decode else None)
                decoded[i] = np.asarray(image, dtype=np.uint8)
            batch.append(distort(decoded[i].astype(np.float32), rng, settings.flip_left_right, settings.random_crop,
                                 settings.random_scale, settings.random_brightness, size,
                                 backbone.sidecar["input_mean"], backbone.sidecar["input_std"]))
        return run_backbone(backbone, np.stack(batch))

    return bottlenecks_for


def _intermediate_writer(settings: RetrainSettings, backbone, labels: list[str], log: Callable[[str], None]):
    from mini_retrain.pipeline.export import build_retrained_model, write_retrained_graph

    def on_step(step: int, layer: FinalLayer) -> None:
        if step > 0 and step % settings.intermediate_store_frequency == 0:
            path = settings.intermediate_output_graphs_dir / f"intermediate_{step}.onnx"
            model = build_retrained_model(backbone, layer.weights, layer.biases, labels, settings.final_tensor_name,
                                          fast_decode=settings.fast_decode)
            write_retrained_graph(path, model)
            log(f"Save intermediate result to : {path}")

    return on_step


def _write_summaries(folder: Path, history: list[dict]) -> None:
    """Per-step metrics as CSV (for a spreadsheet) and JSON lines (for a script)."""
    columns = ["step", "train_accuracy", "cross_entropy", "validation_accuracy", "validation_n"]
    csv = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in history]
    _write_text(folder / "metrics.csv", "\n".join(csv) + "\n")
    _write_text(folder / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
