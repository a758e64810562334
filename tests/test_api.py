"""The Python API at the package top (mini_retrain/api.py): README's example runs as written, with the real backbone,
on 4 + 4 demo X-rays; images in memory give the same answers as their files; bad arguments fail before any work."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mini_retrain
from tests.conftest import DEMO_DATA
from tests.test_docs import ROOT, _python_blocks

XRAYS = DEMO_DATA / "pneumonia-demo"
# 4 + 4 X-rays whose relative paths hash into each split at 20% / 20%: one test and one validation image per class.
TRAINING_SET = ["normal/NORMAL2-IM-1427-0001.jpeg", "normal/NORMAL2-IM-1440-0001.jpeg",
                "normal/NORMAL2-IM-1430-0001.jpeg", "normal/NORMAL2-IM-1431-0001.jpeg",
                "pneumonia/person1946_bacteria_4874.jpeg", "pneumonia/person1947_bacteria_4876.jpeg",
                "pneumonia/person1949_bacteria_4880.jpeg", "pneumonia/person1951_bacteria_4882.jpeg"]
NEW_XRAY = XRAYS / "normal" / "NORMAL2-IM-1442-0001.jpeg"  # never trained on


def test_import_is_light_and_the_api_is_at_the_top():
    code = "import sys, mini_retrain; print(sorted(m for m in ('numpy', 'onnxruntime', 'PIL') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    from mini_retrain import api

    assert (mini_retrain.retrain, mini_retrain.label, mini_retrain.explain) == (api.retrain, api.label, api.explain)
    assert set(mini_retrain.API) <= set(mini_retrain.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mini_retrain.nothing  # noqa: B018


def test_an_unknown_flag_is_named_with_the_one_meant(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rat'; did you mean learning_rate"):
        mini_retrain.retrain(tmp_path, learning_rat=0.1)
    with pytest.raises(TypeError, match="'colour'; the flags are image_dir, output_graph, "):
        mini_retrain.retrain(tmp_path, colour=True)


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    import mini_retrain.commands.retrain as retrain_module

    monkeypatch.setattr(retrain_module, "load_dataset", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="^learning_rate must be a finite number > 0, got 0"):
        mini_retrain.retrain(tmp_path, learning_rate=0)
    with pytest.raises(ValueError, match="output_graph must end in .onnx"):
        mini_retrain.retrain(tmp_path, output_graph="model.pb")
    with pytest.raises(ValueError, match=r"image 0: an image array must be \(height, width\) or \(height, width, 3\) "
                                         "uint8, got shape \\(4, 8, 8, 3\\)"):
        mini_retrain.label(tmp_path / "missing.onnx", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image 1: expected a path, a PIL image or a NumPy array, got int"):
        mini_retrain.label(tmp_path / "missing.onnx", [NEW_XRAY, 7])
    with pytest.raises(ValueError, match="missing.onnx: no such graph"):
        mini_retrain.label(tmp_path / "missing.onnx", NEW_XRAY)


def test_the_readme_example_runs_and_images_in_memory_match_their_files(tmp_path, monkeypatch, real_backbone_path):
    from mini_retrain.pipeline.images import read_image

    blocks = [code for code in _python_blocks(ROOT / "README.md") if "mini_retrain.retrain(" in code]
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 12
    for relative in TRAINING_SET:
        (tmp_path / "lungs" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(XRAYS / relative, tmp_path / "lungs" / relative)
    shutil.copyfile(NEW_XRAY, tmp_path / "new_xray.jpeg")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    text = printed.getvalue()
    assert "Final test accuracy = " in text and "(N=2, " in text  # retrain's own lines, through print
    assert re.search(r"^new_xray\.jpeg (normal|pneumonia) [01]\.\d+ (True|False)$", text, re.M)  # the label loop
    assert (tmp_path / "retrained_graph.onnx").is_file() and (tmp_path / "heat.png").is_file()

    # The same X-ray as a path, as a PIL image and as a NumPy array: the same scores (the same pixels reach the
    # network); str and os.PathLike are both accepted.
    grey = read_image(NEW_XRAY, keep_gray=True)
    results = mini_retrain.label(Path("retrained_graph.onnx"), ["new_xray.jpeg", grey, np.asarray(grey)],
                                 "retrained_graph.labels.txt")
    assert [result["image"] for result in results] == ["new_xray.jpeg", "image 1", "image 2"]
    assert results[1]["predictions"] == results[0]["predictions"] == results[2]["predictions"]
    assert {"ood_distance", "ood_threshold", "out_of_distribution"} <= set(results[0])
    rgb = np.asarray(read_image(NEW_XRAY))  # (H, W, 3) uint8
    assert mini_retrain.label("retrained_graph.onnx", rgb)[0]["predictions"] == results[0]["predictions"]

    maps = mini_retrain.explain("retrained_graph.onnx", [os.fspath(tmp_path / "new_xray.jpeg"), grey], "maps")
    assert [Path(m["heat_map"]).name for m in maps] == ["new_xray.cam.png", "image_1.cam.png"]
    assert maps[0]["cam"] == maps[1]["cam"] and maps[0]["label"] == results[0]["predictions"][0]["label"]
