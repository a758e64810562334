"""The population distance ("unlike the training X-rays"): its formula, its threshold rule, its place in the graph,
and its warning in label and explain. On synthetic numbers and a tiny backbone (conftest.tiny_layered_backbone);
the figures on real X-rays are in docs/algorithm.md, section 13."""

import json

import numpy as np
import onnxruntime
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.evaluation.population import (
    POPULATION_LAYER, PopulationModel, fit_population_model, population_distance, population_warning)
from tests.test_bottlenecks import write_images


def gaussian_rows(n, d, seed):
    """Correlated Gaussian rows: a fixed random mixing of independent normals."""
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing


@settings(max_examples=20, deadline=None)
@given(n=st.integers(8, 60), d=st.integers(3, 30), components=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_distance_is_mahalanobis_of_the_principal_components_under_the_shrunk_covariance(n, d, components, seed):
    """distance(x) = sqrt(z^T Sigma^-1 z), z = (x - mu) V with V the first k right singular vectors of the centred
    training rows, Sigma = (1 - s) S + s m I (S = Z^T Z / n, m = trace(S) / k), computed here directly."""
    train, new = gaussian_rows(n, d, seed), gaussian_rows(5, d, seed + 1)
    model = fit_population_model(train, components=components)
    mean = train.mean(axis=0)
    _, _, directions = np.linalg.svd(train - mean, full_matrices=False)
    k = min(components, n - 1, d)
    assert model.components.shape == (d, k)
    basis = directions[:k].T
    np.testing.assert_allclose(np.abs(model.components.T @ basis), np.eye(k), atol=1e-3)  # same directions (+- sign)
    scores = (train - mean) @ basis  # (n, k)
    covariance = scores.T @ scores / n
    s = model.shrinkage
    assert 0.0 <= s <= 1.0
    sigma = (1 - s) * covariance + s * np.trace(covariance) / k * np.eye(k)
    z = (new - mean) @ basis
    expected = np.sqrt(np.einsum("ij,jk,ik->i", z, np.linalg.inv(sigma), z))
    np.testing.assert_allclose(population_distance(model, new), expected, rtol=2e-3, atol=2e-3)


def test_about_one_in_a_hundred_alike_are_flagged_and_another_population_is():
    """The threshold is the 99th percentile of held-out distances: new rows from the training distribution lie
    above it about 1% of the time, rows of a population that varies three times as much nearly always."""
    train = gaussian_rows(500, 40, 0)
    model = fit_population_model(train, components=20)
    alike = population_distance(model, gaussian_rows(4000, 40, 1)) > model.threshold
    assert 0.002 < alike.mean() < 0.03
    other = population_distance(model, 3 * gaussian_rows(200, 40, 2)) > model.threshold
    assert other.mean() > 0.95
    # a lower quantile, a lower threshold
    assert fit_population_model(train, components=20, quantile=0.9).threshold < model.threshold


def test_bad_input_is_refused_with_the_parameter_named():
    rows = gaussian_rows(20, 6, 0)
    with pytest.raises(ValueError, match="at least 5 training images"):
        fit_population_model(rows[:4])
    with pytest.raises(ValueError, match="components must be a whole number"):
        fit_population_model(rows, components=0)
    with pytest.raises(ValueError, match="quantile"):
        fit_population_model(rows, quantile=1.5)
    model = fit_population_model(rows)
    with pytest.raises(ValueError, match="pooled has 5 numbers per image, expected 6"):
        population_distance(model, rows[:, :5])
    assert population_warning(12.34, 5.0) == (
        "WARNING: unlike the training X-rays (another population, machine or view?): distance 12.3 > 5.0; "
        "no score for such images was ever tested")


def far_images(folder, count):
    """Flat white films and films half black, half white: nothing like the noisy, evenly grey training images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"far_{i}.png"
        pixels = np.full((60, 50), 255, np.uint8)
        pixels[: 30 * (i % 2)] = 0
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def retrained(tiny_layered_backbone, tmp_path_factory):
    """A graph retrained on 2 x 12 noisy images of the tiny layered backbone, with both distances."""
    folder = tmp_path_factory.mktemp("population")
    write_images(folder / "images", 12)
    assert main(["retrain", "--image_dir", str(folder / "images"), "--backbone", str(tiny_layered_backbone),
                 "--device", "cpu", "--bottleneck_dir", str(folder / "cache"), "--output_graph",
                 str(folder / "graph.onnx"), "--output_labels", str(folder / "labels.txt"),
                 "--how_many_training_steps", "50", "--testing_percentage", "10", "--validation_percentage", "10"]) == 0
    return folder


def test_the_graph_computes_the_distance_fitted_in_retrain(retrained, tiny_layered_backbone):
    """population_distance of the graph = population_distance(NumPy) of the layer's averages, with the model's
    numbers read back from the graph; the threshold and the layer travel in the metadata and the metrics."""
    import onnx
    from onnx import numpy_helper

    from mini_retrain.pipeline.backbone import load_backbone, run_backbone

    graph = onnx.load(str(retrained / "graph.onnx")).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.startswith("population_")}
    metadata = {entry.key: entry.value for entry in onnx.load(str(retrained / "graph.onnx")).metadata_props}
    assert metadata["population_layer"] == POPULATION_LAYER == "mixed_6"
    metrics = json.loads((retrained / "graph.metrics.json").read_text())
    assert metrics["population_layer"] == POPULATION_LAYER
    assert float(metadata["population_threshold"]) == pytest.approx(metrics["population_threshold"])
    model = PopulationModel(POPULATION_LAYER, arrays["population_mean"], arrays["population_components"],
                            arrays["population_precision"], float(metadata["population_threshold"]), 0.0)
    backbone = load_backbone(tiny_layered_backbone, device="cpu", log=lambda line: None)
    images = np.random.default_rng(5).uniform(-1, 1, (6, 3, 299, 299)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(retrained / "graph.onnx"), providers=["CPUExecutionProvider"])
    (distance,) = session.run(["population_distance"], {"images": images})
    expected = population_distance(model, run_backbone(backbone, images, layers=(POPULATION_LAYER,)))
    np.testing.assert_allclose(distance, expected, rtol=1e-3, atol=1e-3)


def test_label_warns_per_image_and_sums_up_a_folder(retrained, tmp_path, capsys):
    new = tmp_path / "new"
    write_images(new, 3, seed=7)  # like the training images
    far_images(new / "far", 2)
    assert main(["label", "--graph", str(retrained / "graph.onnx"), "--image", str(new), "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert len(results) == 8 and all({"other_population", "population_distance", "population_threshold"} <= set(r)
                                     for r in results)
    flags = {r["image"]: r["other_population"] for r in results}
    assert all(flags[str(path)] for path in sorted((new / "far").glob("*.png")))  # another population
    assert all(r["other_population"] == (r["population_distance"] > r["population_threshold"]) for r in results)
    flagged = sum(flags.values())
    summary = f"{flagged} of 8 images are unlike the training images (about 1% expected for images like them)"
    assert summary in captured.err  # beside --json, on stderr

    assert main(["label", "--graph", str(retrained / "graph.onnx"), "--image", str(new), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("WARNING: unlike the training X-rays (another population, machine or view?): distance ") == flagged
    assert text.count("no score for such images was ever tested") == flagged
    assert text.strip().splitlines()[-1] == summary
    far = str(sorted((new / "far").glob("*.png"))[0])
    block = text[text.index(far):].split("\n\n")[0].splitlines()
    assert any(line.startswith("WARNING: unlike the training X-rays") for line in block[:5])

    assert main(["label", "--graph", str(retrained / "graph.onnx"), "--image", far, "--device", "cpu"]) == 0
    assert "images are unlike" not in capsys.readouterr().out  # one image: no summary line


def test_explain_shows_the_warning(retrained, tmp_path, capsys):
    far = far_images(tmp_path / "far", 1)[0]
    assert main(["explain", "--graph", str(retrained / "graph.onnx"), "--image", str(far),
                 "--output", str(tmp_path / "map.png"), "--device", "cpu"]) == 0
    assert "WARNING: unlike the training X-rays (another population, machine or view?)" in capsys.readouterr().out


def test_a_graph_without_the_distance_still_labels(tiny_layered_backbone, tmp_path):
    """An older graph (no population_distance output, no threshold): label gives no population fields or lines."""
    from mini_retrain.commands.label import format_result, label_images, population_summary
    from mini_retrain.pipeline.backbone import load_backbone
    from mini_retrain.pipeline.export import build_retrained_model, write_retrained_graph
    from mini_retrain.pipeline.retrained_graph import load_retrained

    backbone = load_backbone(tiny_layered_backbone, device="cpu", log=lambda line: None)
    model = build_retrained_model(backbone, np.ones((6, 2), np.float32), np.zeros(2, np.float32), ["a", "b"])
    path = write_retrained_graph(tmp_path / "old.onnx", model)
    assert "population_distance" not in {o.name for o in onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]).get_outputs()}
    results = label_images(load_retrained(path, device="cpu"), far_images(tmp_path / "far", 2), log=lambda line: None)
    assert all("other_population" not in r for r in results)
    assert not any("unlike the training X-rays" in line for r in results for line in format_result(r))
    assert population_summary(results) is None


def test_a_backbone_without_the_layer_gives_a_graph_without_the_distance(tiny_backbone, tmp_path, capsys):
    """An older or another backbone (its sidecar lists no layers): retrain says why there is no population warning
    and how to get one, and still writes a graph that label reads."""
    write_images(tmp_path / "images", 8)
    assert main(["retrain", "--image_dir", str(tmp_path / "images"), "--backbone", str(tiny_backbone),
                 "--device", "cpu", "--bottleneck_dir", str(tmp_path / "cache"), "--output_graph",
                 str(tmp_path / "graph.onnx"), "--output_labels", str(tmp_path / "labels.txt"),
                 "--how_many_training_steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"has no layer {POPULATION_LAYER}, so the graph gets no warning for X-rays of another population; " \
           "rebuild it with `mini_retrain backbone`" in out
    metadata = onnxruntime.InferenceSession(str(tmp_path / "graph.onnx"),
                                            providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert "population_threshold" not in metadata and "ood_threshold" in metadata
