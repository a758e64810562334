"""The int8 backbone (build/quantize.py, pipeline/calibration.py, --precision int8), on the real Inception v3 where it
matters (accuracy, determinism, the exported graph) and on tiny graphs for the plumbing."""

import contextlib
import hashlib
import io
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from mini_retrain.build.quantize import fold_batch_norms, int8_path, is_current, quantize_backbone
from mini_retrain.cli import main
from mini_retrain.pipeline.backbone import load_backbone, run_backbone
from mini_retrain.pipeline.bottlenecks import get_bottlenecks, store_folder
from mini_retrain.pipeline.calibration import calibration_batches, calibration_files, ensure_int8_backbone
from tests.conftest import DEMO_DATA

XRAYS = DEMO_DATA / "pneumonia-demo"
# Smallest cosine between int8 and float32 over the 16 bundled X-rays, per pooled layer, measured with this file's
# build on an AMD EPYC (AVX2): see benchmarks/README.md, int8. The bound leaves a margin below each.
COSINE_BOUND = 0.97


@pytest.fixture(scope="session")
def int8_backbone_path(real_backbone_path):
    """The int8 file quantised from the real backbone (once per cache; about a minute on 2 cores)."""
    return ensure_int8_backbone(real_backbone_path)


@pytest.fixture(scope="session")
def int8_backbone(int8_backbone_path):
    return load_backbone(int8_backbone_path, device="cpu", log=lambda line: None, precision="int8")


def test_int8_file_builds_deterministically_from_the_float32_one(int8_backbone_path, real_backbone_path, tmp_path):
    """Quantising the same float32 file on the same bundled X-rays again gives the same bytes."""
    float_copy = tmp_path / "float.onnx"
    shutil.copyfile(real_backbone_path, float_copy)
    shutil.copyfile(real_backbone_path.with_suffix(".json"), float_copy.with_suffix(".json"))
    again = quantize_backbone(float_copy, calibration_batches, log=lambda line: None)
    assert again == tmp_path / "float.int8.onnx"
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(int8_backbone_path.read_bytes()).digest()
    sidecar = json.loads(again.with_suffix(".json").read_text())
    float_sidecar = json.loads(real_backbone_path.with_suffix(".json").read_text())
    assert sidecar["precision"] == "int8" and float_sidecar.get("precision", "fp32") == "fp32"
    assert sidecar["onnx_sha256"] == hashlib.sha256(again.read_bytes()).hexdigest()
    assert sidecar["float_onnx_sha256"] == float_sidecar["onnx_sha256"]
    assert sidecar["layers"] == float_sidecar["layers"]  # every pooled layer is still there, same sizes


def test_int8_graph_multiplies_in_integers_and_keeps_every_output(int8_backbone_path, real_backbone_path):
    model = onnx.load(str(int8_backbone_path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    kernels = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) == 4}  # (out, in, kh, kw)
    assert len(kernels) == 94 and sum(kind == TensorProto.INT8 for kind in kernels.values()) == 93
    assert kernels["conv/weight"] == TensorProto.FLOAT  # the first convolution stays float (build/quantize.OPTIONS)
    float_outputs = [(o.name, o.type.tensor_type.elem_type) for o in onnx.load(str(real_backbone_path)).graph.output]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == float_outputs  # all float32


def test_int8_bottlenecks_are_close_to_float32_on_the_bundled_xrays(int8_backbone, real_backbone):
    x = np.concatenate(calibration_batches(real_backbone.sidecar, mirrored=False))  # (16, 3, 299, 299)
    for layer in real_backbone.sidecar["layers"]:
        exact, int8 = run_backbone(real_backbone, x, layers=(layer,)), run_backbone(int8_backbone, x, layers=(layer,))
        cosine = np.sum(exact * int8, 1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(int8, axis=1)  # (16,)
        assert cosine.min() > COSINE_BOUND, layer
        assert not np.allclose(exact, int8, atol=1e-3)  # it really is another computation


def test_int8_pool_3_is_exactly_the_average_of_its_mixed_10(int8_backbone):
    """The pools that make the outputs stay float, so a class activation map of an int8 graph splits its logit
    exactly (cam.py's identity mean(map) = logit - bias)."""
    x = np.concatenate(calibration_batches(int8_backbone.sidecar, mirrored=False)[:1])  # (8, 3, 299, 299)
    pool_3, mixed_10 = run_backbone(int8_backbone, x, spatial=True)
    np.testing.assert_allclose(pool_3, mixed_10.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def int8_retrained(tmp_path_factory, real_backbone_path, int8_backbone_path):
    """retrain --precision int8 on the 16 demo X-rays; returns the folder."""
    folder = tmp_path_factory.mktemp("int8")
    image_dir = folder / "images"
    for source in XRAYS.glob("*/*.jpeg"):
        (image_dir / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image_dir / source.parent.name / source.name)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["retrain", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path),
                     "--precision", "int8", "--bottleneck_dir", str(folder / "bottlenecks"),
                     "--output_graph", str(folder / "graph.onnx"), "--output_labels", str(folder / "labels.txt"),
                     "--how_many_training_steps", "40", "--testing_percentage", "25",
                     "--validation_percentage", "25", "--device", "cpu"]) == 0
    return folder


def test_graph_exported_at_int8_labels_as_its_own_bottlenecks_predict(int8_retrained, int8_backbone, capsys):
    """label runs the exported graph (self-contained: the int8 backbone inside); its scores are the softmax layer
    applied to the int8 bottlenecks of the same files."""
    from mini_retrain.core.softmax_layer import compute_logits, softmax

    folder = int8_retrained
    model = onnx.load(str(folder / "graph.onnx"))
    assert "QuantizeLinear" in {node.op_type for node in model.graph.node}
    assert {e.key: e.value for e in model.metadata_props}["precision"] == "int8"
    alone = folder / "alone"  # the graph by itself, nowhere near the backbone files
    alone.mkdir()
    shutil.copyfile(folder / "graph.onnx", alone / "graph.onnx")
    images = sorted(XRAYS.glob("*/*.jpeg"))[::4]
    capsys.readouterr()
    assert main(["label", "--graph", str(alone / "graph.onnx"), "--image", *map(str, images), "--json",
                 "--device", "cpu"]) == 0
    labelled = json.loads(capsys.readouterr().out)
    layer = np.load(folder / "graph.final_layer.npz", allow_pickle=False)
    rows = get_bottlenecks(images, int8_backbone, folder / "bottlenecks", log=lambda line: None)
    assert rows.computed == 0  # the retrain cached them, at int8
    expected = softmax(compute_logits(rows.values, layer["weights"], layer["biases"]))  # (4, 2)
    labels = list(layer["labels"])
    for result, probabilities in zip(labelled, expected):
        scores = {p["label"]: p["score"] for p in result["predictions"]}
        np.testing.assert_allclose([scores[label] for label in labels], probabilities, rtol=0, atol=1e-5)


def test_class_activation_map_is_exact_on_an_int8_graph(int8_retrained, tmp_path):
    from mini_retrain.evaluation.cam import explain_image, final_weights
    from mini_retrain.pipeline.retrained_graph import load_retrained

    graph = int8_retrained / "graph.onnx"
    model = load_retrained(graph, int8_retrained / "labels.txt", "cpu")
    weights, biases = final_weights(graph)
    for class_index in (0, 1):
        result = explain_image(model, weights, biases, calibration_files()[0], tmp_path / f"{class_index}.png",
                               class_index)
        assert result["cam_mean"] == pytest.approx(result["logit"] - result["bias"], rel=1e-5, abs=1e-5)


def test_int8_bottlenecks_are_cached_apart_from_float32(int8_retrained, real_backbone, int8_backbone):
    """retrain --precision int8 wrote only int8 stores (pool_3, and mixed_6 for the population distance)."""
    from mini_retrain.evaluation.population import POPULATION_LAYER

    folders = sorted(path.name for path in (int8_retrained / "bottlenecks").iterdir())
    assert folders == sorted(store_folder(int8_retrained / "bottlenecks", int8_backbone, layer=layer).name
                             for layer in ("pool_3", POPULATION_LAYER))
    for layer in ("pool_3", POPULATION_LAYER):
        assert store_folder("cache", int8_backbone, layer=layer) != store_folder("cache", real_backbone, layer=layer)


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing, on tiny graphs


def _conv_batch_norm_graph(path):
    """images -> Conv (no bias) -> BatchNormalization -> Relu -> mixed_10 -> average -> pool_3, with a sidecar."""
    rng = np.random.default_rng(1)
    tensors = {"w": rng.normal(size=(4, 3, 3, 3)), "gamma": rng.uniform(0.5, 2, 4), "beta": rng.normal(size=4),
               "mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, 4)}
    nodes = [
        helper.make_node("AveragePool", ["images"], ["small"], kernel_shape=[37, 37], strides=[37, 37], name="small"),
        helper.make_node("Conv", ["small", "w"], ["conv"], pads=[1, 1, 1, 1], name="block/conv"),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3,
                         name="block/batchnorm"),
        helper.make_node("Relu", ["bn"], ["mixed_10"], name="mixed_10"),
        helper.make_node("GlobalAveragePool", ["mixed_10"], ["pooled"], name="pooled"),
        helper.make_node("Flatten", ["pooled"], ["pool_3"], axis=1, name="pool_3"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 299, 299])],
        [helper.make_tensor_value_info("pool_3", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mixed_10", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    sidecar = {"input_name": "images", "input_size": [299, 299], "input_mean": 128.0, "input_std": 128.0,
               "bottleneck_output": "pool_3", "bottleneck_size": 4, "spatial_output": "mixed_10",
               "spatial_shape": [4, 8, 8], "precision": "fp32",
               "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_fold_batch_norms_gives_one_conv_with_a_bias_and_the_same_function(tmp_path):
    path = _conv_batch_norm_graph(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    fold_batch_norms(model)
    assert [node.op_type for node in model.graph.node] == ["AveragePool", "Conv", "Relu", "GlobalAveragePool",
                                                           "Flatten"]
    assert {t.name for t in model.graph.initializer} == {"w", "block/conv/bias"}
    onnx.checker.check_model(model)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    run = lambda source: onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"images": x})
    for folded, original in zip(run(model.SerializeToString()), run(str(path))):
        np.testing.assert_allclose(folded, original, rtol=1e-5, atol=1e-5)


def test_precision_int8_builds_the_file_beside_the_float32_one_once(tmp_path):
    lines = []
    path = _conv_batch_norm_graph(tmp_path / "tiny.onnx")
    backbone = load_backbone(path, device="cpu", log=lines.append, precision="int8")
    assert backbone.path == int8_path(path) == tmp_path / "tiny.int8.onnx"
    assert backbone.sidecar["precision"] == "int8" and any("Building the int8 backbone" in line for line in lines)
    lines.clear()
    built = backbone.path.stat().st_mtime_ns
    assert load_backbone(path, device="cpu", log=lines.append, precision="int8").path == backbone.path
    assert backbone.path.stat().st_mtime_ns == built and not any("Building" in line for line in lines)  # reused, not rebuilt
    # Given the int8 file itself, int8 runs it as it is, and fp32 refuses it with the fix.
    assert load_backbone(backbone.path, device="cpu", log=lambda line: None, precision="int8").path == backbone.path
    with pytest.raises(ValueError, match="the backbone is int8; pass --precision int8"):
        load_backbone(backbone.path, device="cpu", log=lambda line: None, precision="fp32")
    with pytest.raises(ValueError, match="precision 'int4' is not one of fp32, int8"):
        load_backbone(path, device="cpu", log=lambda line: None, precision="int4")


def test_a_changed_float32_file_gets_a_new_int8_file(tmp_path):
    path = _conv_batch_norm_graph(tmp_path / "tiny.onnx")
    first = ensure_int8_backbone(path, log=lambda line: None)
    assert is_current(first, path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**sidecar, "onnx_sha256": "0" * 64}))  # another float32 file
    assert not is_current(first, path)
    ensure_int8_backbone(path, log=lambda line: None)
    assert json.loads(first.with_suffix(".json").read_text())["float_onnx_sha256"] == "0" * 64


def test_precision_flag_of_every_command_that_makes_bottlenecks(capsys):
    from mini_retrain.cli import build_parser

    parser = build_parser()
    for command in ("retrain", "crossval", "sweep"):
        assert parser.parse_args([command, "--image_dir", "x"]).precision == "fp32"
        assert parser.parse_args([command, "--image_dir", "x", "--precision", "int8"]).precision == "int8"
    assert parser.parse_args(["backbone", "--precision", "int8"]).precision == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["retrain", "--image_dir", "x", "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_int8_bottlenecks_of_a_tiny_graph_go_to_their_own_cache_folder(tmp_path):
    path = _conv_batch_norm_graph(tmp_path / "tiny.onnx")
    images = calibration_files()[:2]
    for precision in ("fp32", "int8"):
        backbone = load_backbone(path, device="cpu", log=lambda line: None, precision=precision)
        get_bottlenecks(images, backbone, tmp_path / "cache", log=lambda line: None)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_backbone_command_with_precision_int8_quantises_beside_and_prints_the_int8_path(tmp_path, monkeypatch,
                                                                                         capsys):
    import mini_retrain.build.backbone_build as backbone_build

    built = []
    monkeypatch.setattr(backbone_build, "build_backbone",  # the float32 build itself is tested in test_backbone.py
                        lambda output, weights: built.append(output) or _conv_batch_norm_graph(output))
    assert main(["backbone", "--output", str(tmp_path / "mine.onnx"), "--precision", "int8"]) == 0
    assert built == [tmp_path / "mine.onnx"]
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "mine.int8.onnx")
    assert json.loads((tmp_path / "mine.int8.json").read_text())["precision"] == "int8"
