"""mini_retrain from Python: the commands as functions, with retrain.py's flag names as keyword arguments.

    import mini_retrain

    evaluation = mini_retrain.retrain("lungs/", how_many_training_steps=500)   # what `mini_retrain retrain` prints
    results = mini_retrain.label("retrained_graph.onnx", ["new_xray.png"])      # what `label --json` prints
    maps = mini_retrain.explain("retrained_graph.onnx", "new_xray.png", output="heat.png")

Paths may be str or any os.PathLike. label and explain also take images already in memory: a PIL image, or a NumPy
array of uint8, (H, W) grey or (H, W, 3) RGB. A bad argument raises before any work: ValueError naming it, TypeError
for a keyword retrain does not know.

`mini_retrain/__init__.py` imports this module only when one of its functions is first used, so `import mini_retrain`
stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mini_retrain.commands.evaluate import evaluate_folder
from mini_retrain.commands.label import NUM_TOP_PREDICTIONS, label_images
from mini_retrain.commands.retrain import retrain as run_retrain
from mini_retrain.errors import print_to_stderr
from mini_retrain.evaluation.cam import explain_images
from mini_retrain.pipeline.images import to_image
from mini_retrain.pipeline.retrained_graph import image_paths, load_retrained
from mini_retrain.settings import RetrainSettings

ImageInput = str | os.PathLike | Image.Image | np.ndarray  # a file or folder, or an image in memory


def settings_from(image_dir: str | os.PathLike, flags: dict[str, Any]) -> RetrainSettings:
    """RetrainSettings(image_dir, **flags), with a TypeError that suggests the flag meant for an unknown keyword."""
    fields = [field.name for field in dataclasses.fields(RetrainSettings)]
    for name in flags:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; the flags are {', '.join(fields)}"
            raise TypeError(f"retrain() got an unexpected keyword argument {name!r}{hint}")
    return RetrainSettings(image_dir=image_dir, **flags)


def retrain(image_dir: str | os.PathLike, *, log: Callable[[str], None] = print, **flags: Any) -> dict:
    """`mini_retrain retrain --image_dir IMAGE_DIR --flag value ...`: train, test, write the graph; return the test
    evaluation (accuracy, sensitivity, ... with their intervals; the per-step "history"; as in
    retrained_graph.metrics.json).

    flags: retrain.py's flags by name, e.g. how_many_training_steps=500, learning_rate=0.01, output_graph="x.onnx",
    class_balancing=False (True/False where the command line says on/off). Defaults: mini_retrain/settings.py."""
    return run_retrain(settings_from(image_dir, flags), log)


def _image_list(images: ImageInput | Iterable[ImageInput]) -> list[Path | Image.Image]:
    """One image or several -> files (folders expanded, as the command line does) and decoded in-memory images."""
    if isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
        images = [images]
    items: list[Path | Image.Image] = []
    for index, image in enumerate(images):
        if isinstance(image, str | os.PathLike):
            items.extend(image_paths([image]))
        else:
            items.append(to_image(image, name=f"image {index}"))
    if not items:
        raise ValueError("images: none given; pass image files, folders, PIL images or arrays")
    return items


def label(graph: str | os.PathLike, images: ImageInput | Iterable[ImageInput],
          labels: str | os.PathLike | None = None, *, num_top_predictions: int = NUM_TOP_PREDICTIONS,
          device: str = "auto", log: Callable[[str], None] = print_to_stderr) -> list[dict]:
    """`mini_retrain label --json`: one dict per image, {"image", "predictions": [{"label", "score"}, ...] (highest
    first), "ood_distance", "ood_threshold", "out_of_distribution"}; an unreadable file gets {"image", "error", "fix"}.

    labels: the labels file written with the graph, checked against it (optional). Images in memory are called
    "image <index>" in the results."""
    items = _image_list(images)
    model = load_retrained(graph, labels, device, log)
    return label_images(model, items, num_top_predictions, log)


def explain(graph: str | os.PathLike, images: ImageInput | Iterable[ImageInput], output: str | os.PathLike,
            labels: str | os.PathLike | None = None, *, class_name: str | None = None, device: str = "auto",
            log: Callable[[str], None] = print) -> list[dict]:
    """`mini_retrain explain`: a class activation heat map per image; one dict each, {"image", "heat_map" (the PNG
    written), "label", "score", "logit", "bias", "cam_mean", "cam" (the 8x8 map)}.

    output: a .png/.jpg for one image, else a folder that receives <image name>.cam.png. class_name: explain this
    class instead of the predicted one."""
    items = _image_list(images)
    return explain_images(Path(graph), items, Path(output), labels, class_name, device, log)


def evaluate(graph: str | os.PathLike, image_dir: str | os.PathLike, labels: str | os.PathLike | None = None, *,
             positive_label: str | None = None, json_file: str | os.PathLike | None = None,
             report: str | os.PathLike | None = None, device: str = "auto",
             log: Callable[[str], None] = print) -> dict:
    """`mini_retrain evaluate`: score a retrained graph on a labelled folder (one subfolder per class, named like the
    graph's labels) and compare with the internal test the graph carries. Returns the dict `evaluate --json` writes:
    n, accuracy {value, ci}, sensitivity, specificity, roc_auc, internal_test, difference, images (one row each)."""
    return evaluate_folder(graph, image_dir, labels, positive_label, json_file, report, device, log)
