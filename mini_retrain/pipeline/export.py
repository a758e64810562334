"""Write the retrained model as ONE self-contained ONNX file: backbone + final layer + softmax (+ the two distances).

retrain.py wrote a frozen TensorFlow graph whose output `final_result` gave the class probabilities; label_image read
it. We do the same with ONNX. To the backbone graph we add:

    final_input   = the pooled --bottleneck_layers side by side  # pool_3 itself by default; else a Concat
    final_logits  = final_input @ final_weights + final_biases   # (N, D) @ (D, C) + (C,)
    final_result  = softmax(final_logits)                          # the name is --final_tensor_name
    ood_distance  = min_c sqrt((r - mu_c)^T P (r - mu_c)),  r = sign(pool_3) sqrt(|pool_3|)   # with an OOD model (ood.py)
    population_distance = sqrt(z^T P z),  z = (a - mu) V,  a = an earlier block's average      # population.py

Intermediate graphs (retrain --intermediate_store_frequency) are the final layer alone, `build_final_layer_model`:
bottleneck in, final_result out, a few KB instead of the backbone's 84 MB each time; `attach_backbone` makes a full graph
of one (for pool_3; a graph of other layers is rebuilt with retrain). The backbone's outputs stay (pool_3, mixed_10,
every `<block>/avg`), for the OOD check and for class activation maps; the feature map of each chosen layer becomes an
output too (`mixed_8` for layer mixed_8), so `explain` can split every logit over the grids. The class labels, the
layers, the thresholds, retrain's own test result (`internal_test`) and provenance go in the model's metadata, so
`label` can check that a labels file belongs to the graph and `evaluate` can compare a new folder with the internal
test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mini_retrain import __version__
from mini_retrain.pipeline.backbone import DEFAULT_LAYER, Backbone, layer_outputs, layer_sizes, offered_layers
from mini_retrain.paths import write_bytes_atomically

MARKER = "mini_retrain"  # metadata key that says "this graph was written by mini_retrain"
FINAL_LAYER_MARKER = "mini_retrain_final_layer"  # ... and "this is a final layer alone" (intermediate graphs)


def build_retrained_model(
    backbone: Backbone,
    weights: np.ndarray,
    biases: np.ndarray,
    labels: list[str],
    final_tensor_name: str = "final_result",
    ood: Any | None = None,
    fast_decode: bool = False,
    internal_test: dict | None = None,
    layers: tuple[str, ...] | None = None,
    population: Any | None = None,
):
    """The backbone graph with the final layer appended, as an onnx.ModelProto.

    layers: the pooled backbone layers the final layer reads, side by side (retrain --bottleneck_layers; default the
    bottleneck, pool_3); weights has one row per number of them. ood: evaluation.ood.OODModel of the bottleneck
    (pool_3). population: evaluation.population.PopulationModel of its own layer. fast_decode says how the training
    images were decoded (retrain --fast_decode); it goes into the metadata so that `label` and `explain` prepare new
    images the same way. internal_test is retrain's own test result, {n, correct, accuracy, ci}, kept as JSON in the
    metadata so that `evaluate` can compare a new folder with it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sidecar = backbone.sidecar
    layers = tuple(layers or (DEFAULT_LAYER,))
    pooled = layer_outputs(sidecar, layers, "--bottleneck_layers")  # the graph outputs holding the averages
    weights = np.asarray(weights, np.float32)  # (D, C)
    biases = np.asarray(biases, np.float32)  # (C,)
    if weights.shape != (sum(layer_sizes(sidecar, layers)), len(labels)) or biases.shape != (len(labels),):
        raise ValueError(f"final layer {weights.shape}/{biases.shape} does not fit {len(labels)} labels and layers "
                         f"{','.join(layers)}")
    model = onnx.load(str(backbone.path))
    graph = model.graph
    taken = {n.name for n in graph.initializer} | {o for n in graph.node for o in n.output}
    if final_tensor_name in taken:
        raise ValueError(f"final_tensor_name {final_tensor_name!r} is already a name inside the backbone; pick another")

    final_input = pooled[0]
    if len(pooled) > 1:  # (N, D1), (N, D2), ... -> (N, D1 + D2 + ...), in the order of `layers`
        final_input = "final_input"
        graph.node.append(helper.make_node("Concat", pooled, [final_input], name=final_input, axis=1))
    graph.initializer.extend([numpy_helper.from_array(weights, "final_weights"), numpy_helper.from_array(biases, "final_biases")])
    graph.node.extend([
        helper.make_node("MatMul", [final_input, "final_weights"], ["final_matmul"], name="final_matmul"),
        helper.make_node("Add", ["final_matmul", "final_biases"], ["final_logits"], name="final_logits"),
        helper.make_node("Softmax", ["final_logits"], [final_tensor_name], name=final_tensor_name, axis=-1),
    ])
    classes = len(labels)
    graph.output.extend([
        helper.make_tensor_value_info(final_tensor_name, TensorProto.FLOAT, ["batch", classes]),
        helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["batch", classes]),
    ])
    feature_maps = _expose_feature_maps(graph, sidecar, layers)
    metadata = {
        MARKER: __version__,
        "labels": json.dumps(labels),
        "final_tensor_name": final_tensor_name,
        "input_name": sidecar["input_name"],
        "input_size": json.dumps(sidecar["input_size"]),
        "input_mean": str(sidecar["input_mean"]),
        "input_std": str(sidecar["input_std"]),
        "bottleneck_output": final_input,
        "bottleneck_layers": json.dumps(list(layers)),
        "feature_maps": json.dumps(feature_maps),
        "spatial_output": sidecar.get("spatial_output", ""),
        "backbone_sha256": sidecar.get("onnx_sha256", ""),
        "precision": backbone.sidecar.get("precision", "fp32"),  # the backbone's arithmetic: fp32, or int8
        "fast_decode": "1" if fast_decode else "0",
    }
    if ood is not None:
        _append_ood_distance(graph, layer_outputs(sidecar, (DEFAULT_LAYER,))[0], ood)
        metadata["ood_threshold"] = repr(float(ood.threshold))
    if internal_test is not None:
        metadata["internal_test"] = json.dumps(internal_test)
    if population is not None:
        _append_population_distance(graph, layer_outputs(sidecar, (population.layer,))[0], population)
        metadata["population_threshold"] = repr(float(population.threshold))
        metadata["population_layer"] = population.layer
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def build_final_layer_model(backbone: Backbone, weights: np.ndarray, biases: np.ndarray, labels: list[str],
                            final_tensor_name: str = "final_result", fast_decode: bool = False, step: int = 0,
                            layers: tuple[str, ...] | None = None):
    """The final layer alone as a small ONNX graph, for retrain's intermediate graphs:

        final_result = softmax(bottleneck @ final_weights + final_biases)      # (N, D) @ (D, C) + (C,)

    Its input is the bottleneck, not the image: copying the 84 MB backbone into every intermediate graph would only
    repeat the same bytes. The metadata names the backbone by its SHA-256 (`backbone_sha256`); `attach_backbone`
    puts the two together into a graph `label` and `explain` can read. layers: as in build_retrained_model; the
    input is the pooled output of the one layer, else `final_input`, the layers side by side (metadata
    `bottleneck_layers`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = tuple(layers or (DEFAULT_LAYER,))
    weights = np.asarray(weights, np.float32)  # (D, C)
    biases = np.asarray(biases, np.float32)  # (C,)
    pooled = layer_outputs(backbone.sidecar, layers, "--bottleneck_layers")
    bottleneck = pooled[0] if len(pooled) == 1 else "final_input"
    size, classes = weights.shape
    if size != sum(layer_sizes(backbone.sidecar, layers)):
        raise ValueError(f"final layer {weights.shape} does not fit layers {','.join(layers)}")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [bottleneck, "final_weights"], ["final_matmul"], name="final_matmul"),
         helper.make_node("Add", ["final_matmul", "final_biases"], ["final_logits"], name="final_logits"),
         helper.make_node("Softmax", ["final_logits"], [final_tensor_name], name=final_tensor_name, axis=-1)],
        "final_layer",
        [helper.make_tensor_value_info(bottleneck, TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info(final_tensor_name, TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("final_logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weights, "final_weights"), numpy_helper.from_array(biases, "final_biases")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mini_retrain")
    model.ir_version = 8
    metadata = {FINAL_LAYER_MARKER: __version__, "labels": json.dumps(labels), "final_tensor_name": final_tensor_name,
                "bottleneck_output": bottleneck, "bottleneck_layers": ",".join(layers),
                "backbone_sha256": backbone.sidecar.get("onnx_sha256", ""),
                "fast_decode": "1" if fast_decode else "0", "step": str(step)}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def attach_backbone(final_layer_graph: str | Path, backbone: Backbone):
    """An intermediate graph (build_final_layer_model) + its backbone -> the full graph retrain would have written
    at that step (without the out-of-distribution distance, which is fitted at the end)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(final_layer_graph))
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if FINAL_LAYER_MARKER not in metadata:
        raise ValueError(f"{final_layer_graph}: not an intermediate graph of `mini_retrain retrain` "
                         f"(no {FINAL_LAYER_MARKER} metadata)")
    wanted, have = metadata.get("backbone_sha256", ""), backbone.sidecar.get("onnx_sha256", "")
    if wanted and have and wanted != have:
        raise ValueError(f"{final_layer_graph}: trained on the backbone with SHA-256 {wanted[:12]}..., not on "
                         f"{backbone.path} ({have[:12]}...); pass the backbone it was trained on")
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return build_retrained_model(backbone, tensors["final_weights"], tensors["final_biases"],
                                 json.loads(metadata["labels"]), metadata["final_tensor_name"],
                                 fast_decode=metadata.get("fast_decode") == "1",
                                 layers=tuple(metadata.get("bottleneck_layers", DEFAULT_LAYER).split(",")))


def _expose_feature_maps(graph, sidecar: dict[str, Any], layers: tuple[str, ...]) -> dict[str, str]:
    """Make the feature map behind each pooled layer a graph output (for `explain`); return {layer: output name}.

    Layers without a known map (a backbone whose sidecar lists none) are left out: explain then says so."""
    from onnx import TensorProto, helper

    table = offered_layers(sidecar)
    outputs = {output.name for output in graph.output}
    produced = {name for node in graph.node for name in node.output}
    maps: dict[str, str] = {}
    for layer in layers:
        entry = table[layer]
        if entry.get("feature_map") not in produced | outputs:
            continue
        name = entry["feature_map"]
        if name not in outputs:
            shape = ["batch", *entry["feature_shape"]] if entry.get("feature_shape") else None
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            outputs.add(name)
        maps[layer] = name
    return maps


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


def _append_population_distance(graph, pooled: str, population: Any) -> None:
    """population_distance (N,): population.population_distance written as graph nodes (any ONNX runtime gets it)."""
    from onnx import TensorProto, helper, numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(population.mean, np.float32), "population_mean"),  # (d,)
        numpy_helper.from_array(np.asarray(population.components, np.float32), "population_components"),  # (d, k)
        numpy_helper.from_array(np.asarray(population.precision, np.float32), "population_precision"),  # (k, k)
        numpy_helper.from_array(np.array([1], np.int64), "population_axis_1"),
    ])
    graph.node.extend([
        helper.make_node("Sub", [pooled, "population_mean"], ["population_centred"]),  # (N, d)
        helper.make_node("MatMul", ["population_centred", "population_components"], ["population_z"]),  # (N, k)
        helper.make_node("MatMul", ["population_z", "population_precision"], ["population_weighted"]),  # (N, k)
        helper.make_node("Mul", ["population_z", "population_weighted"], ["population_terms"]),
        helper.make_node("ReduceSum", ["population_terms", "population_axis_1"], ["population_squared"],
                         keepdims=0),  # (N,)
        helper.make_node("Relu", ["population_squared"], ["population_nonnegative"]),  # rounding can give -1e-7
        helper.make_node("Sqrt", ["population_nonnegative"], ["population_distance"]),
    ])
    graph.output.append(helper.make_tensor_value_info("population_distance", TensorProto.FLOAT, ["batch"]))


def write_retrained_graph(path: str | Path, model) -> Path:
    """Serialise and write atomically (a crash never leaves half a graph)."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: output_graph must end in .onnx")
    write_bytes_atomically(path, model.SerializeToString())
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
