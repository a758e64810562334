"""`mini_retrain recalibrate`: refit a retrained graph's logits to a small labelled sample of a new site.

    SITE/normal/*.png, SITE/pneumonia/*.png      class subfolders named like the graph's labels, >= 5 images each
      -> z = the graph's final_logits on every image                   (the graph itself runs: backbone + layer)
      -> a, c = core.recalibrate.fit_recalibration(z, y)               z' = a z + c, by Newton's method
      -> a copy of the graph with the final layer (W a, b a + c)       so that its final_logits ARE z' = a z + c

Folding a and c into the layer, instead of adding nodes after it, keeps the new graph an ordinary retrained graph:
`final_result` = softmax(z'), `final_logits` = z' (the recalibrated logits), and `label`, `explain` and the OOD distance
work unchanged. The class activation map stays exact, because it is computed with the graph's own final_weights
and final_biases: mean(map_c) = a_c (w_c . pool_3) = z'_c - (a_c b_c + c_c) = logit - bias (evaluation/cam.py).

The metadata key `recalibration` (JSON) records the sample (each file with its SHA-1 and label, the count per class),
the fitted a and c, and the sample's accuracy, expected calibration error and cross-entropy before and after.
"Before" is a fair estimate of the graph at the new site (it had never seen those images); "after" is optimistic,
as the fit used them, and `calibration_overlap` lets an evaluation notice when it is scoring calibration images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from mini_retrain import __version__
from mini_retrain.core.recalibrate import L2, check_sample, fit_recalibration, recalibrated_logits
from mini_retrain.core.softmax_layer import cross_entropy, softmax
from mini_retrain.evaluation.metrics import evaluate
from mini_retrain.paths import write_bytes_atomically
from mini_retrain.pipeline.images import file_sha1
from mini_retrain.pipeline.image_lists import find_images, label_for_folder
from mini_retrain.pipeline.retrained_graph import RetrainedModel, load_retrained, model_input
from mini_retrain.settings import check_writable

METADATA_KEY = "recalibration"
BATCH_SIZE = 16  # images per run of the graph


def site_images(image_dir: Path, labels: list[str]) -> tuple[list[Path], np.ndarray]:
    """(image paths, class index of each (n,)) of the calibration sample; a ValueError before any work if a subfolder
    is no label of the graph or a class has fewer than MIN_IMAGES_PER_CLASS images."""
    image_lists, _ = find_images(image_dir)  # {label: [relative paths]}; retrain's "< 20 images" warning is not ours
    for folder in sorted(p for p in Path(image_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if label_for_folder(folder.name) not in labels:
            raise ValueError(f"{folder}: '{label_for_folder(folder.name)}' is not one of the graph's labels {labels}; "
                             "name each subfolder of --image_dir after one of them, or remove it")
    paths = [Path(image_dir) / relative for label in labels for relative in image_lists.get(label, [])]
    classes = np.array([labels.index(label) for label in labels for _ in image_lists.get(label, [])], dtype=np.int64)
    check_sample(classes, len(labels), labels)
    return paths, classes


def graph_logits(model: RetrainedModel, paths: list[Path], log: Callable[[str], None] = print) -> np.ndarray:
    """The graph's final_logits on each image, (n, classes) float64; an unreadable image stops with its name."""
    rows = []
    for start in range(0, len(paths), BATCH_SIZE):
        x = np.stack([model_input(model, path) for path in paths[start:start + BATCH_SIZE]])  # (b, 3, H, W)
        rows.append(model.session.run(["final_logits"], {model.metadata["input_name"]: x})[0])  # (b, classes)
        log(f"Logits: {min(start + BATCH_SIZE, len(paths))}/{len(paths)} images")
    return np.concatenate(rows).astype(np.float64)


def sample_figures(logits: np.ndarray, classes: np.ndarray, labels: list[str]) -> dict:
    """Accuracy (with its Wilson interval), expected calibration error and mean cross-entropy of softmax(logits)."""
    evaluation = evaluate(softmax(logits), classes, labels)
    accuracy = evaluation["accuracy"]
    return {"accuracy": accuracy["estimate"], "correct": accuracy["successes"], "n": accuracy["n"],
            "accuracy_ci": accuracy["ci"], "ece": evaluation["calibration"]["ece"],
            "cross_entropy": cross_entropy(logits, classes)}


def recalibrated_model(graph: Path, scale: np.ndarray, bias: np.ndarray, record: dict):
    """A copy of the graph (onnx.ModelProto) whose final layer is (W a, b a + c), with `record` in its metadata:

        z' = x (W a) + (b a + c) = a (x W + b) + c        the columns of W and the entries of b scaled class by class
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    tensors = {t.name: t for t in model.graph.initializer if t.name in ("final_weights", "final_biases")}
    if len(tensors) != 2:
        raise ValueError(f"{graph}: no final_weights/final_biases inside; pass a graph written by `mini_retrain retrain`")
    weights = numpy_helper.to_array(tensors["final_weights"]).astype(np.float64)  # (D, K)
    biases = numpy_helper.to_array(tensors["final_biases"]).astype(np.float64)  # (K,)
    new_weights = (weights * scale).astype(np.float32)  # (D, K) * (K,): column k times a_k
    new_biases = recalibrated_logits(biases, scale, bias).astype(np.float32)  # (K,) a b + c
    tensors["final_weights"].CopyFrom(numpy_helper.from_array(new_weights, "final_weights"))
    tensors["final_biases"].CopyFrom(numpy_helper.from_array(new_biases, "final_biases"))
    metadata = {entry.key: entry for entry in model.metadata_props}
    if METADATA_KEY in metadata:  # a graph recalibrated before: keep that record inside the new one
        record = {**record, "previous": json.loads(metadata[METADATA_KEY].value)}
        metadata[METADATA_KEY].value = json.dumps(record)
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(record)
    onnx.checker.check_model(model)
    return model


def _check_output(graph: Path, output: Path) -> Path:
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"{output}: --output must end in .onnx")
    if output.resolve() == Path(graph).resolve():
        raise ValueError(f"{output}: --output is the --graph itself; write the recalibrated graph to a new file")
    check_writable(output, "--output", is_folder=False)
    return output


def recalibrate(graph: Path, image_dir: Path, output: Path, labels_file: Path | None = None, device: str = "auto",
                l2: float = L2, log: Callable[[str], None] = print) -> dict:
    """`mini_retrain recalibrate`: fit a, c on the sample in image_dir, write the recalibrated graph; return the record."""
    output = _check_output(graph, output)
    model = load_retrained(graph, labels_file, device)
    labels = model.labels
    paths, classes = site_images(Path(image_dir), labels)  # all checks before the graph runs
    counts = np.bincount(classes, minlength=len(labels))
    log(f"Calibration sample: {len(paths)} images in {image_dir}: "
        + ", ".join(f"{label} {count}" for label, count in zip(labels, counts))
        + (" (20 or more of each class is better)" if counts.min() < 20 else ""))

    logits = graph_logits(model, paths, log)  # (n, K)
    fitted = fit_recalibration(logits, classes, labels, l2=l2)
    if not fitted.converged:
        log(f"WARNING: the fit did not converge in {fitted.steps} Newton steps; the numbers below may be off")
    before = sample_figures(logits, classes, labels)
    after = sample_figures(recalibrated_logits(logits, fitted.scale, fitted.bias), classes, labels)
    record = {
        "mini_retrain": __version__,
        "formula": "final_logits = scale * z + bias, z the logits of the source graph; folded into final_weights "
                   "(times scale) and final_biases (times scale, plus bias)",
        "scale": fitted.scale.tolist(), "bias": fitted.bias.tolist(), "l2": l2,
        "newton_steps": fitted.steps, "converged": fitted.converged,
        "source_graph": str(graph), "source_graph_sha1": file_sha1(graph),
        "sample": {"image_dir": str(image_dir),
                   "per_class": {label: int(count) for label, count in zip(labels, counts)},
                   "images": [{"file": path.relative_to(image_dir).as_posix(), "label": labels[c],
                               "sha1": file_sha1(path)} for path, c in zip(paths, classes)]},
        "before": before, "after": after,
    }
    new_graph = recalibrated_model(Path(graph), fitted.scale, fitted.bias, record)
    write_bytes_atomically(output, new_graph.SerializeToString())

    shared = bool(np.all(fitted.scale == fitted.scale[0]))
    scales = (f"{fitted.scale[0]:.4f} (temperature {1 / fitted.scale[0]:.4f})" if shared
              else ", ".join(f"{label} {a:.4f}" for label, a in zip(labels, fitted.scale)))
    log(f"Fitted z' = a z + c in {fitted.steps} Newton steps: scale a = {scales}; bias c = "
        + ", ".join(f"{label} {c:+.4f}" for label, c in zip(labels, fitted.bias)))
    low, high = before["accuracy_ci"]
    log("On the calibration sample, before -> after: 'before' is a fair estimate at this site (if the graph was not "
        "trained on these images), 'after' is optimistic (the fit used them):")
    log(f"  accuracy       {100 * before['accuracy']:5.1f}% -> {100 * after['accuracy']:5.1f}% "
        f"({before['correct']}/{before['n']} -> {after['correct']}/{after['n']}; before: 95% CI "
        f"{100 * low:.1f}-{100 * high:.1f}%)")
    log(f"  ECE            {before['ece']:.3f} -> {after['ece']:.3f}")
    log(f"  cross-entropy  {before['cross_entropy']:.3f} -> {after['cross_entropy']:.3f}")
    log(f"Wrote {output} (its final_logits are the recalibrated logits)")
    return record


def calibration_keys(metadata: dict[str, str]) -> set[str]:
    """SHA-1 of every image a graph was recalibrated on (all recalibrations, if it was done twice); empty if never."""
    record = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    keys: set[str] = set()
    while record is not None:
        keys.update(image["sha1"] for image in record["sample"]["images"])
        record = record.get("previous")
    return keys


def calibration_overlap(metadata: dict[str, str], keys: Iterable[str]) -> int:
    """How many of the images with these SHA-1 keys (one key per evaluated image) the graph was recalibrated on."""
    calibrated = calibration_keys(metadata)
    return sum(key in calibrated for key in keys)


def calibration_overlap_warning(metadata: dict[str, str], keys: list[str]) -> str | None:
    """The line an evaluation prints when it scores images of the calibration sample; None when it scores none."""
    overlap = calibration_overlap(metadata, keys)
    if not overlap:
        return None
    return (f"WARNING: {overlap} of these {len(keys)} images were in the graph's calibration sample (recalibrate fitted "
            "its scale and bias on them), so the figures are optimistic for them; evaluate on other images")
