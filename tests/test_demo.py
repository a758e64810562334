"""`mini_retrain demo`, as a newcomer runs it: short paths, one line per warning, and an ending that says what the
numbers mean and what to run next. On the real network and the bundled X-rays."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from mini_retrain.cli import main
from mini_retrain.commands.demo import explain_run
from mini_retrain.settings import RetrainSettings


def test_the_demo_explains_itself(tmp_path, real_backbone_path, monkeypatch):
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path / "home"))  # its bottlenecks go here, not to the user's cache
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["demo", "--backbone", str(real_backbone_path), "--device", "cpu"]) == 0
    text = out.getvalue()
    assert "site-packages" not in text and "demo_data" not in text and str(tmp_path) not in text.replace(
        str(tmp_path / "home"), "")
    assert "mini_retrain_demo/held_out/pneumonia/person1954_bacteria_4886.jpeg" in text.splitlines()
    assert "mini_retrain_demo/photos/chelsea.png" in text.splitlines()
    assert len(re.findall(r"less than 20 images", text)) == 1
    assert re.search(r"^Trained 500 steps in .* \(\d+ training images, batch \d+: --train_batch_size 16 capped at the "
                     r"training set\)$", text, re.M)
    ending = text.split("== 4. What this run shows ==\n")[1]
    assert "no figure from 14 images can be trusted" in ending
    assert re.search(r"ROC AUC \d\.\d{3} and accuracy \d+% measure different things", ending)
    assert "flagged as unlike the training images" in ending
    assert ending.splitlines()[-2] == "  mini_retrain retrain --image_dir YOUR_FOLDER --report report/"
    assert (tmp_path / "mini_retrain_demo" / "retrained_graph.onnx").is_file()
    assert (tmp_path / "mini_retrain_demo" / "retrained_graph.labels.txt").is_file()


def test_a_wrong_held_out_film_gets_a_comment():
    evaluation = {"n": 4, "accuracy": {"estimate": 0.5, "ci": [0.15, 0.85]}, "roc_auc": {"estimate": 1.0},
                  "run": {"classes": {"normal": {"training": 5}, "pneumonia": {"training": 5}}}}
    held_out = [{"image": "mini_retrain_demo/held_out/pneumonia/p.jpeg",
                 "predictions": [{"label": "normal", "score": 0.95546}, {"label": "pneumonia", "score": 0.04454}]},
                {"image": "mini_retrain_demo/held_out/normal/n.jpeg",
                 "predictions": [{"label": "normal", "score": 0.9}, {"label": "pneumonia", "score": 0.1}]}]
    lines = explain_run(evaluation, held_out, [], RetrainSettings(image_dir=Path("x"), output_graph=Path("g.onnx")))
    wrong = [line for line in lines if "held-out" in line]
    assert wrong == ["- The held-out pneumonia film p.jpeg was called normal (score = 0.95546): wrong, and confident. "
                     "A score is how far the film lies on one side of the boundary the 10 training films drew, not "
                     "the chance of being right."]
    assert any("one answer more or less right moves the accuracy by 25 points" in line for line in lines)
    assert any("ROC AUC 1.000 and accuracy 50% measure different things" in line and
               "the ranking is right but the cut is not" in line for line in lines)


def test_the_demo_finds_its_bundled_images(tmp_path):
    """The demo finds the images bundled with the package (the layout move once left it looking in
    mini_retrain/commands/demo_data, which does not exist)."""
    from mini_retrain.commands.demo import DEMO_DATA, HELD_OUT, PHOTOS, prepare_demo_images

    assert all((DEMO_DATA / name).is_file() for name in HELD_OUT + PHOTOS)
    image_dir = prepare_demo_images(tmp_path)
    copied = sorted(path.relative_to(image_dir).as_posix() for path in image_dir.glob("*/*.jpeg"))
    assert len(copied) == 14 and {path.split("/")[0] for path in copied} == {"normal", "pneumonia"}
    assert not {name.split("/", 1)[1] for name in HELD_OUT} & set(copied)  # the held-out two are not trained on
