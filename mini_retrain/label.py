"""label_image: run a retrained graph on new images and print the top predictions, highest first.

    abnormal (score = 0.96525)
    normal (score = 0.03475)

and, new here, a warning when the image is unlike every training image (the original experiment's cow, called
"normal (score = 0.99828)"): the graph's `ood_distance` output is the Mahalanobis distance of the image's bottleneck
to the nearest class mean of the training bottlenecks; beyond the threshold stored in the graph the scores mean little.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mini_retrain.backbone import backbone_input, choose_providers, session_options
from mini_retrain.export import MARKER
from mini_retrain.images import IMAGE_EXTENSIONS, BadImageError, read_image

OOD_WARNING = ("WARNING: this image is unlike the training images (out of distribution: distance {distance:.1f} > "
               "threshold {threshold:.1f}); the scores above should not be trusted")


class RetrainedModel(NamedTuple):
    session: Any  # onnxruntime.InferenceSession
    path: Path
    labels: list[str]
    metadata: dict[str, str]


def load_retrained(graph: str | Path, labels_file: str | Path | None = None, device: str = "auto") -> RetrainedModel:
    """Open a graph written by `mini_retrain retrain` and check that the labels file belongs to it."""
    import onnxruntime

    graph = Path(graph)
    if not graph.is_file():
        raise ValueError(f"{graph}: no such graph; pass the --output_graph of `mini_retrain retrain`")
    providers, message = choose_providers(device, onnxruntime.get_available_providers())
    if message:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
    try:
        session = onnxruntime.InferenceSession(str(graph), sess_options=session_options(), providers=providers)
    except Exception as error:
        raise ValueError(f"{graph}: not an ONNX graph onnxruntime can load ({str(error).splitlines()[0][:200]})") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if MARKER not in metadata:
        raise ValueError(f"{graph}: not a graph written by `mini_retrain retrain` (no {MARKER} metadata); retrain first")
    labels = json.loads(metadata["labels"])
    if labels_file is not None:
        labels_file = Path(labels_file)
        try:
            given = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ValueError(f"{labels_file}: cannot read the labels file ({error.strerror})") from None
        if given != labels:
            raise ValueError(f"{labels_file}: labels {given} do not match the graph's {labels}; "
                             "pass the --output_labels written with this graph")
    return RetrainedModel(session, graph, labels, metadata)


def image_paths(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (sorted, hidden files skipped).

    Nothing at all (only empty folders) is a ValueError: a command given no image has nothing to do."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                                and not any(part.startswith(".") for part in p.relative_to(item).parts)))
        else:
            paths.append(item)
    if not paths:
        raise ValueError(f"{inputs[0] if inputs else '--image'}: no images found; "
                         "pass image files or a folder of .jpg/.png/.dcm files")
    return paths


def model_input(model: RetrainedModel, path: Path) -> np.ndarray:
    """(3, H, W) float32, decoded, resized and scaled as the graph's metadata says (as its training images were)."""
    fast = model.metadata.get("fast_decode") == "1"  # retrain --fast_decode
    sidecar = {"input_size": json.loads(model.metadata["input_size"]),  # the backbone's sidecar, as the graph keeps it
               "input_mean": float(model.metadata["input_mean"]), "input_std": float(model.metadata["input_std"])}
    return backbone_input(read_image(path, fast=fast, keep_gray=True), sidecar, fast)


def label_images(model: RetrainedModel, paths: list[Path], num_top_predictions: int = 5,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Per image: top-k {label, score}, the OOD distance and flag; unreadable images get an "error" entry."""
    if num_top_predictions < 1:
        raise ValueError(f"--num_top_predictions must be at least 1, got {num_top_predictions}")
    final = model.metadata["final_tensor_name"]
    outputs = [final] + (["ood_distance"] if "ood_threshold" in model.metadata else [])
    results = []
    for path in paths:
        try:
            x = model_input(model, path)[None]  # (1, 3, H, W)
        except BadImageError as error:
            log(f"Skipping {path}: {error.reason} ({error.fix})")
            results.append({"image": str(path), "error": error.reason, "fix": error.fix})
            continue
        values = model.session.run(outputs, {model.metadata["input_name"]: x})
        scores = values[0][0]  # (classes,)
        order = np.argsort(-scores, kind="stable")[:num_top_predictions]
        result: dict[str, Any] = {
            "image": str(path),
            "predictions": [{"label": model.labels[i], "score": float(scores[i])} for i in order],
        }
        if len(values) > 1:
            threshold = float(model.metadata["ood_threshold"])
            result["ood_distance"] = float(values[1][0])
            result["ood_threshold"] = threshold
            result["out_of_distribution"] = bool(values[1][0] > threshold)
        results.append(result)
    return results


def format_result(result: dict) -> list[str]:
    """label_image's lines for one image."""
    if "error" in result:
        return [f"{result['image']}: skipped ({result['error']}; {result['fix']})"]
    lines = [result["image"]] + [f"{p['label']} (score = {p['score']:.5f})" for p in result["predictions"]]
    if result.get("out_of_distribution"):
        lines.append(OOD_WARNING.format(distance=result["ood_distance"], threshold=result["ood_threshold"]))
    return lines
