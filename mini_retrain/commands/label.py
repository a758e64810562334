"""label_image: run a retrained graph on new images and print the top predictions, highest first.

    abnormal (score = 0.96525)
    normal (score = 0.03475)

and, new here, a warning when the image is unlike every training image (the original experiment's cow, called
"normal (score = 0.99828)"): the graph's `ood_distance` output is the Mahalanobis distance of the image's bottleneck
to the nearest class mean of the training bottlenecks; beyond the threshold stored in the graph the scores mean little. A second
warning, `population_distance`, says an X-ray is unlike the training X-rays (an adult film for a model of children's
films; another machine or view): the distance on an earlier block's average (evaluation/population.py), with its own
threshold in the graph.

Images go through the graph in batches, decoded by threads (retrained_graph.predict_images), and each image's lines
are printed as soon as its batch is done; a long folder shows a progress line on stderr.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mini_retrain.evaluation.ood import OOD_WARNING  # explain prints the same words
from mini_retrain.evaluation.population import population_warning
from mini_retrain.pipeline.bottlenecks import progress_line
from mini_retrain.pipeline.retrained_graph import DISTANCE_OUTPUTS, Prediction, RetrainedModel, flags, predict_images

NUM_TOP_PREDICTIONS = 5  # label_image's default: the five most likely labels

EXPECTED_SHARE = "1%"  # of images like the training ones above the population threshold (population.py)
# The warning printed under an image for each flag of retrained_graph.DISTANCE_OUTPUTS: (distance, threshold) -> line.
WARNINGS = {"out_of_distribution": lambda distance, threshold: OOD_WARNING.format(distance=distance,
                                                                                threshold=threshold),
            "other_population": population_warning}
PROGRESS_ABOVE = 50  # a run over more images than this shows a progress line even when stderr is not a terminal


def label_result(model: RetrainedModel, prediction: Prediction,
                 num_top_predictions: int = NUM_TOP_PREDICTIONS) -> dict[str, Any]:
    """label --json's record of one image: top-k {label, score} and each distance with its flag, or the error."""
    if prediction.error is not None:
        return {"image": prediction.image, "error": prediction.error.reason, "fix": prediction.error.fix}
    scores = prediction.probabilities  # (classes,)
    order = np.argsort(-scores, kind="stable")[:num_top_predictions]
    return {"image": prediction.image,
            "predictions": [{"label": model.labels[i], "score": float(scores[i])} for i in order],
            **flags(model, prediction.distances)}


def label_stream(model: RetrainedModel, images: list[Path | Image.Image],
                 num_top_predictions: int = NUM_TOP_PREDICTIONS, batch_size: int = 32, workers: int = 2,
                 on_batch: Callable[[int, int], None] | None = None) -> Iterator[dict[str, Any]]:
    """label_result for every image (a file, or an image in memory: images.to_image), in order, batch by batch as the
    graph finishes them (arguments checked now, before the first image is read)."""
    if isinstance(num_top_predictions, bool) or not isinstance(num_top_predictions, int) or num_top_predictions < 1:
        raise ValueError(f"num_top_predictions must be at least 1, got {num_top_predictions!r}")
    return (label_result(model, prediction, num_top_predictions)
            for prediction in predict_images(model, images, batch_size, workers, on_batch))


def label_images(model: RetrainedModel, images: list[Path | Image.Image],
                 num_top_predictions: int = NUM_TOP_PREDICTIONS, log: Callable[[str], None] = print) -> list[dict]:
    """Per image: top-k {label, score}, the distances and flags; an unreadable image gets an "error" entry and one
    "Skipping" line through `log`."""
    results = list(label_stream(model, images, num_top_predictions))
    for result in results:
        if "error" in result:
            log(format_result(result)[0])
    return results


def format_result(result: dict) -> list[str]:
    """label_image's lines for one image (one "Skipping" line for an image that could not be read)."""
    if "error" in result:
        return [f"Skipping {result['image']}: {result['error']} ({result['fix']})"]
    lines = [result["image"]] + [f"{p['label']} (score = {p['score']:.5f})" for p in result["predictions"]]
    for output, threshold, flag, _ in DISTANCE_OUTPUTS:
        if result.get(flag):
            lines.append(WARNINGS[flag](result[output], result[threshold]))
    return lines


def progress_for(total: int, title: str, stream=None) -> Callable[[int, int], None] | None:
    """A progress callback for predict_images (on stderr), or None: shown on a terminal, or above PROGRESS_ABOVE."""
    stream = stream or sys.stderr
    if not (stream.isatty() or total > PROGRESS_ABOVE):
        return None
    started = time.perf_counter()
    return lambda done, total: progress_line(done, total, started, stream, title)


def clear_progress(stream=None) -> None:
    """Wipe the progress line a terminal shows (it is redrawn after the next batch), so output starts on a clean line."""
    stream = stream or sys.stderr
    if stream.isatty():
        stream.write("\r\033[K")


def print_labels(model: RetrainedModel, paths: list[Path], num_top_predictions: int = 5, as_json: bool = False,
                 stdout=None, stderr=None) -> int:
    """`mini_retrain label`: print each image's lines (or its JSON record) as soon as its batch is done.

    Text: label_image's lines, and one "Skipping" line for an unreadable image, on stdout. JSON: one array on stdout,
    written record by record (the same text as json.dumps(results, indent=2)), the "Skipping" lines on stderr.
    Returns how many images were labelled; none at all is a ValueError (the command exits non-zero).
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    labelled, scored = 0, []
    results = label_stream(model, paths, num_top_predictions, on_batch=progress_for(len(paths), "Labelling", stderr))
    for number, result in enumerate(results):
        clear_progress(stderr)
        labelled += "error" not in result
        scored.append({key: result[key] for key in ("other_population",) if key in result})
        if not as_json:
            print("\n".join(format_result(result)), file=stdout, flush=True)
            continue
        if "error" in result:
            print(format_result(result)[0], file=stderr, flush=True)  # stdout stays JSON
        record = textwrap.indent(json.dumps(result, indent=2), "  ")
        print(("[\n" if number == 0 else ",\n") + record, end="", file=stdout, flush=True)
    if as_json:
        print("\n]", file=stdout, flush=True)
    summary = population_summary(scored) if len(paths) > 1 else None
    if summary:
        print(summary, file=stderr if as_json else stdout, flush=True)
    if labelled == 0:
        raise ValueError(f"none of the {len(paths)} image(s) could be read (see the Skipping lines); "
                         "pass X-ray files in a format read_image accepts (.jpg, .png, .dcm)")
    return labelled


def population_summary(results: list[dict]) -> str | None:
    """One line for a folder: how many images the population distance flags, against the share expected by chance
    (its threshold is the 99th percentile of held-out training distances). None when the graph has no such distance."""
    scored = [result for result in results if "other_population" in result]
    if not scored:
        return None
    flagged = sum(result["other_population"] for result in scored)
    return (f"{flagged} of {len(scored)} images are unlike the training images "
            f"(about {EXPECTED_SHARE} expected for images like them)")
