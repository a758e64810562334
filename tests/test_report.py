"""Tests for mini_retrain.evaluation.report: the page shows the right numbers, links only plots that exist, escapes text.

Expected numbers are recomputed here by independent means (loops over images and over positive/negative
pairs, the other closed form of the Wilson interval, the standard library's normal quantile), never read
back from metrics.evaluate. Plot tests need matplotlib, an optional extra, so they skip without it.
"""

import math
import re
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mini_retrain.evaluation.metrics import evaluate
from mini_retrain.evaluation.report import INSTALL_HINT, PLOT_FILES, write_report

Z95 = NormalDist().inv_cdf(0.975)
TWO_CLASSES = ["normal", "abnormal"]  # "abnormal" is the positive class


def _two_class_data(seed: int = 0, n: int = 69):
    """Noisy scores for 'abnormal' that mostly separate the classes; probabilities (n, 2), labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.25, n), 0.0, 1.0)
    return np.c_[1 - scores, scores], labels


def _history(steps: int = 5, validation: bool = True) -> list[dict]:
    rows = []
    for step in range(0, 10 * steps, 10):
        row = {"step": step, "train_accuracy": 0.5 + step / 200, "cross_entropy": 0.7 / (1 + step / 10)}
        if validation:
            row.update(validation_accuracy=0.5 + step / 250, validation_n=40)
        rows.append(row)
    return rows


def _hide_matplotlib(monkeypatch) -> None:
    """Make `import matplotlib` (and any submodule) fail as if the optional extra were not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


class _Tables(HTMLParser):
    """Collects every <table> as {caption: [[cell text, ...], ...]} and every <img src>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._rows, self._cell, self._caption = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows, self._caption = [], ""
        elif tag == "caption":
            self._cell = ""
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "caption":
            self._caption, self._cell = self._cell, None
        elif tag in ("td", "th"):
            self._rows[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self.tables[self._caption] = self._rows

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _parse(index: Path) -> _Tables:
    parser = _Tables()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def _table(parsed: _Tables, caption_start: str) -> list[list[str]]:
    matches = [rows for caption, rows in parsed.tables.items() if caption.startswith(caption_start)]
    assert len(matches) == 1, f"expected one table captioned {caption_start!r}, got {list(parsed.tables)}"
    return matches[0]


def _wilson_text(k: int, n: int) -> str:
    """'95% CI a-b%' from the other textbook form (2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2))."""
    p = k / n
    root = Z95 * math.sqrt(Z95 * Z95 + 4 * n * p * (1 - p))
    low = (2 * n * p + Z95 * Z95 - root) / (2 * (n + Z95 * Z95))
    high = (2 * n * p + Z95 * Z95 + root) / (2 * (n + Z95 * Z95))
    return f"95% CI {100 * low:.1f}-{100 * high:.1f}%"


# ---------------------------------------------------------------- numbers on the page


def test_page_shows_accuracy_sensitivity_specificity_auc_and_ece_worked_out_independently(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)  # the numbers do not depend on the plots; this keeps the test fast
    probabilities, labels = _two_class_data()
    index = write_report(tmp_path, _history(), evaluate(probabilities, labels, TWO_CLASSES), TWO_CLASSES)
    page = index.read_text(encoding="utf-8")

    predicted = [int(p[1] > p[0]) for p in probabilities]  # no exact ties in this data
    right = sum(int(p == t) for p, t in zip(predicted, labels))
    assert f"{100 * right / len(labels):.1f}%" in page
    assert f"{right}/{len(labels)} right (N={len(labels)}, {_wilson_text(right, len(labels))})" in page
    for cls in (1, 0):  # sensitivity = recall of abnormal, specificity = recall of normal
        size = sum(int(t == cls) for t in labels)
        found = sum(int(t == cls and p == cls) for p, t in zip(predicted, labels))
        name = TWO_CLASSES[cls]
        assert f"{100 * found / size:.1f}%" in page
        assert f"{found}/{size} {name} images called {name} ({_wilson_text(found, size)})" in page

    # AUC and DeLong's interval by brute force over every (positive, negative) pair.
    positives = [p[1] for p, t in zip(probabilities, labels) if t == 1]
    negatives = [p[1] for p, t in zip(probabilities, labels) if t == 0]
    psi = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in negatives] for x in positives])
    auc = psi.mean()
    halfwidth = Z95 * math.sqrt(psi.mean(axis=1).var(ddof=1) / len(positives)
                                + psi.mean(axis=0).var(ddof=1) / len(negatives))
    assert f"<td>{auc:.3f}</td>" in page
    assert f"95% CI {max(0.0, auc - halfwidth):.3f}-{min(1.0, auc + halfwidth):.3f}" in page

    # ECE with a loop: bin b holds confidences in (b/10, (b+1)/10].
    gaps = np.zeros(10)
    counts = np.zeros(10)
    for p, t in zip(probabilities, labels):
        confidence = max(p)
        b = min(max(math.ceil(confidence * 10) - 1, 0), 9)
        gaps[b] += (int(np.argmax(p) == t)) - confidence
        counts[b] += 1
    ece = np.abs(gaps).sum() / len(labels)
    assert f"<td>{ece:.3f}</td>" in page
    reliability = _table(_parse(index), "Reliability table")
    assert [int(row[1]) for row in reliability[1:]] == counts.astype(int).tolist()
    assert "not a diagnostic device" in page.lower()


def test_confusion_matrix_table_counts_true_rows_and_predicted_columns(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    probabilities = rng.dirichlet([1, 1, 1], size=50)
    labels = rng.integers(0, 3, 50)
    index = write_report(tmp_path, _history(), evaluate(probabilities, labels, names), names)

    expected = [[0] * 3 for _ in range(3)]
    for p, t in zip(probabilities, labels):
        expected[t][int(np.argmax(p))] += 1
    rows = _table(_parse(index), "Rows = true class")
    assert rows[0][1:] == names
    assert [row[0] for row in rows[1:]] == names
    assert [[int(cell) for cell in row[1:]] for row in rows[1:]] == expected
    per_class = _table(_parse(index), "Per class")
    assert [int(row[1]) for row in per_class[1:]] == [sum(row) for row in expected]


def test_history_is_listed_step_by_step_and_the_last_row_is_summarised(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    probabilities, labels = _two_class_data()
    history = _history(steps=4)
    index = write_report(tmp_path, history, evaluate(probabilities, labels, TWO_CLASSES), TWO_CLASSES)
    rows = _table(_parse(index), "Training history")
    assert [int(row[0]) for row in rows[1:]] == [0, 10, 20, 30]
    # step 30: train 0.5 + 30/200 = 65.0%, cross-entropy 0.7/4 = 0.1750, validation 0.5 + 30/250 = 62.0%
    assert rows[-1] == ["30", "65.0%", "0.1750", "62.0%", "40"]
    assert "step 30): train batch accuracy 65.0%, cross-entropy 0.1750, validation accuracy 62.0% (N=40)" in (
        index.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- plots


def test_with_matplotlib_every_plot_is_a_real_png_linked_from_the_page(tmp_path):
    pytest.importorskip("matplotlib")
    probabilities, labels = _two_class_data()
    evaluation = evaluate(probabilities, labels, TWO_CLASSES)
    index = write_report(tmp_path / "report", _history(), evaluation, TWO_CLASSES)

    assert index == tmp_path / "report" / "index.html"
    parsed = _parse(index)
    assert sorted(parsed.images) == sorted(PLOT_FILES)
    for name in PLOT_FILES:
        path = tmp_path / "report" / name
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert len(colours) > 10, f"{name} looks blank"
        with Image.open(path) as image:
            image.verify()  # raises on a truncated or corrupt file
    page = index.read_text(encoding="utf-8")
    assert INSTALL_HINT not in page
    assert f"<td>{evaluation['roc_auc']['estimate']:.3f}</td>" in page
    assert not list((tmp_path / "report").glob(".*.tmp"))  # atomic writes left no temporary files


def test_without_matplotlib_the_page_keeps_every_table_says_how_to_get_plots_and_has_no_img(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401  (the simulation works)
    probabilities, labels = _two_class_data()
    index = write_report(tmp_path, _history(), evaluate(probabilities, labels, TWO_CLASSES), TWO_CLASSES)
    page = index.read_text(encoding="utf-8")
    assert "install mini_retrain[report] for the plots" in page
    assert "<img" not in page
    assert not list(tmp_path.glob("*.png"))
    parsed = _parse(index)
    for caption in ("Test set of 69 images", "Rows = true class", "Per class", "Reliability table",
                    "Training history"):
        assert len(_table(parsed, caption)) > 1


def test_plots_of_an_earlier_run_are_removed_when_not_drawn_again(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    probabilities, labels = _two_class_data()
    evaluation = evaluate(probabilities, labels, TWO_CLASSES)
    write_report(tmp_path, _history(), evaluation, TWO_CLASSES)
    assert (tmp_path / "roc_curve.png").exists()
    _hide_matplotlib(monkeypatch)
    index = write_report(tmp_path, _history(), evaluation, TWO_CLASSES)
    assert not list(tmp_path.glob("*.png"))
    assert "<img" not in index.read_text(encoding="utf-8")


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_three_classes_have_no_roc_curve_and_no_broken_link(tmp_path, monkeypatch, with_matplotlib):
    if with_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        _hide_matplotlib(monkeypatch)
    rng = np.random.default_rng(2)
    names = ["normal", "tb", "other"]
    evaluation = evaluate(rng.dirichlet([1, 1, 1], size=40), rng.integers(0, 3, 40), names)
    index = write_report(tmp_path, _history(validation=False), evaluation, names)

    page = index.read_text(encoding="utf-8")
    assert not (tmp_path / "roc_curve.png").exists()
    assert "roc_curve.png" not in page and "ROC AUC" not in page
    images = _parse(index).images
    assert all((tmp_path / src).is_file() for src in images)
    expected = {"learning_curves.png", "confusion_matrix.png", "reliability.png"} if with_matplotlib else set()
    assert set(images) == expected


def test_one_class_test_set_says_why_there_is_no_roc_curve(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    probabilities = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([1, 1, 1])  # no normal image: no ROC curve, no AUC
    index = write_report(tmp_path, _history(), evaluate(probabilities, labels, TWO_CLASSES), TWO_CLASSES)
    page = index.read_text(encoding="utf-8")
    assert "the test set has only one class" in page
    assert "roc_curve.png" not in page
    assert "66.7%" in page  # 2 of 3 right


def test_plot_text_with_dollar_signs_is_drawn_as_plain_text(tmp_path):
    pytest.importorskip("matplotlib")
    names = [r"$\frac{$", "a$b"]  # between two $ matplotlib parses TeX math, and this is not valid TeX
    probabilities, labels = _two_class_data(n=20)
    write_report(tmp_path, _history(), evaluate(probabilities, labels, names, positive_label="a$b"), names)
    for name in PLOT_FILES:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


# ---------------------------------------------------------------- escaping, edge cases, validation


def test_labels_and_title_are_html_escaped(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    names = ["<b>x</b>", "normal & co"]
    probabilities, labels = _two_class_data(n=20)
    index = write_report(tmp_path, _history(), evaluate(probabilities, labels, names), names,
                         title="<script>alert(1)</script>")
    page = index.read_text(encoding="utf-8")
    assert "<b>" not in page and "<script>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "normal &amp; co" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@settings(max_examples=25, deadline=None)
# Control characters are left out: HTML turns a carriage return into a newline (so does reading in text mode),
# and a class is a folder name, which never holds one.
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12),
                min_size=2, max_size=2, unique=True))
def test_any_class_name_reads_back_unchanged_from_the_confusion_table(names):
    probabilities, labels = _two_class_data(n=12)
    with pytest.MonkeyPatch.context() as monkeypatch, tempfile.TemporaryDirectory() as folder:
        _hide_matplotlib(monkeypatch)
        index = write_report(Path(folder), [], evaluate(probabilities, labels, names), names)
        rows = _table(_parse(index), "Rows = true class")
    assert rows[0][1:] == names
    assert [row[0] for row in rows[1:]] == names


def test_no_test_set_still_writes_a_page_with_the_learning_curves(tmp_path):
    index = write_report(tmp_path, _history(), {"n": 0}, TWO_CLASSES)
    page = index.read_text(encoding="utf-8")
    assert "No test images" in page
    assert _table(_parse(index), "Training history")
    assert not (tmp_path / "confusion_matrix.png").exists()
    assert all((tmp_path / src).is_file() for src in _parse(index).images)


def test_history_without_validation_and_empty_history(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    probabilities, labels = _two_class_data()
    evaluation = evaluate(probabilities, labels, TWO_CLASSES)
    rows = _table(_parse(write_report(tmp_path, _history(validation=False), evaluation, TWO_CLASSES)),
                  "Training history")
    assert all(row[3] == "n/a" for row in rows[1:])
    page = write_report(tmp_path, [], evaluation, TWO_CLASSES).read_text(encoding="utf-8")
    assert "No training history was recorded." in page


def test_bad_inputs_raise_one_line_value_errors(tmp_path):
    probabilities, labels = _two_class_data(n=10)
    evaluation = evaluate(probabilities, labels, TWO_CLASSES)
    with pytest.raises(ValueError, match=re.escape("differ from the evaluation's class_names")):
        write_report(tmp_path, [], evaluation, ["abnormal", "normal"])
    with pytest.raises(ValueError, match=re.escape("history[1] lacks ['cross_entropy']")):
        write_report(tmp_path, [{"step": 0, "train_accuracy": 1, "cross_entropy": 0},
                                {"step": 1, "train_accuracy": 1}], evaluation, TWO_CLASSES)
    with pytest.raises(ValueError, match="metrics.evaluate"):
        write_report(tmp_path, [], {"accuracy": 0.9}, TWO_CLASSES)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_report(a_file, [], evaluation, TWO_CLASSES)


# ---------------------------------------------------------------- what a newcomer needs (issue 15)


RUN = {"command": "mini_retrain retrain --image_dir /data/lungs --random_seed 3", "image_dir": "/data/lungs",
       "classes": {"normal": {"training": 40, "validation": 5, "testing": 6},
                   "pneumonia": {"training": 38, "validation": 4, "testing": 10}},
       "flags": {"image_dir": "/data/lungs", "learning_rate": 0.01, "random_seed": 3, "report": None},
       "random_seed": 3, "version": "9.9.9", "date": "2026-12-01T10:00:00+00:00", "ood_threshold": 42.5}


def _small_evaluation():
    """6 normal + 10 pneumonia test images, perfectly ranked: AUC 1.000 with a DeLong interval of 1.000-1.000."""
    scores = np.r_[np.linspace(0.05, 0.3, 6), np.linspace(0.7, 0.95, 10)]
    labels = np.r_[np.zeros(6, int), np.ones(10, int)]
    return evaluate(np.c_[1 - scores, scores], labels, ["normal", "pneumonia"])


def test_the_page_records_the_run(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    evaluation = dict(_small_evaluation(), run=RUN)
    parsed = _parse(write_report(tmp_path, _history(), evaluation, ["normal", "pneumonia"]))
    facts = dict((row[0], row[1]) for row in _table(parsed, "What was run")[1:])
    assert facts["Data folder"] == "/data/lungs"
    page = (tmp_path / "index.html").read_text()
    assert "<pre>mini_retrain retrain --image_dir /data/lungs \\\n    --random_seed 3</pre>" in page
    assert facts["Random seed"] == "3" and facts["mini_retrain version"] == "9.9.9"
    assert facts["Date"] == RUN["date"] and facts["Out-of-distribution threshold"].startswith("42.50 ")
    assert _table(parsed, "Images per class and split") == [
        ["Class", "training", "validation", "testing", "all"], ["normal", "40", "5", "6", "51"],
        ["pneumonia", "38", "4", "10", "52"], ["all", "78", "9", "16", "103"]]
    assert ["--learning_rate", "0.01"] in _table(parsed, "Flags of the run")
    assert ["--report", "(not given)"] in _table(parsed, "Flags of the run")


def test_intervals_on_too_few_images_say_so(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    page = write_report(tmp_path, [], dict(_small_evaluation(), run=RUN), ["normal", "pneumonia"]).read_text()
    assert "95% CI 1.000-1.000 (DeLong) on 10 + 6 images: too few to trust" in page
    assert "(N=16, 95% CI 80.6-100.0%): on 16 images, too few to trust" in page
    assert "run mini_retrain crossval --image_dir /data/lungs" in page
    # With 30 and more images of each class, no such words.
    probabilities, labels = _two_class_data(n=200)
    page = write_report(tmp_path, [], evaluate(probabilities, labels, TWO_CLASSES), TWO_CLASSES).read_text()
    assert "too few to trust" not in page and "(DeLong) on " in page


def test_misclassified_images_are_listed_with_their_heat_maps(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "b.cam.png").write_bytes(b"png")
    evaluation = dict(_small_evaluation(), misclassified=[
        {"file": "pneumonia/b.jpeg", "true": "pneumonia", "predicted": "normal", "score": 0.9},
        {"file": "normal/<a>.jpeg", "true": "normal", "predicted": "pneumonia", "score": 0.6}])
    index = write_report(tmp_path / "report", [], evaluation, ["normal", "pneumonia"],
                         heat_maps={"pneumonia/b.jpeg": maps / "b.cam.png"})
    parsed = _parse(index)
    rows = _table(parsed, "2 of 16 test images")
    assert rows[1][:3] == ["pneumonia/b.jpeg", "pneumonia", "normal (score = 0.90000)"]
    assert rows[2][0] == "normal/<a>.jpeg"  # escaped on the page, read back unchanged
    assert parsed.images == ["../maps/b.cam.png"] and (index.parent / parsed.images[0]).is_file()
    page = write_report(tmp_path / "r2", [], dict(evaluation, misclassified=[]), ["normal", "pneumonia"]).read_text()
    assert "None: every test image was classified right." in page


def test_prose_is_left_aligned_and_plots_take_the_page_width(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    page = write_report(tmp_path, [], _small_evaluation(), ["normal", "pneumonia"]).read_text()
    assert re.search(r"<td>16/16 right|<td class=\"text\">16/16 right", page)
    assert '<td class="text">16/16 right' in page  # the Detail column
    assert "td.text" in page and "text-align:left" in page and "img{width:100%" in page


def test_missing_matplotlib_is_said_on_the_console_too(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    said = []
    write_report(tmp_path, [], _small_evaluation(), ["normal", "pneumonia"], log=said.append)
    assert said == [f"WARNING: the report has no plots, only tables: matplotlib is missing; {INSTALL_HINT}"]


@pytest.mark.parametrize("names", [["normal", "pneumonia"], ["no finding", "pleural effusion", "pneumonia"]])
def test_no_text_of_any_plot_is_cut_off_at_the_figure_edge(names):
    """The confusion matrix's "true class" label sat left of the figure with a class called "pneumonia"."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mini_retrain.evaluation import report

    rng = np.random.default_rng(1)
    labels = np.arange(40) % len(names)
    probabilities = rng.dirichlet(np.ones(len(names)), 40)
    evaluation = evaluate(probabilities, labels, names)
    figures = [report._confusion_matrix_figure(evaluation, names), report._reliability_figure(evaluation),
               report._learning_curves_figure(_history())]
    if len(names) == 2:
        figures.append(report._roc_curve_figure(evaluation))
    for figure in figures:
        FigureCanvasAgg(figure)
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        texts = []
        for axes in figure.axes:
            texts += [axes.title, axes.xaxis.label, axes.yaxis.label]
            texts += axes.get_legend().get_texts() if axes.get_legend() else []
            for axis in (axes.xaxis, axes.yaxis):  # only the ticks inside the axis limits are drawn
                low, high = sorted(axis.get_view_interval())
                texts += [tick.label1 for tick in axis.get_major_ticks() if low <= tick.get_loc() <= high]
        texts = [t for t in texts if t.get_text() and t.get_visible()]
        assert any(t.get_text() == "true class" for t in texts) or figure is not figures[0]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= -0.5 and box.y0 >= -0.5, text.get_text()
            assert box.x1 <= figure.bbox.x1 + 0.5 and box.y1 <= figure.bbox.y1 + 0.5, text.get_text()
