"""evaluate on a tiny graph: its numbers equal those computed from `label --json`; folders, the internal test."""

import json
import shutil

import numpy as np
import pytest

from mini_retrain.cli import main
from mini_retrain.commands import evaluate as evaluate_module
from mini_retrain.commands.evaluate import comparison_sentence, evaluate_folder
from mini_retrain.evaluation.metrics import evaluate, newcombe_interval, wilson_interval
from mini_retrain.pipeline.image_lists import label_for_folder
from tests.conftest import DEMO_DATA, tiny_retrained_graph

XRAYS = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))
INTERNAL = {"n": 50, "correct": 45, "accuracy": 0.9, "ci": list(wilson_interval(45, 50))}


@pytest.fixture
def graph(tiny_backbone, tmp_path):
    return tiny_retrained_graph(tiny_backbone, tmp_path, internal_test=INTERNAL)


def labelled_folder(target, classes=("normal", "pneumonia")):
    for source in XRAYS:
        if source.parent.name in classes:
            (target / source.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / source.parent.name / source.name)
    return target


def test_evaluate_numbers_equal_those_from_label_json(graph, tmp_path, capsys):
    graph_file, labels_file = graph
    folder = labelled_folder(tmp_path / "hospital")
    (folder / "normal" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    assert main(["label", "--graph", str(graph_file), "--image", str(folder), "--json", "--device", "cpu"]) == 0
    records = json.loads(capsys.readouterr().out)
    read = [r for r in records if "error" not in r]
    class_names = labels_file.read_text().split()
    probabilities = np.array([[{p["label"]: p["score"] for p in r["predictions"]}[c] for c in class_names]
                              for r in read])  # (n, classes)
    truth = np.array([class_names.index(label_for_folder(r["image"].split("/")[-2])) for r in read])  # (n,)
    expected = evaluate(probabilities, truth, class_names)

    assert main(["evaluate", "--graph", str(graph_file), "--labels", str(labels_file), "--image_dir", str(folder),
                 "--json", str(tmp_path / "out" / "evaluation.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert result["n"] == expected["n"] == 16 and result["skipped"] == 1
    for key in ("accuracy", "sensitivity", "specificity"):
        assert result[key]["value"] == pytest.approx(expected[key]["estimate"], abs=1e-12)
        assert result[key]["ci"] == pytest.approx(expected[key]["ci"], abs=1e-12)
    assert result["roc_auc"]["value"] == pytest.approx(expected["roc_auc"]["estimate"], abs=1e-12)
    assert result["evaluation"]["confusion_matrix"] == expected["confusion_matrix"]
    # One row per image, as label --json writes it, plus the class of its folder.
    assert [{k: v for k, v in row.items() if k != "true"} for row in result["images"]] == records
    assert [row["true"] for row in result["images"]] == [label_for_folder(r["image"].split("/")[-2]) for r in records]
    assert result["flagged"] == {"out_of_distribution": sum(r["out_of_distribution"] for r in read)}
    # The comparison with the internal test the graph carries.
    correct = expected["accuracy"]["successes"]
    assert result["internal_test"] == INTERNAL
    assert result["difference"]["value"] == pytest.approx(correct / 16 - 0.9)
    assert result["difference"]["ci"] == pytest.approx(list(newcombe_interval(correct, 16, 45, 50)))
    assert f"Accuracy = {100 * correct / 16:.1f}% (N=16, 95% CI" in out
    assert "Internal test (retrain's own split) = 90.0% (45/50, 95% CI 78.6-95.7%)" in out
    assert "Difference (this folder - internal) = " in out and result["difference"]["sentence"] in out
    assert out.count("broken.jpeg") == 1 and "Confusion matrix" in out and "Flagged: " in out


def test_a_folder_that_is_no_label_is_an_error_before_any_image(graph, tmp_path, capsys, monkeypatch):
    graph_file, _ = graph
    folder = labelled_folder(tmp_path / "hospital")
    (folder / "Cats").mkdir()
    shutil.copyfile(DEMO_DATA / "photos" / "chelsea.png", folder / "Cats" / "chelsea.png")
    monkeypatch.setattr(evaluate_module, "predict_images", lambda *a, **k: pytest.fail("images were read"))
    assert main(["evaluate", "--graph", str(graph_file), "--image_dir", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{folder / 'Cats'}: the folder gives the label 'cats', which is not one of the graph's labels" in error
    for flags, message in ((["--positive_label", "tb"], "--positive_label 'tb' is not one of the graph's labels"),
                           (["--json", str(tmp_path)], "is a folder, not a file name; choose another output path for --json"),
                           (["--report", str(graph_file)], "is a file, not a folder; choose another output path for --report")):
        shutil.rmtree(folder / "Cats")
        assert main(["evaluate", "--graph", str(graph_file), "--image_dir", str(folder), *flags]) == 2
        assert message in capsys.readouterr().err
        (folder / "Cats").mkdir()


def test_a_missing_class_is_allowed_and_said(graph, tmp_path, capsys):
    graph_file, _ = graph
    folder = labelled_folder(tmp_path / "only_pneumonia", classes=("pneumonia",))
    result = evaluate_folder(graph_file, folder, device="cpu", report=tmp_path / "report")
    out = capsys.readouterr().out
    assert f"No 'normal' folder in {folder} (allowed)" in out
    assert result["missing_classes"] == ["normal"] and result["n"] == 8
    assert result["specificity"]["value"] is None and result["roc_auc"]["value"] is None
    assert result["sensitivity"]["value"] == result["accuracy"]["value"]  # every image is pneumonia
    assert (tmp_path / "report" / "index.html").is_file()


def test_a_graph_without_an_internal_test_says_so(tiny_backbone, tmp_path, capsys):
    graph_file, _ = tiny_retrained_graph(tiny_backbone, tmp_path)
    result = evaluate_folder(graph_file, labelled_folder(tmp_path / "hospital"), device="cpu")
    assert result["internal_test"] is None and result["difference"] is None
    assert "The graph carries no internal test result" in capsys.readouterr().out


@pytest.mark.parametrize("low, high, expected", [
    (-0.13, -0.07, "The internal figure did not carry over: accuracy here is 10.0 points lower, more than chance "
                   "explains (a drop of 7.0 to 13.0 points, 95% CI)."),
    (-0.25, 0.05, "The internal figure carried over as far as these 40 images can tell: the difference is within "
                  "chance, but a drop of up to 25.0 points is not ruled out."),
    (0.02, 0.2, "Accuracy here is 10.0 points higher than the internal test, more than chance explains"),
])
def test_the_plain_sentence(low, high, expected):
    difference = -0.1 if high < 0 else (0.1 if low > 0 else -0.1)
    assert comparison_sentence(difference, low, high, 40).startswith(expected)
