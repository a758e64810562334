"""Class activation maps (Zhou et al. 2016): where in the image the evidence for a class came from.

Inception v3 ends with `mixed_10`, a (2048, 8, 8) grid of features f(y, x), averaged into the bottleneck:

    pool_3 = 1/64 sum_{y,x} f(y, x)                         (2048,)

and the retrained layer is linear, so the logit of class c splits exactly over the grid:

    logit_c = w_c . pool_3 + b_c = 1/64 sum_{y,x} w_c . f(y, x) + b_c
    CAM_c(y, x) = w_c . f(y, x)                             (8, 8)
    mean(CAM_c) = logit_c - b_c                             (tested)

The same holds for any block (--bottleneck_layers): each layer l is the average of its own feature map f_l over its
own grid (17 x 17 for mixed_4, 8 x 8 for mixed_8, 35 x 35 for mixed), and its rows w_{c,l} of the weights meet only
its numbers, so with several layers side by side

    logit_c - b_c = sum_l w_{c,l} . mean_{y,x} f_l(y, x) = sum_l mean(CAM_{c,l}),   CAM_{c,l} = w_{c,l} . f_l(y, x)

one map per layer, each on its own grid (tested). For the picture, each map is stretched over the image and the
maps are added.

Each cell of the 8x8 map covers about 37x37 pixels of the 299x299 input. Upsampled and laid over the image, it shows
which regions pushed the score for class c up (warm) or down (cool). It shows where the evidence is, not whether it
is medically meaningful: a model that learned a hospital's text markers will light up the markers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mini_retrain.pipeline.retrained_graph import RetrainedModel, load_retrained, model_input
from mini_retrain.pipeline.images import read_image
from mini_retrain.evaluation.population import population_warning


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


def added_maps(cams: list[np.ndarray], size: int) -> np.ndarray:
    """The layers' maps, each stretched (bilinear) to size x size, added: one picture of all the evidence.
    [(h1, w1), (h2, w2), ...] -> (size, size); a single map is returned as it is."""
    if len(cams) == 1:
        return cams[0]
    stretched = [np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
                 for cam in cams]
    return np.sum(stretched, axis=0)  # (size, size)


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


def feature_maps(model: RetrainedModel) -> dict[str, str]:
    """{layer: graph output of its feature map}, in the order of the final layer's rows (the graph's
    bottleneck_layers). A graph from before --bottleneck_layers reads pool_3, whose map is its spatial_output."""
    if "feature_maps" in model.metadata:
        maps = json.loads(model.metadata["feature_maps"])
        layers = json.loads(model.metadata["bottleneck_layers"])
        missing = [layer for layer in layers if layer not in maps]
        if missing:
            raise ValueError(f"{model.path}: the backbone gives no feature map of {', '.join(missing)}, so no "
                             "activation map can be made")
        return {layer: maps[layer] for layer in layers}
    spatial_name = model.metadata.get("spatial_output")
    if not spatial_name:
        raise ValueError(f"{model.path}: the backbone has no spatial output, so no activation map can be made")
    return {model.metadata.get("bottleneck_output", "pool_3"): spatial_name}


def explain_image(model: RetrainedModel, weights: np.ndarray, biases: np.ndarray, path: Path, output: Path,
                  class_index: int | None = None) -> dict:
    """Write the heat map for one image; return the class, its score, logit, each layer's map and their means
    (which add up to logit - bias), and the population warning's numbers when the graph has that distance."""
    maps = feature_maps(model)
    population = "population_threshold" in model.metadata
    x = model_input(model, path)[None]  # (1, 3, H, W)
    outputs = [model.metadata["final_tensor_name"], "final_logits", *maps.values()]
    values = model.session.run(outputs + (["population_distance"] if population else []),
                               {model.metadata["input_name"]: x})
    probabilities, logits, spatial = values[0], values[1], values[2:2 + len(maps)]
    if class_index is None:
        class_index = int(probabilities[0].argmax())
    cams, start = {}, 0
    for layer, feature_map in zip(maps, spatial):  # the final layer's rows: layer after layer, channel by channel
        channels = feature_map.shape[1]
        cams[layer] = class_activation_map(feature_map[0], weights[start:start + channels], class_index)  # (h, w)
        start += channels
    if start != weights.shape[0]:
        raise ValueError(f"{model.path}: the feature maps have {start} channels but the final layer has "
                         f"{weights.shape[0]} rows; the graph is damaged, retrain it")
    image = read_image(path)
    image.thumbnail((1024, 1024))  # a heat map does not need every pixel of a 4000x5000 X-ray
    output.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, added_maps(list(cams.values()), x.shape[-1])).save(output)
    result = {"image": str(path), "heat_map": str(output), "label": model.labels[class_index],
              "score": float(probabilities[0, class_index]), "logit": float(logits[0, class_index]),
              "bias": float(biases[class_index]), "cam_mean": float(sum(cam.mean() for cam in cams.values())),
              "cam_means": {layer: float(cam.mean()) for layer, cam in cams.items()},
              "cams": {layer: cam.tolist() for layer, cam in cams.items()}}
    if len(cams) == 1:
        result["cam"] = next(iter(cams.values())).tolist()
    if population:
        result["population_distance"] = float(values[-1][0])
        result["population_threshold"] = float(model.metadata["population_threshold"])
        result["other_population"] = result["population_distance"] > result["population_threshold"]
    return result


def explain_images(graph: Path, paths: list[Path], output: Path, labels_file: Path | None = None,
                   label: str | None = None, device: str = "auto", log: Callable[[str], None] = print) -> list[dict]:
    """Heat maps for the predicted or the chosen label.

    One image and an output ending in .png: written to exactly that file. Otherwise output is a folder and each
    image gets output/<image name>.cam.png. Each image's line also shows the identity mean(map) = logit - bias.
    """
    model = load_retrained(graph, labels_file, device)
    weights, biases = final_weights(Path(graph))
    class_index = None
    if label is not None:
        if label not in model.labels:
            raise ValueError(f"--label {label!r} is not one of the graph's labels {model.labels}")
        class_index = model.labels.index(label)
    one_file = len(paths) == 1 and Path(output).suffix.lower() == ".png"
    results = []
    for path in paths:
        target = Path(output) if one_file else Path(output) / f"{Path(path).stem}.cam.png"
        result = explain_image(model, weights, biases, Path(path), target, class_index)
        log(f"{path}: {result['label']} (score = {result['score']:.5f}); heat map {target}")
        if result.get("other_population"):
            log(population_warning(result["population_distance"], result["population_threshold"]))
        means = result["cam_means"]
        terms = "" if len(means) == 1 else " + ".join(
            f"{mean:.5f} ({layer}, {len(result['cams'][layer])}x{len(result['cams'][layer][0])})"
            for layer, mean in means.items()) + " = "
        what = "mean of the map" if len(means) == 1 else "sum of the maps' means"
        log(f"{what} = {terms}{result['cam_mean']:.5f} = logit - bias = {result['logit'] - result['bias']:.5f}")
        results.append(result)
    return results
