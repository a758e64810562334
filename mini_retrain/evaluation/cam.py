"""Class activation maps (Zhou et al. 2016): where in the image the evidence for a class came from.

Inception v3 ends with `mixed_10`, a (2048, 8, 8) grid of features f(y, x), averaged into the bottleneck:

    pool_3 = 1/64 sum_{y,x} f(y, x)                         (2048,)

and the retrained layer is linear, so the logit of class c splits exactly over the grid:

    logit_c = w_c . pool_3 + b_c = 1/64 sum_{y,x} w_c . f(y, x) + b_c
    CAM_c(y, x) = w_c . f(y, x)                             (8, 8)
    mean(CAM_c) = logit_c - b_c                             (tested)

Each cell of the 8x8 map covers about 37x37 pixels of the 299x299 input. Upsampled and laid over the image, it shows
which regions pushed the score for class c up (warm) or down (cool). It shows where the evidence is, not whether it
is medically meaningful: a model that learned a hospital's text markers will light up the markers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mini_retrain.pipeline.retrained_graph import RetrainedModel, image_name, load_retrained, model_input
from mini_retrain.pipeline.images import read_image


def class_activation_map(spatial: np.ndarray, weights: np.ndarray, class_index: int) -> np.ndarray:
    """CAM_c(y, x) = w_c . f(y, x).  spatial (D, h, w), weights (D, classes) -> (h, w)."""
    return np.einsum("dyx,d->yx", spatial, weights[:, class_index])  # (D, h, w) . (D,) -> (h, w)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 with a blue-cyan-yellow-red ramp (low = cool, high = warm).  (h, w) -> (h, w, 3)"""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colours = np.array([[0, 0, 128], [0, 160, 255], [128, 255, 128], [255, 200, 0], [200, 0, 0]], dtype=np.float32)
    clipped = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(clipped, stops, colours[:, channel]) for channel in range(3)], axis=-1)
    return rgb.astype(np.uint8)


def overlay(image: Image.Image, cam: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The image with the CAM upsampled (bilinear) over it; the map is scaled to its own min..max."""
    low, high = float(cam.min()), float(cam.max())
    scaled = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
    heat = Image.fromarray(scaled.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR)
    heat_rgb = colour_map(np.asarray(heat))  # (H, W, 3)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - opacity) * base + opacity * heat_rgb  # (H, W, 3)
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def final_weights(graph: Path) -> tuple[np.ndarray, np.ndarray]:
    """The retrained layer's (weights (D, C), biases (C,)) read from the graph's initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in ("final_weights", "final_biases")}
    if len(found) != 2:
        raise ValueError(f"{graph}: no final_weights/final_biases inside; pass a graph written by `mini_retrain retrain`")
    return found["final_weights"], found["final_biases"]


def explain_image(model: RetrainedModel, weights: np.ndarray, biases: np.ndarray, image: Path | Image.Image,
                  output: Path, class_index: int | None = None, name: str | None = None) -> dict:
    """Write the heat map for one image; return the class, its score, logit and the CAM's mean (= logit - bias).

    image: a file, or an image already in memory (images.to_image), called `name` in the result."""
    spatial_name = model.metadata.get("spatial_output")
    if not spatial_name:
        raise ValueError(f"{model.path}: the backbone has no spatial output, so no activation map can be made")
    x = model_input(model, image)[None]  # (1, 3, H, W)
    probabilities, logits, spatial = model.session.run(
        [model.metadata["final_tensor_name"], "final_logits", spatial_name], {model.metadata["input_name"]: x})
    if class_index is None:
        class_index = int(probabilities[0].argmax())
    cam = class_activation_map(spatial[0], weights, class_index)  # (8, 8)
    picture = image.copy() if isinstance(image, Image.Image) else read_image(image)
    picture.thumbnail((1024, 1024))  # a heat map does not need every pixel of a 4000x5000 X-ray
    output.parent.mkdir(parents=True, exist_ok=True)
    overlay(picture, cam).save(output)
    return {"image": name or str(image), "heat_map": str(output), "label": model.labels[class_index],
            "score": float(probabilities[0, class_index]), "logit": float(logits[0, class_index]),
            "bias": float(biases[class_index]), "cam_mean": float(cam.mean()), "cam": cam.tolist()}


def explain_images(graph: Path, images: list[Path | Image.Image], output: Path, labels_file: Path | None = None,
                   label: str | None = None, device: str = "auto", log: Callable[[str], None] = print) -> list[dict]:
    """Heat maps for the predicted or the chosen label.

    One image and an output ending in .png: written to exactly that file. Otherwise output is a folder and each
    image gets output/<image name>.cam.png (output/image_<index>.cam.png for one given in memory). Each image's line
    also shows the identity mean(map) = logit - bias.
    """
    model = load_retrained(graph, labels_file, device, log)
    weights, biases = final_weights(Path(graph))
    class_index = None
    if label is not None:
        if label not in model.labels:
            raise ValueError(f"label {label!r} is not one of the graph's labels {model.labels}")
        class_index = model.labels.index(label)
    one_file = len(images) == 1 and Path(output).suffix.lower() == ".png"
    results = []
    for index, image in enumerate(images):
        name = image_name(image, index)
        stem = f"image_{index}" if isinstance(image, Image.Image) else Path(image).stem
        target = Path(output) if one_file else Path(output) / f"{stem}.cam.png"
        image = image if isinstance(image, Image.Image) else Path(image)
        result = explain_image(model, weights, biases, image, target, class_index, name)
        log(f"{name}: {result['label']} (score = {result['score']:.5f}); heat map {target}")
        log(f"mean of the map = {result['cam_mean']:.5f} = logit - bias = {result['logit'] - result['bias']:.5f}")
        results.append(result)
    return results
