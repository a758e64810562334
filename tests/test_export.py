"""The exported graph: backbone + final layer + softmax + OOD distance, checked against NumPy on a tiny backbone."""

import numpy as np
import onnxruntime
import pytest

from mini_retrain.pipeline.backbone import load_backbone, run_backbone
from mini_retrain.pipeline.export import RetrainedGraph, build_retrained_model, write_labels, write_retrained_graph
from mini_retrain.pipeline.retrained_graph import load_retrained
from mini_retrain.evaluation.ood import fit_ood_model, mahalanobis_distance
from mini_retrain.core.softmax_layer import compute_logits, softmax


@pytest.fixture
def exported(tiny_backbone, tmp_path):
    backbone = load_backbone(tiny_backbone, device="cpu", verbose=False)
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, size=(12, 3, 299, 299)).astype(np.float32)
    bottlenecks = run_backbone(backbone, images)  # (12, 4)
    labels = np.arange(12) % 3
    weights, biases = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    ood = fit_ood_model(bottlenecks, labels, 3)
    model = build_retrained_model(backbone, weights, biases, ["a", "b", "c"], "final_result", ood)
    path = write_retrained_graph(tmp_path / "g.onnx", model)
    return path, images, bottlenecks, weights, biases, ood


def test_graph_outputs_equal_numpy(exported):
    path, images, bottlenecks, weights, biases, ood = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, logits, distance = session.run(["final_result", "final_logits", "ood_distance"], {"images": images})
    np.testing.assert_allclose(logits, compute_logits(bottlenecks, weights, biases), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(compute_logits(bottlenecks, weights, biases)), atol=1e-6)
    np.testing.assert_allclose(distance, mahalanobis_distance(ood, bottlenecks), rtol=1e-3, atol=1e-3)


def test_labels_and_threshold_travel_in_the_metadata(exported, tmp_path):
    path, *_, ood = exported
    labels_file = write_labels(tmp_path / "labels.txt", ["a", "b", "c"])
    model = load_retrained(path, labels_file, "cpu")
    assert model.labels == ["a", "b", "c"]
    assert float(model.metadata["ood_threshold"]) == pytest.approx(ood.threshold)


@pytest.mark.parametrize("name", ["pool_3", "conv", "w", "final_logits"])
def test_final_tensor_name_must_not_clash(tiny_backbone, tmp_path, name):
    """A graph output or added name is refused at once; a name inside the backbone (the node output 'conv', the
    weight 'w') by the checker, before anything is written."""
    backbone = load_backbone(tiny_backbone, device="cpu", verbose=False)
    with pytest.raises(ValueError, match=f"--final_tensor_name '{name}' is already a name"):
        write_retrained_graph(tmp_path / "g.onnx", build_retrained_model(
            backbone, np.zeros((4, 2)), np.zeros(2), ["a", "b"], final_tensor_name=name))
    assert not list(tmp_path.glob("*g.onnx*"))


def test_output_graph_must_be_onnx(tiny_backbone, tmp_path):
    backbone = load_backbone(tiny_backbone, device="cpu", verbose=False)
    graph = build_retrained_model(backbone, np.zeros((4, 2)), np.zeros(2), ["a", "b"])
    with pytest.raises(ValueError, match=r"\.onnx"):
        write_retrained_graph(tmp_path / "g.pb", graph)


def test_the_backbone_is_copied_byte_for_byte_and_the_additions_follow(exported, tiny_backbone):
    """The export streams the backbone file (never parsed into Python) and appends one small message; onnx reads
    the two as one model with every backbone node and every added one."""
    import onnx

    path, *_ = exported
    backbone_bytes, graph_bytes = tiny_backbone.read_bytes(), path.read_bytes()
    assert graph_bytes[:len(backbone_bytes)] == backbone_bytes
    model = onnx.load(str(path))
    backbone = onnx.load(str(tiny_backbone))
    assert [n.name for n in model.graph.node][:len(backbone.graph.node)] == [n.name for n in backbone.graph.node]
    assert {"final_result", "final_logits", "ood_distance"} <= {o.name for o in model.graph.output}
    assert model.opset_import == backbone.opset_import and model.ir_version == backbone.ir_version
