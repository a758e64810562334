"""The end of the pipeline, read back: open a graph written by `mini_retrain retrain` and run it on image files.

The graph is self-contained: its metadata says how its training images were decoded, resized and scaled
(`input_size`, `input_mean`, `input_std`, `fast_decode`), so `model_input` prepares a new image exactly as they were.

`predict_images` runs it on many files the way bottleneck creation does (bottlenecks.get_bottlenecks): a few threads
decode the next batch (Pillow releases the GIL) while onnxruntime runs the graph on this one, 32 images at a time.
Besides the class probabilities a graph may carry distances with a threshold in its metadata (DISTANCE_OUTPUTS);
each one the graph has is read for every image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from mini_retrain.errors import BadImageError, print_to_stderr
from mini_retrain.pipeline.backbone import backbone_input, choose_providers, session_options
from mini_retrain.pipeline.export import MARKER
from mini_retrain.pipeline.images import IMAGE_EXTENSIONS, read_image

# The optional outputs of a retrained graph: a distance per image, and the threshold above which it flags the image.
# A graph has each one or not (older graphs have none); for each it has, `label --json` gains three fields.
#   graph output      threshold (metadata)  flag (result field)     a flagged image is ...
DISTANCE_OUTPUTS = (
    ("ood_distance", "ood_threshold", "out_of_distribution", "unlike every training image (a photo, not an X-ray?)"),
    ("population_distance", "population_threshold", "other_population",
     "unlike the training X-rays (another population, machine or view?)"),
)


class RetrainedModel(NamedTuple):
    session: Any  # onnxruntime.InferenceSession
    path: Path
    labels: list[str]
    metadata: dict[str, str]


def load_retrained(graph: str | os.PathLike, labels_file: str | os.PathLike | None = None, device: str = "auto",
                   log: Callable[[str], None] = print_to_stderr) -> RetrainedModel:
    """Open a graph written by `mini_retrain retrain` and check that the labels file belongs to it.

    log receives a WARNING when CUDA was asked for but is missing (by default on stderr: `label --json` keeps
    stdout for the JSON)."""
    import onnxruntime

    graph = Path(graph)
    if not graph.is_file():
        raise ValueError(f"{graph}: no such graph; pass the output_graph written by `mini_retrain retrain`")
    providers, message = choose_providers(device, onnxruntime.get_available_providers())
    if message:
        log(f"WARNING: {message}")
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
                             "pass the output_labels written with this graph")
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
        raise ValueError(f"{inputs[0] if inputs else 'images'}: no images found; "
                         "pass image files or a folder of .jpg/.png/.dcm files")
    return paths


def model_input(model: RetrainedModel, image: Path | Image.Image) -> np.ndarray:
    """(3, H, W) float32, decoded, resized and scaled as the graph's metadata says (as its training images were).

    image: a file, or an image already decoded by images.to_image."""
    fast = model.metadata.get("fast_decode") == "1"  # retrain --fast_decode
    sidecar = {"input_size": json.loads(model.metadata["input_size"]),  # the backbone's sidecar, as the graph keeps it
               "input_mean": float(model.metadata["input_mean"]), "input_std": float(model.metadata["input_std"])}
    decoded = image if isinstance(image, Image.Image) else read_image(image, fast=fast, keep_gray=True)
    return backbone_input(decoded, sidecar, fast)


def image_name(image: Path | Image.Image, index: int) -> str:
    """What the results call an image: its path, or "image <index>" for one given in memory."""
    return f"image {index}" if isinstance(image, Image.Image) else str(image)


class Prediction(NamedTuple):
    """One image's result from predict_images."""

    image: str  # its path, or "image <index>" for one given in memory (image_name)
    probabilities: np.ndarray | None  # (classes,) softmax, in model.labels order; None when the image is unusable
    distances: dict[str, float]  # graph output -> distance, for each DISTANCE_OUTPUTS output the graph has
    error: BadImageError | None = None  # why the image could not be used


def distance_outputs(model: RetrainedModel) -> list[str]:
    """The DISTANCE_OUTPUTS this graph has (output present and its threshold in the metadata), in table order."""
    present = {output.name for output in model.session.get_outputs()}
    return [output for output, threshold, _, _ in DISTANCE_OUTPUTS if output in present and threshold in model.metadata]


def flags(model: RetrainedModel, distances: dict[str, float]) -> dict[str, Any]:
    """label --json's fields for an image's distances: {output: d, threshold key: t, flag: d > t} for each."""
    fields: dict[str, Any] = {}
    for output, threshold_key, flag, _ in DISTANCE_OUTPUTS:
        if output in distances:
            threshold = float(model.metadata[threshold_key])
            fields.update({output: distances[output], threshold_key: threshold, flag: bool(distances[output] > threshold)})
    return fields


def predict_images(model: RetrainedModel, images: list[Path | Image.Image], batch_size: int = 32, workers: int = 2,
                   on_batch: Callable[[int, int], None] | None = None) -> Iterator[Prediction]:
    """Run the graph on `images` (files, or images in memory); yield one Prediction per image, in order, each batch as
    soon as it is done.

    `workers` threads decode batch k + 1 while onnxruntime runs batch k (as get_bottlenecks does); a file that cannot
    be read gives a Prediction with its BadImageError and no probabilities. on_batch(done, total) is called with 0
    first, then after each batch, for a progress line. The numbers equal those of one image at a time (same graph, same inputs).
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    paths = [image if isinstance(image, Image.Image) else Path(image) for image in images]
    names = [image_name(image, index) for index, image in enumerate(paths)]
    distances = distance_outputs(model)
    outputs = [model.metadata["final_tensor_name"]] + distances
    input_name = model.metadata["input_name"]

    def decode(path: Path | Image.Image) -> np.ndarray | BadImageError:
        try:
            return model_input(model, path)  # (3, H, W)
        except BadImageError as error:
            return error

    starts = range(0, len(paths), int(batch_size))
    batches = [paths[start : start + int(batch_size)] for start in starts]
    done = 0
    if on_batch is not None:
        on_batch(done, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = pool.map(decode, batches[0]) if batches else iter(())
        for number, batch in enumerate(batches):
            decoded = list(pending)
            if number + 1 < len(batches):  # queue the next batch before running this one
                pending = pool.map(decode, batches[number + 1])
            good = [x for x in decoded if not isinstance(x, BadImageError)]
            values = model.session.run(outputs, {input_name: np.stack(good)}) if good else []  # [(n, classes), (n,)...]
            row = 0
            for name, x in zip(names[done : done + len(batch)], decoded):
                if isinstance(x, BadImageError):
                    yield Prediction(name, None, {}, x)
                    continue
                yield Prediction(name, values[0][row], {output: float(v[row]) for output, v in zip(distances, values[1:])})
                row += 1
            done += len(batch)
            if on_batch is not None:
                on_batch(done, len(paths))
