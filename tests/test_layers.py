"""--bottleneck_layers in retrain, explain and sweep: the graph computing exactly those layers, class activation maps
that stay exact for any choice, and sweep choosing among layers. On a tiny backbone with blocks on a 17x17 and an
8x8 grid (conftest.tiny_layered_backbone); the real network only where bit-for-bit results matter."""

import json

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.pipeline.backbone import load_backbone, run_backbone
from tests.test_bottlenecks import write_images


@pytest.fixture
def layered(tiny_layered_backbone):
    return load_backbone(tiny_layered_backbone, device="cpu", log=lambda line: None)


def retrain_argv(image_dir, tmp_path, backbone, layers, *extra):
    return ["retrain", "--image_dir", str(image_dir), "--backbone", str(backbone), "--device", "cpu",
            "--bottleneck_dir", str(tmp_path / "cache"), "--output_graph", str(tmp_path / "graph.onnx"),
            "--output_labels", str(tmp_path / "labels.txt"), "--how_many_training_steps", "200",
            "--learning_rate", "0.1", "--testing_percentage", "20", "--validation_percentage", "20",
            "--bottleneck_layers", layers, *extra]


@pytest.mark.parametrize("layers", ["mixed_8", "mixed_6,pool_3", "pool_3"])
def test_the_graph_computes_exactly_the_chosen_layers(tiny_layered_backbone, layered, tmp_path, layers, capsys):
    """final_logits = (the pooled layers side by side) @ W + b, W from the .npz, computed here; the metadata and
    the metrics name the layers; each layer's feature map is a graph output."""
    image_dir = tmp_path / "images"
    paths = write_images(image_dir, 8)
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, layers)) == 0
    chosen = tuple(layers.split(","))
    with np.load(tmp_path / "graph.final_layer.npz") as saved:
        weights, biases = saved["weights"], saved["biases"]
    sizes = {"pool_3": 6, "mixed_6": 4, "mixed_8": 5}
    assert weights.shape == (sum(sizes[layer] for layer in chosen), 2)
    session = onnxruntime.InferenceSession(str(tmp_path / "graph.onnx"), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["bottleneck_layers"]) == list(chosen)
    maps = {"pool_3": "mixed_10", "mixed_6": "mixed_6", "mixed_8": "mixed_8"}
    assert json.loads(metadata["feature_maps"]) == {layer: maps[layer] for layer in chosen}
    assert {maps[layer] for layer in chosen} <= {output.name for output in session.get_outputs()}
    from mini_retrain.pipeline.backbone import backbone_input
    from mini_retrain.pipeline.images import read_image

    images = np.stack([backbone_input(read_image(p, keep_gray=True), layered.sidecar) for p in paths[:4]])
    features = run_backbone(layered, images, layers=chosen)  # (4, D)
    (logits,) = session.run(["final_logits"], {"images": images})
    np.testing.assert_allclose(logits, features @ weights + biases, rtol=1e-5, atol=1e-5)
    metrics = json.loads((tmp_path / "graph.metrics.json").read_text())
    assert metrics["bottleneck_layers"] == list(chosen)
    # the cache: one store per layer asked for, plus pool_3 (OOD) and mixed_6 (population), from one forward pass
    stores = sorted(path.name.split("-")[2] for path in (tmp_path / "cache").iterdir())
    assert stores == sorted(set(chosen) | {"pool_3", "mixed_6"})


def test_several_layers_from_one_forward_pass_in_retrain(tiny_layered_backbone, tmp_path, capsys):
    image_dir = tmp_path / "images"
    write_images(image_dir, 8)
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, "mixed_8")) == 0
    assert "16 bottlenecks ready (16 computed now" in capsys.readouterr().out
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, "pool_3,mixed_8")) == 0
    assert "16 bottlenecks ready (0 computed now, 16 from the cache" in capsys.readouterr().out


def test_an_unknown_layer_is_one_line_before_any_work(tiny_layered_backbone, tmp_path, capsys):
    image_dir = tmp_path / "images"
    write_images(image_dir, 2)
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, "pool_3,mixed_9")) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [error] and "no layer 'mixed_9'" in error and "choose from" in error
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("shard-*"))
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, "pool_3,,mixed_8")) == 2
    assert "empty item" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ["mixed_6", "mixed_8,mixed_6,pool_3"])
def test_class_activation_maps_stay_exact_for_any_layers(tiny_layered_backbone, tmp_path, layers, capsys):
    """Each layer's map on its own grid; the sum over layers of the maps' means is logit - bias."""
    from mini_retrain.evaluation.cam import explain_image, final_weights
    from mini_retrain.pipeline.retrained_graph import load_retrained

    image_dir = tmp_path / "images"
    paths = write_images(image_dir, 8)
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, layers)) == 0
    model = load_retrained(tmp_path / "graph.onnx", device="cpu")
    weights, biases = final_weights(tmp_path / "graph.onnx")
    grids = {"pool_3": [8, 8], "mixed_6": [17, 17], "mixed_8": [8, 8]}
    for class_index in (0, 1):
        result = explain_image(model, weights, biases, paths[0], tmp_path / f"heat{class_index}.png", class_index)
        assert list(result["cams"]) == layers.split(",")
        for layer, cam in result["cams"].items():
            assert list(np.shape(cam)) == grids[layer]
            assert result["cam_means"][layer] == pytest.approx(float(np.mean(cam)), rel=1e-6)
        assert sum(result["cam_means"].values()) == pytest.approx(result["cam_mean"], rel=1e-6)
        assert result["cam_mean"] == pytest.approx(result["logit"] - result["bias"], rel=1e-4, abs=1e-4)
    assert Image.open(tmp_path / "heat0.png").mode == "RGB"
    assert main(["explain", "--graph", str(tmp_path / "graph.onnx"), "--image", str(paths[0]),
                 "--output", str(tmp_path / "cli.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "logit - bias" in out and (len(layers.split(",")) == 1 or "(mixed_6, 17x17)" in out)


def test_sweep_chooses_among_layers_on_validation(tiny_layered_backbone, tmp_path, capsys):
    from mini_retrain.commands.sweep import parse_layer_choices

    assert parse_layer_choices("pool_3;mixed_8;pool_3,mixed_8") == [("pool_3",), ("mixed_8",), ("pool_3", "mixed_8")]
    with pytest.raises(ValueError, match="the same alternative twice"):
        parse_layer_choices("pool_3;pool_3")
    with pytest.raises(ValueError, match="empty item"):
        parse_layer_choices("pool_3;")
    image_dir = tmp_path / "images"
    write_images(image_dir, 10)
    output = tmp_path / "sweep.json"
    assert main(["sweep", "--image_dir", str(image_dir), "--backbone", str(tiny_layered_backbone), "--device", "cpu",
                 "--bottleneck_dir", str(tmp_path / "cache"), "--bottleneck_layers", "pool_3;mixed_8;pool_3,mixed_6",
                 "--learning_rates", "0.01,0.1", "--how_many_training_steps", "50", "--class_balancing", "on",
                 "--validation_percentage", "30", "--testing_percentage", "20", "--output_json", str(output)]) == 0
    out = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert [row["bottleneck_layers"] for row in result["settings"]] == \
        ["pool_3", "pool_3", "mixed_8", "mixed_8", "pool_3,mixed_6", "pool_3,mixed_6"]
    from mini_retrain.commands.sweep import choose_setting

    assert result["chosen_index"] == choose_setting(result["settings"])
    assert f"--bottleneck_layers {result['chosen']['bottleneck_layers']} " in out
    assert "20 bottlenecks ready (20 computed now" in out  # every layer of every alternative: one pass
    # ... with what a retrain needs besides (pool_3 for the OOD distance, the population layer): nothing to compute
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, result["chosen"]["bottleneck_layers"])) == 0
    assert "20 bottlenecks ready (0 computed now, 20 from the cache" in capsys.readouterr().out


def test_standardised_training_folds_back_into_the_same_function():
    """((x - m) / s) W + b = x W' + b' for the folded layer; a constant feature keeps scale 1."""
    from mini_retrain.core.train import FinalLayer, folded, standardisation, train_layer
    from mini_retrain.pipeline.dataset import standardises

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 0.05, (50, 6)).astype(np.float32)
    x[:, 2] = 1.5  # never varies
    mean, scale = standardisation(x)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5)
    assert scale[2] == 1.0 and np.allclose(scale[[0, 1, 3, 4, 5]], x.std(axis=0)[[0, 1, 3, 4, 5]], rtol=1e-4)
    layer = FinalLayer(rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))
    flat = folded(layer, mean, scale)
    np.testing.assert_allclose(x @ flat.weights + flat.biases, ((x - mean) / scale) @ layer.weights + layer.biases,
                               rtol=1e-4, atol=1e-4)
    # train_layer(standardise=True) is the layer trained on the standardised rows, folded
    y = (x[:, 0] > 3.0).astype(np.int64)
    knobs = dict(how_many_training_steps=50, learning_rate=0.1, train_batch_size=10, class_balancing=True)
    trained = train_layer(x, y, 2, np.random.default_rng(1), **knobs, standardise=True)
    by_hand = folded(train_layer((x - mean) / scale, y, 2, np.random.default_rng(1), **knobs), mean, scale)
    np.testing.assert_allclose(trained.weights, by_hand.weights, rtol=1e-6)
    assert standardises(("mixed_8",)) and standardises(("pool_3", "mixed_8")) and not standardises(("pool_3",))


@pytest.mark.parametrize("layers", ["mixed_8", "mixed_6,pool_3"])
def test_an_intermediate_graph_of_earlier_layers_becomes_the_full_graph_of_those_layers(
        tiny_layered_backbone, layered, tmp_path, layers, capsys):
    """--intermediate_store_frequency with --bottleneck_layers: the small graph reads the chosen averages, and
    attach_backbone connects it to those layers (not to pool_3), giving the small graph's probabilities."""
    import onnx
    import onnxruntime

    from mini_retrain.pipeline.export import attach_backbone

    image_dir = tmp_path / "images"
    write_images(image_dir, 8)
    assert main(retrain_argv(image_dir, tmp_path, tiny_layered_backbone, layers,
                             "--intermediate_store_frequency", "100")) == 0
    intermediate = tmp_path / "intermediate_graphs" / "intermediate_100.onnx"
    small = onnx.load(str(intermediate))
    metadata = {entry.key: entry.value for entry in small.metadata_props}
    assert metadata["bottleneck_layers"] == layers
    full = attach_backbone(intermediate, layered)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    session = onnxruntime.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run(["final_result"], {"images": x})[0]
    features = run_backbone(layered, x, layers=tuple(layers.split(",")))  # (2, D) the chosen averages
    small_session = onnxruntime.InferenceSession(str(intermediate), providers=["CPUExecutionProvider"])
    expected = small_session.run(["final_result"], {small.graph.input[0].name: features})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
