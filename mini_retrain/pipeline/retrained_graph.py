"""The end of the pipeline, read back: open a graph written by `mini_retrain retrain` and prepare images for it.

The graph is self-contained: its metadata says how its training images were decoded, resized and scaled
(`input_size`, `input_mean`, `input_std`, `fast_decode`), so `model_input` prepares a new image exactly as they were.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from mini_retrain.errors import print_to_stderr
from mini_retrain.pipeline.backbone import backbone_input, choose_providers, session_options
from mini_retrain.pipeline.export import MARKER
from mini_retrain.pipeline.images import IMAGE_EXTENSIONS, read_image


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
