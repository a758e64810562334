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

Each cell of the 8x8 map covers about 37x37 pixels of the 299x299 input. The picture gets a legend below it: the class
and its score, a colour bar from the map's lowest to its highest value, and label's out-of-distribution warning when
the image is unlike the training images (the console gets the same line). An --output ending in .png/.jpg/.jpeg is one
file (so one image); anything else is a folder of <image>.cam.png files. Both are checked before any image is read. Upsampled and laid over the image, it shows
which regions pushed the score for class c up (warm) or down (cool). It shows where the evidence is, not whether it
is medically meaningful: a model that learned a hospital's text markers will light up the markers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mini_retrain.evaluation.ood import OOD_WARNING
from mini_retrain.pipeline.retrained_graph import RetrainedModel, image_name, load_retrained, model_input
from mini_retrain.pipeline.images import read_image
from mini_retrain.evaluation.population import population_warning
from mini_retrain.settings import check_writable

HEAT_MAP_SUFFIXES = (".png", ".jpg", ".jpeg")  # an --output ending so is one file, anything else a folder


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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def with_legend(picture: Image.Image, class_name: str, score: float, low: float, high: float,
                warning: str | None = None) -> Image.Image:
    """The heat map with a strip below it: the class and its score, the colour bar from the map's lowest to its
    highest value (w_c . f, the class's evidence per cell), and the out-of-distribution warning when there is one."""
    from PIL import ImageDraw

    width = picture.width
    size = max(12, width // 48)
    margin = size // 2
    lines = 3 + (2 if warning else 0)
    strip = Image.new("RGB", (width, lines * (size + margin) + 2 * margin), "white")
    draw = ImageDraw.Draw(strip)
    font = _font(size)
    draw.text((margin, margin), f"{class_name} (score = {score:.5f}): where the evidence for this class lies",
              fill="black", font=font)
    bar_top, bar_height = margin + size + margin, size
    left, right = margin + draw.textlength(f"{low:.2f} ", font=font), width - margin - draw.textlength(f" {high:.2f}",
                                                                                                     font=font)
    ramp = colour_map(np.linspace(0.0, 1.0, max(2, int(right - left))))[None]  # (1, bar width, 3)
    bar = Image.fromarray(np.repeat(ramp, bar_height, axis=0))  # (bar height, bar width, 3)
    strip.paste(bar, (int(left), bar_top))
    draw.text((margin, bar_top), f"{low:.2f}", fill="black", font=font)
    draw.text((right + draw.textlength(" ", font=font), bar_top), f"{high:.2f}", fill="black", font=font)
    draw.text((margin, bar_top + bar_height + margin), f"cool = least, warm = most evidence for {class_name}",
              fill="black", font=font)
    if warning:
        y = bar_top + 2 * (bar_height + margin)
        words, line = warning.split(), ""
        for word in words:  # wrap the warning into the width
            if line and draw.textlength(f"{line} {word}", font=font) > width - 2 * margin:
                draw.text((margin, y), line, fill=(180, 0, 0), font=font)
                y, line = y + size + margin, word
            else:
                line = f"{line} {word}".strip()
        draw.text((margin, y), line, fill=(180, 0, 0), font=font)
    combined = Image.new("RGB", (width, picture.height + strip.height), "white")
    combined.paste(picture.convert("RGB"), (0, 0))
    combined.paste(strip, (0, picture.height))
    return combined


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


def explain_image(model: RetrainedModel, weights: np.ndarray, biases: np.ndarray, image: Path | Image.Image,
                  output: Path, class_index: int | None = None, name: str | None = None) -> dict:
    """Write the heat map (with its legend) for one image; return the class, its score, logit, each layer's map and
    their means (which add up to logit - bias), and the numbers of each warning the graph can give (the
    out-of-distribution distance, the population distance).

    image: a file, or an image already in memory (images.to_image), called `name` in the result."""
    maps = feature_maps(model)
    distances = [output for output, key in (("ood_distance", "ood_threshold"),
                                            ("population_distance", "population_threshold")) if key in model.metadata]
    x = model_input(model, image)[None]  # (1, 3, H, W)
    outputs = [model.metadata["final_tensor_name"], "final_logits", *maps.values()]
    values = model.session.run(outputs + distances, {model.metadata["input_name"]: x})
    probabilities, logits, spatial = values[0], values[1], values[2:2 + len(maps)]
    found = dict(zip(distances, values[2 + len(maps):]))
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
    result = {"image": name or str(image), "heat_map": str(output), "label": model.labels[class_index],
              "score": float(probabilities[0, class_index]), "logit": float(logits[0, class_index]),
              "bias": float(biases[class_index]), "cam_mean": float(sum(cam.mean() for cam in cams.values())),
              "cam_means": {layer: float(cam.mean()) for layer, cam in cams.items()},
              "cams": {layer: cam.tolist() for layer, cam in cams.items()}}
    if len(cams) == 1:
        result["cam"] = next(iter(cams.values())).tolist()
    warnings = []  # what the legend says under the picture, and explain under the image's lines
    if "ood_distance" in found:
        result["ood_distance"] = float(found["ood_distance"][0])
        result["ood_threshold"] = float(model.metadata["ood_threshold"])
        result["out_of_distribution"] = result["ood_distance"] > result["ood_threshold"]
        if result["out_of_distribution"]:
            result["warning"] = OOD_WARNING.format(distance=result["ood_distance"], threshold=result["ood_threshold"])
            warnings.append(result["warning"])
    if "population_distance" in found:
        result["population_distance"] = float(found["population_distance"][0])
        result["population_threshold"] = float(model.metadata["population_threshold"])
        result["other_population"] = result["population_distance"] > result["population_threshold"]
        if result["other_population"]:
            result["population_warning"] = population_warning(result["population_distance"],
                                                              result["population_threshold"])
            warnings.append(result["population_warning"])
    heat = added_maps(list(cams.values()), x.shape[-1])
    picture = image.copy() if isinstance(image, Image.Image) else read_image(image)
    picture.thumbnail((1024, 1024))  # a heat map does not need every pixel of a 4000x5000 X-ray
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = with_legend(overlay(picture, heat), result["label"], result["score"], float(heat.min()),
                          float(heat.max()), " ".join(warnings) or None)
    picture.save(output)
    return result


def heat_map_targets(paths: list[Path | Image.Image], output: Path) -> list[Path]:
    """Where each heat map goes. An --output ending in .png/.jpg/.jpeg is a file: exactly one image may go there.
    Anything else is a folder: each image gets <folder>/<image name>.cam.png. Checked before any image is read."""
    output = Path(output)
    if output.suffix.lower() in HEAT_MAP_SUFFIXES:
        if len(paths) != 1:
            raise ValueError(f"--output {output} is a file name, but {len(paths)} images were given; pass a folder "
                             f"(e.g. --output {output.with_suffix('')}) for several images, or one image")
        check_writable(output, "--output", is_folder=False)
        return [output]
    check_writable(output, "--output", is_folder=True)
    return [output / (f"image_{index}.cam.png" if isinstance(path, Image.Image) else f"{Path(path).stem}.cam.png")
            for index, path in enumerate(paths)]


def explain_images(graph: Path, paths: list[Path | Image.Image], output: Path, labels_file: Path | None = None,
                   class_name: str | None = None, device: str = "auto",
                   log: Callable[[str], None] = print) -> list[dict]:
    """Heat maps for the predicted class, or for `class_name` (explain --class_name); see heat_map_targets for
    where they go. Each image's lines: the class, score and file; the identity mean(map) = logit - bias; and the
    out-of-distribution warning of `label` for an image unlike the training images. paths: files, or images in memory
    (images.to_image), called "image <index>"."""
    targets = heat_map_targets(paths, output)
    model = load_retrained(graph, labels_file, device, log)
    weights, biases = final_weights(Path(graph))
    class_index = None
    if class_name is not None:
        if class_name not in model.labels:
            raise ValueError(f"class_name {class_name!r} is not one of the graph's labels {model.labels}")
        class_index = model.labels.index(class_name)
    results = []
    for index, (image, target) in enumerate(zip(paths, targets)):
        name = image_name(image, index)
        image = image if isinstance(image, Image.Image) else Path(image)
        result = explain_image(model, weights, biases, image, target, class_index, name)
        log(f"{name}: {result['label']} (score = {result['score']:.5f}); heat map {target}")
        means = result["cam_means"]
        terms = "" if len(means) == 1 else " + ".join(
            f"{mean:.5f} ({layer}, {len(result['cams'][layer])}x{len(result['cams'][layer][0])})"
            for layer, mean in means.items()) + " = "
        what = "mean of the map" if len(means) == 1 else "sum of the maps' means"
        log(f"{what} = {terms}{result['cam_mean']:.5f} = logit - bias = {result['logit'] - result['bias']:.5f}")
        for key in ("warning", "population_warning"):
            if result.get(key):
                log(result[key])
        results.append(result)
    return results
