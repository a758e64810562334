"""`mini_retrain recalibrate` end to end on a tiny backbone: the new graph's outputs are softmax(a z + c) of the old
graph's logits, its metadata records the sample and the fit, the CAM identity still holds, bad input stops early."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.commands.recalibrate import calibration_keys, calibration_overlap, calibration_overlap_warning
from mini_retrain.core.softmax_layer import softmax
from mini_retrain.evaluation.cam import explain_images
from mini_retrain.evaluation.ood import fit_ood_model
from mini_retrain.pipeline.backbone import load_backbone, run_backbone
from mini_retrain.pipeline.export import build_retrained_model, write_retrained_graph
from mini_retrain.pipeline.images import file_sha1
from mini_retrain.pipeline.retrained_graph import load_retrained, model_input

LABELS = ["normal", "pneumonia"]


def make_site(folder, counts, seed=0):
    """Class subfolders of small noise PNGs, brighter for 'pneumonia' so the tiny graph's logits carry some signal."""
    rng = np.random.default_rng(seed)
    for label, count in counts.items():
        (folder / label).mkdir(parents=True)
        for i in range(count):
            level = 140 if label == "pneumonia" else 100
            pixels = rng.normal(level, 40, size=(48, 48, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{label}{i}.png")
    return folder


@pytest.fixture
def graph(tiny_backbone, tmp_path):
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    rng = np.random.default_rng(5)
    bottlenecks = run_backbone(backbone, rng.uniform(-1, 1, size=(8, 3, 299, 299)).astype(np.float32))  # (8, 4)
    weights, biases = rng.normal(size=(4, 2)).astype(np.float32), np.array([0.3, -0.2], np.float32)
    model = build_retrained_model(backbone, weights, biases, LABELS, ood=fit_ood_model(bottlenecks, np.arange(8) % 2, 2))
    return write_retrained_graph(tmp_path / "graph.onnx", model)


def outputs(graph, paths, names):
    model = load_retrained(graph, device="cpu")
    x = np.stack([model_input(model, p) for p in paths])
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(names, {"images": x})


def test_recalibrated_graph_is_softmax_of_a_z_plus_c_and_records_its_sample(graph, tmp_path, capsys):
    site = make_site(tmp_path / "site", {"normal": 6, "pneumonia": 7})
    original_bytes = graph.read_bytes()
    output = tmp_path / "recalibrated.onnx"
    assert main(["recalibrate", "--graph", str(graph), "--image_dir", str(site), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "Calibration sample: 13 images" in printed and "normal 6, pneumonia 7" in printed
    assert "ECE" in printed and "accuracy" in printed and f"Wrote {output}" in printed
    assert graph.read_bytes() == original_bytes  # the source graph is left as it was

    model = load_retrained(output, device="cpu")
    record = json.loads(model.metadata["recalibration"])
    assert model.labels == LABELS and "ood_threshold" in model.metadata  # the rest of the metadata travels
    scale, bias = np.array(record["scale"]), np.array(record["bias"])
    assert scale[0] == scale[1] and bias[0] == 0.0 and record["converged"]  # two classes: a temperature and a bias
    paths = sorted(site.rglob("*.png"))
    assert record["sample"]["per_class"] == {"normal": 6, "pneumonia": 7}
    assert {(i["file"], i["label"], i["sha1"]) for i in record["sample"]["images"]} == {
        (p.relative_to(site).as_posix(), p.parent.name, file_sha1(p)) for p in paths}
    assert record["source_graph_sha1"] == file_sha1(graph)
    before, after = record["before"], record["after"]
    assert set(before) == set(after) >= {"accuracy", "ece", "cross_entropy", "n"} and before["n"] == 13
    assert after["cross_entropy"] <= before["cross_entropy"]  # the fit can always stay at "no change"

    (old_logits,) = outputs(graph, paths, ["final_logits"])
    new_probabilities, new_logits = outputs(output, paths, ["final_result", "final_logits"])
    expected = old_logits.astype(np.float64) * scale + bias  # (n, 2)
    np.testing.assert_allclose(new_logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_probabilities, softmax(expected), atol=1e-6)
    assert not np.allclose(new_logits, old_logits, atol=1e-3)  # the fit did change something

    for result in explain_images(output, paths[:3] + paths[-3:], tmp_path / "maps", device="cpu", log=lambda _: None):
        assert result["cam_mean"] == pytest.approx(result["logit"] - result["bias"], abs=1e-5)  # still exact
        row = paths.index(Path(result["image"]))
        assert result["logit"] == pytest.approx(expected[row, LABELS.index(result["label"])], abs=1e-4)


def test_overlap_with_the_calibration_sample_is_counted_by_content(graph, tmp_path):
    site = make_site(tmp_path / "site", {"normal": 5, "pneumonia": 5})
    first = tmp_path / "first.onnx"
    assert main(["recalibrate", "--graph", str(graph), "--image_dir", str(site), "--output", str(first)]) == 0
    metadata = load_retrained(first, device="cpu").metadata
    sample = [file_sha1(p) for p in sorted(site.rglob("*.png"))]
    other = make_site(tmp_path / "other", {"normal": 5, "pneumonia": 5}, seed=1)
    others = [file_sha1(p) for p in sorted(other.rglob("*.png"))]
    assert calibration_overlap(metadata, sample[:3] + others) == 3
    warning = calibration_overlap_warning(metadata, sample[:3] + others)
    assert warning.startswith("WARNING: 3 of these 13 images were in the graph's calibration sample")
    assert "optimistic" in warning
    assert calibration_overlap(metadata, others) == 0 and calibration_overlap_warning(metadata, others) is None
    untouched = load_retrained(graph, device="cpu").metadata
    assert calibration_keys(untouched) == set() and calibration_overlap(untouched, sample) == 0

    # Recalibrated again on another sample: both samples count, and the first record is kept inside the second.
    second = tmp_path / "second.onnx"
    assert main(["recalibrate", "--graph", str(first), "--image_dir", str(other), "--output", str(second)]) == 0
    metadata = load_retrained(second, device="cpu").metadata
    assert calibration_keys(metadata) == set(sample) | set(others)
    assert json.loads(metadata["recalibration"])["previous"]["sample"]["per_class"] == {"normal": 5, "pneumonia": 5}


@pytest.mark.parametrize("counts, flags, message", [
    ({"normal": 6, "pneumonia": 6, "effusion": 6}, [], r"effusion: 'effusion' is not one of the graph's labels"),
    ({"normal": 6, "pneumonia": 4}, [], r"class 'pneumonia' has 4 image\(s\) in the calibration sample"),
    ({"normal": 6, "Normal_": 5}, [], r"both give the label 'normal'"),
    ({"normal": 6, "pneumonia": 6}, ["--output", "same"], r"--output is the --graph itself"),
    ({"normal": 6, "pneumonia": 6}, ["--output", "g.pb"], r"--output must end in \.onnx"),
])
def test_bad_input_is_one_line_before_any_work(graph, tmp_path, capsys, counts, flags, message):
    site = make_site(tmp_path / "site", counts)
    output = tmp_path / "out.onnx"
    flags = [str(graph) if f == "same" else str(tmp_path / f) if f.endswith(".pb") else f for f in flags]
    argv = ["recalibrate", "--graph", str(graph), "--image_dir", str(site), "--output", str(output)] + flags
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mini_retrain: error: ") and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err)
    assert "Logits:" not in captured.out  # the graph never ran
    assert not output.exists()


def test_evaluate_says_when_it_scores_the_calibration_sample(graph, tmp_path, capsys):
    """evaluate on a folder holding the images a graph was recalibrated on: one warning, and the count in the result
    (by content: a renamed copy counts); a graph never recalibrated, or other images, say nothing."""
    import shutil

    import mini_retrain

    site = make_site(tmp_path / "site", {"normal": 6, "pneumonia": 6})
    output = tmp_path / "recalibrated.onnx"
    assert main(["recalibrate", "--graph", str(graph), "--image_dir", str(site), "--output", str(output)]) == 0
    scored = make_site(tmp_path / "scored", {"normal": 3, "pneumonia": 3}, seed=9)
    shutil.copy(site / "normal" / "normal0.png", scored / "normal" / "renamed.png")
    capsys.readouterr()
    result = mini_retrain.evaluate(output, scored)
    printed = capsys.readouterr().out
    assert result["calibration_images"] == 1
    assert "WARNING: 1 of these 7 images were in the graph's calibration sample" in printed
    assert mini_retrain.evaluate(graph, scored)["calibration_images"] == 0
    assert "calibration sample" not in capsys.readouterr().out
