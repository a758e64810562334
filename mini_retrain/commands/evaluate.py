"""`mini_retrain evaluate`: score a retrained graph on a labelled folder, such as the films of another hospital.

    DIR/normal/*.png  DIR/tuberculosis/*.png     class subfolders named like the graph's labels (retrain's rule)

    1. check      graph, labels file, class folders, --positive_label, --json, --report: before any image is read
    2. predict    the graph end to end on every image (retrained_graph.predict_images: batches, decode threads)
    3. report     the panel retrain prints (metrics.evaluate), how many images the graph's distances flagged,
                  and the internal test the graph carries next to this folder's accuracy

The graph runs from pixels to probabilities, with no bottleneck cache: what is scored is exactly the file that would
be used (its backbone, its preprocessing, its distances), whatever backbone it was built on, and evaluate writes
nothing but what it is asked to. The price is that a second run decodes and runs every image again.

Why the comparison: `retrain`'s test images come from the same folder as its training images (one hospital, one
machine, maybe one patient's other film), so its test accuracy describes that folder. A folder from elsewhere is the
real question. Both accuracies are proportions of independent images, so their difference
d = accuracy here - internal accuracy gets Newcombe's interval (metrics.newcombe_interval): an interval that lies
below 0 means the internal figure did not carry over, more than chance can explain.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.commands.label import clear_progress, format_result, label_result, progress_for
from mini_retrain.commands.recalibrate import calibration_keys, calibration_overlap, calibration_overlap_warning
from mini_retrain.evaluation.metrics import evaluate, format_evaluation, newcombe_interval, wilson_interval
from mini_retrain.paths import write_bytes_atomically
from mini_retrain.pipeline.image_lists import find_images
from mini_retrain.pipeline.images import file_sha1
from mini_retrain.pipeline.retrained_graph import DISTANCE_OUTPUTS, distance_outputs, load_retrained, predict_images
from mini_retrain.settings import check_writable


def _check_outputs(json_file: Path | None, report: Path | None) -> None:
    """--json (a file) and --report (a folder) can be written: settings.check_writable, as retrain checks its own."""
    if json_file is not None:
        check_writable(json_file, "--json", is_folder=False)
    if report is not None:
        check_writable(report, "--report", is_folder=True)


def _rate(record: dict | None) -> dict | None:
    """metrics.evaluate's {estimate, successes, n, ci} as the JSON's {value, ci} (None when it does not apply)."""
    return None if record is None else {"value": record["estimate"], "ci": record["ci"]}


def comparison_sentence(difference: float, low: float, high: float, n: int) -> str:
    """One plain sentence: did the internal test accuracy carry over to this folder? (points = percentage points)"""
    if high < 0:
        return (f"The internal figure did not carry over: accuracy here is {-100 * difference:.1f} points lower, "
                f"more than chance explains (a drop of {-100 * high:.1f} to {-100 * low:.1f} points, 95% CI).")
    if low > 0:
        return (f"Accuracy here is {100 * difference:.1f} points higher than the internal test, more than chance "
                "explains: an easier folder, or another mix of cases.")
    caveat = f", but a drop of up to {-100 * low:.1f} points is not ruled out" if low < 0 else ""
    return f"The internal figure carried over as far as these {n} images can tell: the difference is within chance{caveat}."


def compare_with_internal_test(internal: dict | None, correct: int, n: int) -> tuple[dict | None, list[str]]:
    """(the JSON's `difference` record or None, the printed lines) for this folder's `correct` of `n`."""
    if not internal:
        return None, ["The graph carries no internal test result (written by an older mini_retrain, or retrained "
                      "without test images), so there is nothing to compare with."]
    low, high = newcombe_interval(correct, n, internal["correct"], internal["n"])
    difference = correct / n - internal["correct"] / internal["n"]
    here_low, here_high = wilson_interval(correct, n)
    lines = [
        f"Internal test (retrain's own split) = {100 * internal['accuracy']:.1f}% ({internal['correct']}/"
        f"{internal['n']}, 95% CI {100 * internal['ci'][0]:.1f}-{100 * internal['ci'][1]:.1f}%)",
        f"This folder = {100 * correct / n:.1f}% ({correct}/{n}, 95% CI {100 * here_low:.1f}-{100 * here_high:.1f}%)",
        f"Difference (this folder - internal) = {100 * difference:+.1f} points "
        f"(95% CI {100 * low:+.1f} to {100 * high:+.1f}, Newcombe)",
        comparison_sentence(difference, low, high, n),
    ]
    record = {"value": difference, "ci": [low, high], "method": "Newcombe 1998, hybrid score (method 10)",
              "sentence": lines[-1]}
    return record, lines


def evaluate_folder(graph: str | Path, image_dir: str | Path, labels: str | Path | None = None,
                    positive_label: str | None = None, json_file: str | Path | None = None,
                    report: str | Path | None = None, device: str = "auto",
                    log: Callable[[str], None] = print) -> dict:
    """Score `graph` on the class subfolders of `image_dir`; print the panel and the comparison; return the JSON dict.

    Returns (and writes to json_file): n, accuracy / sensitivity / specificity / roc_auc as {value, ci}, ece,
    positive_label, class_names, missing_classes, flagged {flag: count}, internal_test (as the graph carries it, or
    None), difference {value, ci, method, sentence} (None without an internal test), evaluation (metrics.evaluate's
    full dict) and images: one row per image as `label --json` writes it, plus `true`, the class of its folder.
    """
    image_dir = Path(image_dir)
    _check_outputs(Path(json_file) if json_file else None, Path(report) if report else None)
    model = load_retrained(graph, labels, device)
    image_lists, _ = find_images(image_dir, min_classes=1)  # "fewer than 20 images" is about training: not said
    for label, files in image_lists.items():
        if label not in model.labels:
            folder = image_dir / files[0].split("/")[0]
            raise ValueError(f"{folder}: the folder gives the label '{label}', which is not one of the graph's labels "
                             f"{model.labels}; rename it after one of them, or move it out of {image_dir}")
    if positive_label is not None and positive_label not in model.labels:
        raise ValueError(f"--positive_label {positive_label!r} is not one of the graph's labels {model.labels}")
    missing = [label for label in model.labels if label not in image_lists]
    entries = [(model.labels.index(label), image_dir / relative) for label in model.labels
               for relative in image_lists.get(label, [])]
    log(f"Evaluating {model.path} on {len(entries)} images in {image_dir}: "
        + ", ".join(f"{label} ({len(image_lists[label])})" for label in model.labels if label in image_lists))
    for label in missing:
        log(f"No '{label}' folder in {image_dir} (allowed): nothing measures how well that class is recognised")

    # Predict every image, batch by batch.
    paths = [path for _, path in entries]
    rows, probabilities, truth = [], [], []
    on_batch = progress_for(len(paths), "Evaluating", sys.stderr)
    for (true_class, _), prediction in zip(entries, predict_images(model, paths, on_batch=on_batch)):
        row = {**label_result(model, prediction, len(model.labels)), "true": model.labels[true_class]}
        rows.append(row)
        if prediction.error is not None:
            clear_progress(sys.stderr)
            log(format_result(row)[0])
            continue
        probabilities.append(prediction.probabilities)
        truth.append(true_class)
    if not truth:
        raise ValueError(f"{image_dir}: none of the {len(paths)} images could be read (see the Skipping lines)")

    # The panel, as retrain prints it.
    evaluation = evaluate(np.array(probabilities), np.array(truth), model.labels, positive_label)  # (n, classes), (n,)
    skipped = len(rows) - len(truth)
    if skipped:
        log(f"{skipped} of {len(rows)} images skipped (unreadable); the numbers below are on the other {len(truth)}")
    for line in format_evaluation(evaluation, title="Accuracy"):
        log(line)

    # The graph's distances: how many images are unlike the training images, each way the graph can tell.
    flagged, present = {}, distance_outputs(model)
    for output, threshold_key, flag, meaning in DISTANCE_OUTPUTS:
        if output in present:
            flagged[flag] = sum(bool(row.get(flag)) for row in rows)
            log(f"Flagged: {flagged[flag]} of {len(truth)} images as {meaning}: "
                f"{output} above {float(model.metadata[threshold_key]):.1f}")

    # The internal test the graph carries, and this folder next to it.
    internal = json.loads(model.metadata["internal_test"]) if "internal_test" in model.metadata else None
    difference, lines = compare_with_internal_test(internal, evaluation["accuracy"]["successes"], evaluation["n"])
    for line in lines:
        log(line)
    calibrated = 0
    if calibration_keys(model.metadata):  # a recalibrated graph: were these images its calibration sample?
        keys = [file_sha1(path) for path, row in zip(paths, rows) if "error" not in row]
        calibrated = calibration_overlap(model.metadata, keys)
        warning = calibration_overlap_warning(model.metadata, keys)
        if warning:
            log(warning)

    result = {
        "graph": str(model.path), "image_dir": str(image_dir), "n": evaluation["n"],
        "accuracy": _rate(evaluation["accuracy"]),
        "sensitivity": _rate(evaluation.get("sensitivity")), "specificity": _rate(evaluation.get("specificity")),
        "roc_auc": ({"value": evaluation["roc_auc"]["estimate"], "ci": evaluation["roc_auc"]["ci"]}
                    if "roc_auc" in evaluation else None),
        "ece": evaluation["calibration"]["ece"], "positive_label": evaluation.get("positive_label"),
        "class_names": model.labels, "missing_classes": missing, "skipped": skipped, "flagged": flagged,
        "internal_test": internal, "difference": difference, "calibration_images": calibrated,
        "evaluation": evaluation, "images": rows,
    }
    if json_file is not None:
        write_bytes_atomically(Path(json_file), (json.dumps(result, indent=2) + "\n").encode())
        log(f"Wrote {json_file}")
    if report is not None:
        from mini_retrain.evaluation.report import write_report

        title = f"mini_retrain evaluation: {model.path.name} on {image_dir}"
        log(f"Wrote report {write_report(Path(report), [], evaluation, model.labels, title=title)}")
    return result
