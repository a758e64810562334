"""retrain -> label -> explain, end to end through the CLI, on the real demo X-rays and the real Inception v3."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_retrain.cli import main
from tests.conftest import DEMO_DATA

XRAYS = DEMO_DATA / "pneumonia-demo"
CAT = DEMO_DATA / "photos" / "chelsea.png"


def copy_demo(target):
    for source in XRAYS.glob("*/*.jpeg"):
        destination = target / source.parent.name / source.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    return target


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_backbone_path):
    """One retrain run on the 16 demo X-rays, shared by the tests below; returns (folder, stdout lines)."""
    folder = tmp_path_factory.mktemp("retrained")
    image_dir = copy_demo(folder / "images")
    capture = []
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([
            "retrain", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path),
            "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(folder / "graph.onnx"),
            "--output_labels", str(folder / "labels.txt"), "--summaries_dir", str(folder / "summaries"),
            "--how_many_training_steps", "60", "--eval_step_interval", "20", "--train_batch_size", "16",
            "--testing_percentage", "25", "--validation_percentage", "25", "--validation_batch_size", "-1",
            "--print_misclassified_test_images", "--device", "cpu",
        ])
    assert code == 0
    capture.extend(stdout.getvalue().splitlines())
    return folder, capture


def test_retrain_prints_retrain_py_lines(trained):
    folder, lines = trained
    text = "\n".join(lines)
    for step in (0, 20, 40, 59):
        assert re.search(rf"^Step {step}: Train accuracy = \d+\.\d%$", text, re.M)
        assert re.search(rf"^Step {step}: Cross entropy = \d+\.\d+$", text, re.M)
        assert re.search(rf"^Step {step}: Validation accuracy = \d+\.\d% \(N=\d+\)$", text, re.M)
    assert re.search(r"^Final test accuracy = \d+\.\d% \(N=\d+, 95% CI \d+\.\d-\d+\.\d%\)$", text, re.M)
    assert "=== MISCLASSIFIED TEST IMAGES ===" in text
    assert "Found 16 images in 2 classes: normal (8), pneumonia (8)" in text
    # retrain.py's 25% / 25% hash split of these 16 names leaves 10 training images (split.py, tested there)
    assert ("Split: training 10 (normal 6, pneumonia 4), validation 4 (normal 1, pneumonia 3), "
            "testing 2 (normal 1, pneumonia 1)") in lines
    assert re.search(r"^Trained 60 steps in \d+\.\d\d s \(10 training images, batch 10: --train_batch_size 16 capped "
                     r"at the training set\)$", text, re.M)
    # Two test images: the intervals rest on too few, and crossval is the way to an honest one.
    assert re.search(r"^NOTE: the test set holds only 1 normal and 1 pneumonia image\(s\), fewer than 30 per class, .*"
                     rf"mini_retrain crossval --image_dir {re.escape(str(folder / 'images'))}$", text, re.M)


def test_retrain_writes_graph_labels_weights_metrics_and_summaries(trained):
    folder, _ = trained
    assert (folder / "labels.txt").read_text().splitlines() == ["normal", "pneumonia"]
    with np.load(folder / "graph.final_layer.npz", allow_pickle=False) as layer:
        assert layer["weights"].shape == (2048, 2) and layer["biases"].shape == (2,)
        assert list(layer["labels"]) == ["normal", "pneumonia"]
    metrics = json.loads((folder / "graph.metrics.json").read_text())
    assert metrics["n"] >= 1 and 0 <= metrics["accuracy"]["estimate"] <= 1
    # The split, for an audit: every image once, where retrain.py's hash puts it (no small-class move here).
    from mini_retrain.core.split import which_split

    files = sorted(f"{path.parent.name}/{path.name}" for path in (folder / "images").glob("*/*.jpeg"))
    assert sorted(f for split in metrics["splits"].values() for f in split) == files
    assert {f: s for s, split in metrics["splits"].items() for f in split} == {f: which_split(f, 25, 25) for f in files}
    # The test result travels in the graph, for `evaluate` to compare a new folder with.
    from mini_retrain.pipeline.retrained_graph import load_retrained

    internal = json.loads(load_retrained(folder / "graph.onnx", device="cpu").metadata["internal_test"])
    assert internal == {"n": metrics["n"], "correct": metrics["accuracy"]["successes"],
                        "accuracy": metrics["accuracy"]["estimate"], "ci": metrics["accuracy"]["ci"]}
    assert [row["step"] for row in metrics["history"]] == [0, 20, 40, 59]
    csv = (folder / "summaries" / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("step,train_accuracy,cross_entropy") and len(csv) == 5
    assert len((folder / "summaries" / "metrics.jsonl").read_text().splitlines()) == 4


def test_exported_graph_is_backbone_plus_softmax_layer(trained, real_backbone):
    """final_result = softmax(pool_3 @ W + b) with the weights of the .npz, computed here in NumPy."""
    import onnxruntime

    from mini_retrain.pipeline.backbone import run_backbone
    from mini_retrain.pipeline.images import load_backbone_input

    folder, _ = trained
    layer = np.load(folder / "graph.final_layer.npz", allow_pickle=False)
    session = onnxruntime.InferenceSession(str(folder / "graph.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([load_backbone_input(CAT), load_backbone_input(next(XRAYS.glob("normal/*.jpeg")))])
    probabilities, pool_3 = session.run(["final_result", "pool_3"], {"images": x})
    np.testing.assert_allclose(pool_3, run_backbone(real_backbone, x), atol=1e-4)
    logits = pool_3 @ layer["weights"] + layer["biases"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_label_prints_scores_highest_first(trained, capsys):
    folder, _ = trained
    xray = next(XRAYS.glob("pneumonia/*.jpeg"))
    assert main(["label", "--graph", str(folder / "graph.onnx"), "--labels", str(folder / "labels.txt"),
                 "--image", str(xray), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(xray)
    scores = [float(re.fullmatch(r"(normal|pneumonia) \(score = (\d\.\d{5})\)", line).group(2)) for line in lines[1:3]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_label_json_and_folder_input(trained, capsys):
    folder, _ = trained
    assert main(["label", "--graph", str(folder / "graph.onnx"), "--image", str(XRAYS / "normal"), str(CAT),
                 "--json", "--num_top_predictions", "1", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 9 and all(len(r["predictions"]) == 1 for r in results)
    assert all(isinstance(r["out_of_distribution"], bool) for r in results)


def test_label_json_stdout_stays_json_when_cuda_is_missing(trained, capsys):
    """CI has no GPU: asking for CUDA falls back to the CPU with a WARNING on stderr; stdout is only the JSON."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA, so there is no fallback to see")
    folder, _ = trained
    assert main(["label", "--graph", str(folder / "graph.onnx"), "--image", str(CAT), "--json",
                 "--device", "cuda"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["image"] == str(CAT)
    assert "WARNING: CUDA was asked for" in captured.err and "using the CPU" in captured.err


def test_label_refuses_labels_file_that_does_not_match(trained, tmp_path, capsys):
    folder, _ = trained
    wrong = tmp_path / "labels.txt"
    wrong.write_text("cat\ndog\n")
    assert main(["label", "--graph", str(folder / "graph.onnx"), "--labels", str(wrong), "--image", str(CAT)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "labels.txt" in error and "do not match" in error


def test_label_refuses_a_graph_that_is_not_ours(real_backbone_path, capsys):
    assert main(["label", "--graph", str(real_backbone_path), "--image", str(CAT)]) == 2
    assert "not a graph written by" in capsys.readouterr().err


def test_explain_heat_map_mean_equals_logit_minus_bias(trained, tmp_path, capsys):
    from mini_retrain.evaluation.cam import explain_image, final_weights
    from mini_retrain.pipeline.retrained_graph import load_retrained

    folder, _ = trained
    model = load_retrained(folder / "graph.onnx", folder / "labels.txt", "cpu")
    weights, biases = final_weights(folder / "graph.onnx")
    xray = next(XRAYS.glob("pneumonia/*.jpeg"))
    for class_index in (0, 1):
        result = explain_image(model, weights, biases, xray, tmp_path / f"heat{class_index}.png", class_index)
        assert result["cam_mean"] == pytest.approx(result["logit"] - result["bias"], rel=1e-4, abs=1e-4)
    heat, shrunk = Image.open(tmp_path / "heat0.png"), Image.open(xray)
    shrunk.thumbnail((1024, 1024))  # shrunk to at most 1024 px, same aspect, with the legend strip below
    assert heat.mode == "RGB" and heat.width == shrunk.width and shrunk.height < heat.height < 1.3 * shrunk.height
    # Through the CLI as well.
    output = tmp_path / "cli.png"
    assert main(["explain", "--graph", str(folder / "graph.onnx"), "--image", str(xray), "--output", str(output),
                 "--device", "cpu"]) == 0
    assert output.is_file() and "logit - bias" in capsys.readouterr().out


def test_explain_warns_about_a_photo_as_label_does_and_draws_a_legend(trained, tmp_path, capsys):
    from mini_retrain.evaluation.cam import colour_map

    folder, _ = trained
    graph = str(folder / "graph.onnx")
    assert main(["label", "--graph", graph, "--image", str(CAT), "--device", "cpu"]) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: this image is unlike")]
    assert len(warning) == 1
    output = tmp_path / "heat.jpg"  # an image suffix: one file, never a folder named heat.jpg
    assert main(["explain", "--graph", graph, "--image", str(CAT), "--output", str(output), "--device", "cpu"]) == 0
    assert warning[0] in capsys.readouterr().out.splitlines()[-2:]  # then the population warning, as label
    assert output.is_file()
    picture = np.asarray(Image.open(output).convert("RGB"), dtype=np.int64)
    original = Image.open(CAT)
    assert picture.shape[1] == original.size[0] and picture.shape[0] > original.size[1]  # the legend strip below
    legend = picture[original.size[1]:]
    for end in (0.0, 1.0):  # both ends of the colour bar are drawn
        colour = colour_map(np.array([end]))[0].astype(np.int64)
        assert np.any(np.abs(legend - colour).sum(axis=2) < 30)
    assert np.any((legend[..., 0] > 150) & (legend[..., 1] < 40) & (legend[..., 2] < 40))  # the red warning text


def test_explain_output_is_a_file_for_one_image_and_a_folder_for_several(trained, tmp_path, capsys):
    folder, _ = trained
    graph = str(folder / "graph.onnx")
    two = [str(p) for p in sorted(XRAYS.glob("normal/*.jpeg"))[:2]]
    assert main(["explain", "--graph", graph, "--image", *two, "--output", str(tmp_path / "two.png")]) == 2
    assert "--output " in capsys.readouterr().err and not (tmp_path / "two.png").exists()
    assert main(["explain", "--graph", graph, "--image", *two, "--output", str(tmp_path / "maps"), "--device",
                 "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(f"{Path(p).stem}.cam.png" for p in two)
    assert main(["explain", "--graph", graph, "--image", two[0], "--output", str(tmp_path / "one.JPEG"),
                 "--class_name", "pneumonia", "--device", "cpu"]) == 0
    assert (tmp_path / "one.JPEG").is_file() and ": pneumonia (score = " in capsys.readouterr().out
    assert main(["explain", "--graph", graph, "--image", two[0], "--class_name", "cat"]) == 2
    assert "--class_name 'cat' is not one of the graph's labels" in capsys.readouterr().err


def test_second_run_uses_the_cache(trained, real_backbone_path, capsys):
    folder, _ = trained
    assert main(["retrain", "--image_dir", str(folder / "images"), "--backbone", str(real_backbone_path),
                 "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(folder / "again.onnx"),
                 "--output_labels", str(folder / "again.txt"), "--how_many_training_steps", "5",
                 "--testing_percentage", "25", "--validation_percentage", "25", "--device", "cpu"]) == 0
    assert "16 bottlenecks ready (0 computed now, 16 from the cache" in capsys.readouterr().out


def test_broken_image_is_skipped_with_its_name(trained, real_backbone_path, tmp_path, capsys):
    folder, _ = trained
    image_dir = copy_demo(tmp_path / "images")
    broken = image_dir / "normal" / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["retrain", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path),
                 "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(tmp_path / "g.onnx"),
                 "--output_labels", str(tmp_path / "l.txt"), "--how_many_training_steps", "5",
                 "--testing_percentage", "25", "--validation_percentage", "25", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"Skipping {broken}" in out and "1 image(s) skipped" in out
    assert main(["retrain", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path),
                 "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(tmp_path / "g.onnx"),
                 "--output_labels", str(tmp_path / "l.txt"), "--on_bad_image", "error", "--device", "cpu"]) == 2
    assert "broken.jpeg" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [
    ({"normal": 3, "empty": 0}, "no images"),
    ({"normal": 3}, "only one class"),
])
def test_structure_errors_exit_2_with_one_line(tmp_path, capsys, layout, message):
    for label, count in layout.items():
        (tmp_path / label).mkdir()
        for source in list(XRAYS.glob("normal/*.jpeg"))[:count]:
            shutil.copyfile(source, tmp_path / label / source.name)
    assert main(["retrain", "--image_dir", str(tmp_path), "--output_graph", str(tmp_path / "g.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error


def test_help_of_every_subcommand_shows_defaults(capsys):
    for command in ("retrain", "label", "demo", "backbone", "explain"):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--help"])
        assert exit_code.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 4000)" in out and "(default: 0.01)" in out and "(default: final_result)" in out


@pytest.mark.parametrize("flag, expected", [("on", True), ("off", False)])
def test_class_balancing_flag_reaches_the_training_loop(trained, monkeypatch, flag, expected, real_backbone_path):
    import mini_retrain.commands.retrain as retrain_module

    seen = {}
    real_loop = retrain_module.train_final_layer

    def recording_loop(*args, **kwargs):
        seen["class_balancing"] = kwargs["class_balancing"]
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "train_final_layer", recording_loop)
    folder, _ = trained
    assert main(["retrain", "--image_dir", str(folder / "images"), "--backbone", str(real_backbone_path),
                 "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(folder / f"{flag}.onnx"),
                 "--output_labels", str(folder / f"{flag}.txt"), "--how_many_training_steps", "5",
                 "--class_balancing", flag, "--device", "cpu"]) == 0
    assert seen == {"class_balancing": expected}


def test_fast_decode_is_cached_apart_stored_in_the_graph_and_followed_by_label(tmp_path, real_backbone_path, capsys):
    import onnxruntime

    from mini_retrain.pipeline.images import read_image, resize_for_backbone, to_backbone_input

    image_dir = copy_demo(tmp_path / "images")
    bottlenecks, graph = tmp_path / "bottlenecks", tmp_path / "fast.onnx"
    assert main(["retrain", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path), "--device", "cpu",
                 "--bottleneck_dir", str(bottlenecks), "--output_graph", str(graph),
                 "--output_labels", str(tmp_path / "fast.txt"), "--how_many_training_steps", "20",
                 "--fast_decode"]) == 0
    assert [folder.name.endswith("-fast") for folder in bottlenecks.iterdir()] == [True, True]  # pool_3, mixed_6
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["fast_decode"] == "1"

    # The largest demo X-ray (1776 px wide) is decoded at half size by the JPEG draft, so the two paths differ.
    big = max(XRAYS.glob("*/*.jpeg"), key=lambda path: Image.open(path).size[0])
    inputs = {fast: to_backbone_input(resize_for_backbone(read_image(big, fast=fast, keep_gray=True), fast=fast))
              for fast in (False, True)}
    input_name = session.get_inputs()[0].name
    scores = {fast: session.run(["final_result"], {input_name: x[None]})[0][0] for fast, x in inputs.items()}
    assert not np.allclose(scores[False], scores[True], rtol=0, atol=1e-6)  # so the check below can tell them apart
    capsys.readouterr()
    assert main(["label", "--graph", str(graph), "--image", str(big), "--json", "--device", "cpu"]) == 0
    labelled = {p["label"]: p["score"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]}
    labels = (tmp_path / "fast.txt").read_text().split()
    np.testing.assert_allclose([labelled[label] for label in labels], scores[True], rtol=0, atol=1e-6)


def test_settings_take_str_and_pathlike_and_refuse_bad_values_at_once(tmp_path):
    """RetrainSettings(output_graph="x.onnx") with a str once failed with AttributeError after training; now paths
    become pathlib.Path when the settings are made, and a bad value fails there, before any image is read."""
    import os

    from mini_retrain.settings import RetrainSettings

    class Folder(os.PathLike):  # any os.PathLike, not only pathlib.Path
        def __fspath__(self):
            return str(tmp_path / "lungs")

    settings = RetrainSettings(image_dir=Folder(), output_graph="x.onnx", report=str(tmp_path / "report"))
    assert settings.image_dir == tmp_path / "lungs" and settings.output_graph == Path("x.onnx")
    assert settings.report == tmp_path / "report" and settings.output_weights is None
    for change, message in [({"output_graph": "x.pb"}, "x.pb: output_graph must end in .onnx"),
                            ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0, got -1.0"),
                            ({"how_many_training_steps": 0}, "how_many_training_steps must be a whole number >= 1"),
                            ({"testing_percentage": 60, "validation_percentage": 50}, "must be < 100"),
                            ({"train_batch_size": 0}, "train_batch_size must be a positive whole number"),
                            ({"random_brightness": 100}, "random_brightness must be a percentage below 100"),
                            ({"device": "tpu"}, "device 'tpu' is not one of auto, cpu, cuda"),
                            ({"on_bad_image": "ignore"}, "on_bad_image must be 'skip' or 'error'"),
                            ({"random_seed": -1}, "random_seed must be a whole number >= 0"),
                            ({"flip_left_right": "yes"}, "flip_left_right must be True or False"),
                            ({"image_dir": 5}, "image_dir must be a path")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            RetrainSettings(**{"image_dir": "lungs", **change})


def test_errors_name_parameters_and_the_command_line_names_flags(tmp_path, capsys, monkeypatch):
    """Library errors say `learning_rate`; `mini_retrain retrain` says `--learning_rate`, before any work."""
    from mini_retrain.cli import with_flags

    flags = {"image_dir": "--image_dir", "folds": "--folds", "output": "--output"}
    assert with_flags("lungs: image_dir does not exist", flags) == "lungs: --image_dir does not exist"
    assert with_flags("folds 9 is more than 3; use folds=3 or fewer", flags) == \
        "--folds 9 is more than 3; use --folds 3 or fewer"
    assert with_flags("learning_rate must be > 0; output of image_dir", flags) == \
        "learning_rate must be > 0; output of image_dir"  # not a flag here; and only the leading name is mapped
    assert main(["retrain", "--image_dir", str(tmp_path / "nowhere"), "--learning_rate", "-1"]) == 2
    assert capsys.readouterr().err == "mini_retrain: error: --learning_rate must be a finite number > 0, got -1.0\n"
    assert main(["retrain", "--image_dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (f"mini_retrain: error: {tmp_path / 'nowhere'}: --image_dir does not exist; "
                                       "pass a folder with one subfolder per class\n")
    # A bad image names the file, not a parameter: "image is only 4x4 pixels" stays as it is under explain --image.
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "icon.png")
    (tmp_path / "graph.onnx").write_bytes(b"")
    import mini_retrain.evaluation.cam as cam

    def refuse(*args, **kwargs):
        from mini_retrain.pipeline.images import read_image
        read_image(tmp_path / "icon.png")

    monkeypatch.setattr(cam, "explain_images", refuse)
    assert main(["explain", "--graph", str(tmp_path / "graph.onnx"), "--image", str(tmp_path / "icon.png")]) == 2
    assert capsys.readouterr().err.startswith(f"mini_retrain: error: {tmp_path / 'icon.png'}: image is only 4x4 pixels")
def test_explain_is_exact_for_an_earlier_block_and_pool_3_together(trained, real_backbone_path, tmp_path, capsys):
    """The real network, --bottleneck_layers mixed_6,pool_3 (the cache of the run above already holds both): one map
    on mixed_6's 17x17 grid and one on mixed_10's 8x8, whose means add up to logit - bias."""
    from mini_retrain.evaluation.cam import explain_image, final_weights
    from mini_retrain.pipeline.retrained_graph import load_retrained

    folder, _ = trained
    graph = tmp_path / "layers.onnx"
    assert main(["retrain", "--image_dir", str(folder / "images"), "--backbone", str(real_backbone_path),
                 "--bottleneck_dir", str(folder / "bottlenecks"), "--output_graph", str(graph),
                 "--output_labels", str(tmp_path / "layers.txt"), "--how_many_training_steps", "60",
                 "--testing_percentage", "25", "--validation_percentage", "25", "--device", "cpu",
                 "--bottleneck_layers", "mixed_6,pool_3"]) == 0
    assert "16 bottlenecks ready (0 computed now, 16 from the cache" in capsys.readouterr().out
    model = load_retrained(graph, device="cpu")
    weights, biases = final_weights(graph)
    assert weights.shape == (768 + 2048, 2)
    xray = next(XRAYS.glob("normal/*.jpeg"))
    result = explain_image(model, weights, biases, xray, tmp_path / "heat.png", 1)
    assert [np.shape(result["cams"][layer]) for layer in ("mixed_6", "pool_3")] == [(17, 17), (8, 8)]
    assert result["cam_mean"] == pytest.approx(result["logit"] - result["bias"], rel=1e-4, abs=1e-4)
    assert abs(result["cam_means"]["mixed_6"]) > 1e-3 and abs(result["cam_means"]["pool_3"]) > 1e-3  # both count
