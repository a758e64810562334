"""label on a tiny graph: batched results equal one image at a time, lines stream, skips are said once, exit codes."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mini_retrain.cli import main
from mini_retrain.commands import label as label_module
from mini_retrain.commands.label import label_stream, print_labels
from mini_retrain.pipeline.retrained_graph import load_retrained, model_input, predict_images
from tests.conftest import DEMO_DATA, tiny_retrained_graph

XRAYS = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))
PHOTOS = sorted((DEMO_DATA / "photos").glob("*.png"))


@pytest.fixture
def tiny_graph(tiny_backbone, tmp_path):
    return tiny_retrained_graph(tiny_backbone, tmp_path)


def images_with_a_bad_one(folder):
    """Six X-rays, a broken file in the middle, a photo: 8 paths."""
    broken = folder / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return XRAYS[:3] + [broken] + XRAYS[3:6] + [PHOTOS[0]]


def test_batched_results_equal_one_image_at_a_time(tiny_graph, tmp_path):
    model = load_retrained(*tiny_graph, device="cpu")
    paths = images_with_a_bad_one(tmp_path)
    batched = list(predict_images(model, paths, batch_size=3, workers=2))
    assert [p.image for p in batched] == [str(path) for path in paths]
    assert [p.error is not None for p in batched] == [path.name == "broken.jpeg" for path in paths]
    for prediction in batched:
        if prediction.error is not None:
            assert prediction.probabilities is None and "broken.jpeg" in str(prediction.error)
            continue
        # The one-image path, written out: decode, run the graph on a batch of one.
        alone = model.session.run(["final_result", "ood_distance"], {"images": model_input(model, Path(prediction.image))[None]})
        np.testing.assert_allclose(prediction.probabilities, alone[0][0], rtol=1e-5, atol=1e-6)
        assert prediction.distances["ood_distance"] == pytest.approx(float(alone[1][0]), rel=1e-4, abs=1e-5)
    # And the whole label records, batch of 1 against batch of 32.
    one = list(label_stream(model, paths, batch_size=1, workers=1))
    many = list(label_stream(model, paths, batch_size=32, workers=2))
    assert [r["image"] for r in one] == [r["image"] for r in many]
    for a, b in zip(one, many):
        assert a.keys() == b.keys()
        if "predictions" in a:
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            np.testing.assert_allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]],
                                       rtol=1e-5, atol=1e-6)
            assert a["out_of_distribution"] == b["out_of_distribution"]


def test_results_stream_before_later_batches_are_read(tiny_graph, tmp_path):
    """The third batch's file is written only after the first result arrived: it was not read before then."""
    model = load_retrained(*tiny_graph, device="cpu")
    late = tmp_path / "late.jpeg"
    results = label_stream(model, [XRAYS[0], XRAYS[1], late], batch_size=1, workers=1)
    first = next(results)
    assert first["image"] == str(XRAYS[0])
    shutil.copyfile(XRAYS[2], late)
    rest = list(results)
    assert [r["image"] for r in rest] == [str(XRAYS[1]), str(late)] and "predictions" in rest[1]


def test_text_output_says_each_skip_once_and_json_is_one_array(tiny_graph, tmp_path, capsys):
    graph, labels = tiny_graph
    paths = images_with_a_bad_one(tmp_path)
    assert main(["label", "--graph", str(graph), "--labels", str(labels), "--device", "cpu",
                 "--image", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("broken.jpeg") == 1
    assert f"Skipping {paths[3]}: " in captured.out
    assert captured.out.splitlines()[0] == str(paths[0])
    assert "WARNING: this image is unlike the training images" in captured.out  # the photo
    assert main(["label", "--graph", str(graph), "--device", "cpu", "--json", "--image", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert captured.out == json.dumps(records, indent=2) + "\n"  # written record by record, read as one
    assert [r["image"] for r in records] == list(map(str, paths)) and "error" in records[3]
    assert captured.err.count("broken.jpeg") == 1 and f"Skipping {paths[3]}: " in captured.err
    assert records[-1]["out_of_distribution"] is True


def test_nothing_labelled_exits_non_zero(tiny_graph, tmp_path, capsys):
    graph, _ = tiny_graph
    bad = [tmp_path / "a.jpeg", tmp_path / "b.png"]
    for path in bad:
        path.write_bytes(b"not an image")
    for extra in ([], ["--json"]):
        assert main(["label", "--graph", str(graph), "--device", "cpu", *extra, "--image", *map(str, bad)]) == 2
        err = capsys.readouterr().err
        assert "mini_retrain: error: none of the 2 image(s) could be read" in err


def test_progress_line_on_long_runs_only(tiny_graph, monkeypatch):
    model = load_retrained(*tiny_graph, device="cpu")
    for above, expected in ((100, False), (3, True)):
        monkeypatch.setattr(label_module, "PROGRESS_ABOVE", above)
        out, err = io.StringIO(), io.StringIO()
        assert print_labels(model, XRAYS[:5], as_json=True, stdout=out, stderr=err) == 5
        assert len(json.loads(out.getvalue())) == 5
        lines = err.getvalue().splitlines()
        if expected:
            assert lines[0] == "Labelling: 0/5" and lines[-1].startswith("Labelling: 5/5 (")
            assert "images/s, about" in lines[-1]
        else:
            assert lines == []


def test_num_top_predictions_is_checked_before_any_image(tiny_graph):
    model = load_retrained(*tiny_graph, device="cpu")
    with pytest.raises(ValueError, match="^num_top_predictions must be at least 1"):
        label_stream(model, [DEMO_DATA / "missing.png"], num_top_predictions=0)
