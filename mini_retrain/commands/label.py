"""label_image: run a retrained graph on new images and print the top predictions, highest first.

    abnormal (score = 0.96525)
    normal (score = 0.03475)

and, new here, a warning when the image is unlike every training image (the original experiment's cow, called
"normal (score = 0.99828)"): the graph's `ood_distance` output is the Mahalanobis distance of the image's bottleneck
to the nearest class mean of the training bottlenecks; beyond the threshold stored in the graph the scores mean little. A second warning, `population_distance`, says an
X-ray is unlike the training X-rays (an adult film for a model of children's films; another machine or view): the
distance on an earlier block's average (evaluation/population.py), with its own threshold in the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mini_retrain.errors import BadImageError
from mini_retrain.evaluation.population import population_warning
from mini_retrain.pipeline.retrained_graph import RetrainedModel, model_input

EXPECTED_SHARE = "1%"  # of images like the training ones above the population threshold (population.py)
OOD_WARNING = ("WARNING: this image is unlike the training images (out of distribution: distance {distance:.1f} > "
               "threshold {threshold:.1f}); the scores above should not be trusted")


def label_images(model: RetrainedModel, paths: list[Path], num_top_predictions: int = 5,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Per image: top-k {label, score}, the OOD distance and flag; unreadable images get an "error" entry."""
    if num_top_predictions < 1:
        raise ValueError(f"--num_top_predictions must be at least 1, got {num_top_predictions}")
    final = model.metadata["final_tensor_name"]
    outputs = [final] + (["ood_distance"] if "ood_threshold" in model.metadata else []) \
        + (["population_distance"] if "population_threshold" in model.metadata else [])  # older graphs: neither
    results = []
    for path in paths:
        try:
            x = model_input(model, path)[None]  # (1, 3, H, W)
        except BadImageError as error:
            log(f"Skipping {path}: {error.reason} ({error.fix})")
            results.append({"image": str(path), "error": error.reason, "fix": error.fix})
            continue
        values = dict(zip(outputs, model.session.run(outputs, {model.metadata["input_name"]: x})))
        scores = values[final][0]  # (classes,)
        order = np.argsort(-scores, kind="stable")[:num_top_predictions]
        result: dict[str, Any] = {
            "image": str(path),
            "predictions": [{"label": model.labels[i], "score": float(scores[i])} for i in order],
        }
        if "ood_distance" in values:
            threshold = float(model.metadata["ood_threshold"])
            result["ood_distance"] = float(values["ood_distance"][0])
            result["ood_threshold"] = threshold
            result["out_of_distribution"] = bool(values["ood_distance"][0] > threshold)
        if "population_distance" in values:
            threshold = float(model.metadata["population_threshold"])
            result["population_distance"] = float(values["population_distance"][0])
            result["population_threshold"] = threshold
            result["other_population"] = bool(values["population_distance"][0] > threshold)
        results.append(result)
    return results


def format_result(result: dict) -> list[str]:
    """label_image's lines for one image."""
    if "error" in result:
        return [f"{result['image']}: skipped ({result['error']}; {result['fix']})"]
    lines = [result["image"]] + [f"{p['label']} (score = {p['score']:.5f})" for p in result["predictions"]]
    if result.get("out_of_distribution"):
        lines.append(OOD_WARNING.format(distance=result["ood_distance"], threshold=result["ood_threshold"]))
    if result.get("other_population"):
        lines.append(population_warning(result["population_distance"], result["population_threshold"]))
    return lines


def population_summary(results: list[dict]) -> str | None:
    """One line for a folder: how many images the population distance flags, against the share expected by chance
    (its threshold is the 99th percentile of held-out training distances). None when the graph has no such distance."""
    scored = [result for result in results if "other_population" in result]
    if not scored:
        return None
    flagged = sum(result["other_population"] for result in scored)
    return (f"{flagged} of {len(scored)} images are unlike the training images "
            f"(about {EXPECTED_SHARE} expected for images like them)")
