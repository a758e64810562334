"""Write the retrained model as ONE self-contained ONNX file: backbone + final layer + softmax (+ the OOD distance).

retrain.py wrote a frozen TensorFlow graph whose output `final_result` gave the class probabilities; label_image read
it. We do the same with ONNX. To the backbone graph we add:

    final_logits  = pool_3 @ final_weights + final_biases          # (N, 2048) @ (2048, C) + (C,)
    final_result  = softmax(final_logits)                          # the name is --final_tensor_name
    ood_distance  = min_c sqrt((r - mu_c)^T P (r - mu_c)),  r = sign(pool_3) sqrt(|pool_3|)   # with an OOD model (ood.py)

The outputs `pool_3` and `mixed_10` stay, for the OOD check and for class activation maps. The class labels, the
OOD threshold and provenance go in the model's metadata, so `label` can check that a labels file belongs to the graph.

How the file is written without holding the backbone in memory: an ONNX file is one protobuf message, and protobuf
reads two messages written one after the other as ONE message, merged: the repeated fields of the second (nodes,
weights, outputs, metadata) are appended to those of the first. So the retrained graph is the backbone file's bytes,
copied as they are, followed by a small ModelProto holding only what we add. The 87 MB of Inception v3 weights (or
the int8 backbone's QuantizeLinear/DequantizeLinear graph) go from file to file and are never parsed into Python.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mini_retrain import __version__
from mini_retrain.pipeline.backbone import Backbone
from mini_retrain.paths import write_bytes_atomically, write_file_atomically

MARKER = "mini_retrain"  # metadata key that says "this graph was written by mini_retrain"
ADDED_NAMES = ("final_weights", "final_biases", "final_matmul", "final_logits")  # and every "ood_*" name


class RetrainedGraph(NamedTuple):
    """The retrained graph before it is written: the backbone file, and what is appended to it."""

    backbone_path: Path
    additions: Any  # onnx.ModelProto with only the added nodes, weights, outputs and metadata (no opset, no inputs)


def build_retrained_model(
    backbone: Backbone,
    weights: np.ndarray,
    biases: np.ndarray,
    labels: list[str],
    final_tensor_name: str = "final_result",
    ood: Any | None = None,
    fast_decode: bool = False,
) -> RetrainedGraph:
    """The final layer (and the OOD distance) to append to the backbone graph; write it with write_retrained_graph.

    fast_decode says how the training images were decoded (retrain --fast_decode); it goes into the metadata so that
    `label` and `explain` prepare new images the same way."""
    from onnx import ModelProto, TensorProto, helper, numpy_helper

    weights = np.asarray(weights, np.float32)  # (D, C)
    biases = np.asarray(biases, np.float32)  # (C,)
    if weights.shape != (backbone.sidecar["bottleneck_size"], len(labels)) or biases.shape != (len(labels),):
        raise ValueError(f"final layer {weights.shape}/{biases.shape} does not fit {len(labels)} labels")
    bottleneck = backbone.sidecar["bottleneck_output"]
    outputs = {bottleneck, backbone.sidecar.get("spatial_output")} | \
        {entry["output"] for entry in backbone.sidecar.get("layers", {}).values()}
    if final_tensor_name in outputs | set(ADDED_NAMES) or final_tensor_name.startswith("ood_"):
        raise ValueError(f"--final_tensor_name {final_tensor_name!r} is already a name inside the graph; pick another")

    model = ModelProto()  # only what is appended: write_retrained_graph puts it after the backbone's bytes
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(weights, "final_weights"), numpy_helper.from_array(biases, "final_biases")])
    graph.node.extend([
        helper.make_node("MatMul", [bottleneck, "final_weights"], ["final_matmul"], name="final_matmul"),
        helper.make_node("Add", ["final_matmul", "final_biases"], ["final_logits"], name="final_logits"),
        helper.make_node("Softmax", ["final_logits"], [final_tensor_name], name=final_tensor_name, axis=-1),
    ])
    classes = len(labels)
    graph.output.extend([
        helper.make_tensor_value_info(final_tensor_name, TensorProto.FLOAT, ["batch", classes]),
        helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["batch", classes]),
    ])
    metadata = {
        MARKER: __version__,
        "labels": json.dumps(labels),
        "final_tensor_name": final_tensor_name,
        "input_name": backbone.sidecar["input_name"],
        "input_size": json.dumps(backbone.sidecar["input_size"]),
        "input_mean": str(backbone.sidecar["input_mean"]),
        "input_std": str(backbone.sidecar["input_std"]),
        "bottleneck_output": bottleneck,
        "spatial_output": backbone.sidecar.get("spatial_output", ""),
        "backbone_sha256": backbone.sidecar.get("onnx_sha256", ""),
        "precision": backbone.sidecar.get("precision", "fp32"),
        "fast_decode": "1" if fast_decode else "0",
    }
    if ood is not None:
        _append_ood_distance(graph, bottleneck, ood)
        metadata["ood_threshold"] = repr(float(ood.threshold))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return RetrainedGraph(Path(backbone.path), model)


def _append_ood_distance(graph, bottleneck: str, ood: Any) -> None:
    """ood_distance (N,): ood.mahalanobis_distance written as graph nodes, so any ONNX runtime gets the warning."""
    from onnx import TensorProto, helper, numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(ood.means, np.float32), "ood_means"),  # (C, D)
        numpy_helper.from_array(np.asarray(ood.precision, np.float32), "ood_precision"),  # (D, D)
        numpy_helper.from_array(np.array([1], np.int64), "ood_axis_1"),
        numpy_helper.from_array(np.array([2], np.int64), "ood_axis_2"),
    ])
    graph.node.extend([
        # r(x) = sign(x) sqrt(|x|), ood.power_normalise
        helper.make_node("Abs", [bottleneck], ["ood_abs"]),
        helper.make_node("Sqrt", ["ood_abs"], ["ood_sqrt"]),
        helper.make_node("Sign", [bottleneck], ["ood_sign"]),
        helper.make_node("Mul", ["ood_sign", "ood_sqrt"], ["ood_r"]),  # (N, D)
        helper.make_node("Unsqueeze", ["ood_r", "ood_axis_1"], ["ood_x"]),  # (N, 1, D)
        helper.make_node("Sub", ["ood_x", "ood_means"], ["ood_diff"]),  # (N, C, D)
        helper.make_node("MatMul", ["ood_diff", "ood_precision"], ["ood_weighted"]),  # (N, C, D)
        helper.make_node("Mul", ["ood_diff", "ood_weighted"], ["ood_terms"]),
        helper.make_node("ReduceSum", ["ood_terms", "ood_axis_2"], ["ood_squared"], keepdims=0),  # (N, C)
        helper.make_node("ReduceMin", ["ood_squared"], ["ood_min_squared"], axes=[1], keepdims=0),  # (N,)
        helper.make_node("Relu", ["ood_min_squared"], ["ood_nonnegative"]),  # rounding can give -1e-7
        helper.make_node("Sqrt", ["ood_nonnegative"], ["ood_distance"]),
    ])
    graph.output.append(helper.make_tensor_value_info("ood_distance", TensorProto.FLOAT, ["batch"]))


def write_retrained_graph(path: str | Path, graph: RetrainedGraph) -> Path:
    """The backbone file's bytes, then the additions: one ONNX file, checked (onnx.checker reads it from disk),
    written atomically (a crash never leaves half a graph)."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: --output_graph must end in .onnx")

    def fill(file) -> None:
        with open(graph.backbone_path, "rb") as backbone:
            shutil.copyfileobj(backbone, file, 1 << 20)  # 1 MiB at a time
        file.write(graph.additions.SerializeToString())
        file.flush()
        try:
            onnx.checker.check_model(file.name)  # by path: the C++ checker reads the file, Python holds no copy
        except onnx.checker.ValidationError as error:
            reason = str(error).splitlines()[0]
            if "single static assignment" in reason:  # a name the additions use is taken inside the backbone
                name = next(e.value for e in graph.additions.metadata_props if e.key == "final_tensor_name")
                raise ValueError(f"--final_tensor_name {name!r} is already a name inside the backbone "
                                 f"({reason}); pick another") from None
            raise ValueError(f"{path}: the retrained graph is not valid ONNX ({reason})") from None

    write_file_atomically(path, fill)
    return path


def write_labels(path: str | Path, labels: list[str]) -> Path:
    """One label per line, in class-index order (retrain.py's output_labels.txt)."""
    path = Path(path)
    write_bytes_atomically(path, ("\n".join(labels) + "\n").encode())
    return path


def write_final_layer(path: str | Path, weights: np.ndarray, biases: np.ndarray, labels: list[str]) -> Path:
    """The trained numbers in a plain .npz (np.load(path, allow_pickle=False) reads it) for people who want to look."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, weights=np.asarray(weights, np.float32), biases=np.asarray(biases, np.float32),
             labels=np.array(labels, dtype=str))
    path = Path(path)
    write_bytes_atomically(path, buffer.getvalue())
    return path
