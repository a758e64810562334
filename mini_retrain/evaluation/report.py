"""The training report: one folder with index.html and four plots, every plot next to its numbers.

The console ends with a few lines (metrics.format_evaluation). This page shows the same evaluation
so it can be read, shared and questioned:

    learning_curves.png   train/validation accuracy and cross-entropy per evaluation step
    roc_curve.png         two classes only: sensitivity against 1 - specificity over all thresholds
    confusion_matrix.png  rows = true class, columns = predicted class, with counts
    reliability.png       accuracy against confidence per bin, with the diagonal of perfect calibration
    index.html            the plots, the numbers with their confidence intervals, and how to read them

Plots need matplotlib, an optional extra (`pip install mini_retrain[report]`). It is imported only
here, through its object-oriented API (Figure + the Agg canvas) so no global pyplot state or display
is touched. Without it the page still has every number, as HTML tables, and says how to get the plots.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np

from mini_retrain.paths import write_bytes_atomically

PLOT_FILES = ("learning_curves.png", "roc_curve.png", "confusion_matrix.png", "reliability.png")
INSTALL_HINT = "install mini_retrain[report] for the plots (pip install 'mini_retrain[report]')"
NOT_A_DEVICE = (
    "Not a diagnostic device. mini_retrain is a teaching and research tool. These numbers describe how this "
    "model did on one test set; they are not evidence that it is safe or accurate for any patient, and it must "
    "not be used to make clinical decisions."
)


def write_report(folder: Path, history: list[dict], evaluation: dict, labels: list[str],
                 title: str = "mini_retrain training report") -> Path:
    """Write index.html and the plots into `folder`; return the path of index.html.

    history: train.train_final_layer's rows {step, train_accuracy, cross_entropy[, validation_accuracy,
    validation_n]}. evaluation: metrics.evaluate's dict (or {"n": 0} when there was no test set).
    labels: the class names, in the order of the final layer's outputs.
    """
    folder = Path(folder)
    labels = [str(label) for label in labels]
    _check_inputs(folder, history, evaluation, labels)
    has_test = evaluation["n"] > 0
    folder.mkdir(parents=True, exist_ok=True)

    plots_possible = _matplotlib_installed()
    plots: dict[str, bytes] = {}
    if plots_possible:
        if history:
            plots["learning_curves.png"] = _learning_curves_png(history)
        if has_test and evaluation.get("roc_curve"):
            plots["roc_curve.png"] = _roc_curve_png(evaluation)
        if has_test:
            plots["confusion_matrix.png"] = _confusion_matrix_png(evaluation, labels)
            plots["reliability.png"] = _reliability_png(evaluation)
    for name in PLOT_FILES:  # a plot from an earlier run that this one did not draw would be stale
        if name in plots:
            write_bytes_atomically(folder / name, plots[name])
        else:
            (folder / name).unlink(missing_ok=True)

    page = _html_page(title, history, evaluation, labels, set(plots), plots_possible)
    return write_bytes_atomically(folder / "index.html", page.encode("utf-8"))  # last: the plots exist by now


def _check_inputs(folder: Path, history: list[dict], evaluation: dict, labels: list[str]) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"report folder {folder} is a file; pass a folder (it is created if missing)")
    if not isinstance(evaluation, dict) or "n" not in evaluation:
        raise ValueError("evaluation must be the dict returned by mini_retrain.evaluation.metrics.evaluate")
    if evaluation["n"] > 0:
        if evaluation.get("class_names") != labels:
            raise ValueError(
                f"labels {labels} differ from the evaluation's class_names {evaluation.get('class_names')}; "
                "pass the same class names, in the same order"
            )
    for index, row in enumerate(history):
        missing = {"step", "train_accuracy", "cross_entropy"} - set(row)
        if missing:
            raise ValueError(f"history[{index}] lacks {sorted(missing)}; pass train_final_layer's history rows")


def _matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401  (the optional extra; only its presence is checked here)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- plots (matplotlib, object-oriented API)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_bytes(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attach the Agg (anti-grain, raster, no display) canvas to this figure only
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plain(text: str) -> str:
    """Matplotlib reads text between two $ as TeX math; a class name is plain text, so escape the $."""
    return text.replace("$", r"\$")


def _learning_curves_png(history: list[dict]) -> bytes:
    """Left: accuracy (%) per step, train batch and validation batch. Right: train cross-entropy."""
    figure = _new_figure(10, 4)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    steps = [row["step"] for row in history]
    marker = "o" if len(history) <= 30 else None  # dots help when there are few evaluations
    accuracy_axes.plot(steps, [100 * row["train_accuracy"] for row in history], marker=marker, label="train batch")
    validated = [row for row in history if row.get("validation_accuracy") is not None]
    if validated:
        accuracy_axes.plot([row["step"] for row in validated], [100 * row["validation_accuracy"] for row in validated],
                           marker=marker, label="validation batch")
    accuracy_axes.set(title="Accuracy", xlabel="training step", ylabel="accuracy (%)", ylim=(0, 102))
    accuracy_axes.legend(loc="lower right")
    loss_axes.plot(steps, [row["cross_entropy"] for row in history], marker=marker, color="tab:red")
    loss_axes.set(title="Cross-entropy (train batch)", xlabel="training step", ylabel="cross-entropy (nats)")
    loss_axes.set_ylim(bottom=0)
    for axes in (accuracy_axes, loss_axes):
        axes.grid(alpha=0.3)
    return _png_bytes(figure)


def _roc_curve_png(evaluation: dict) -> bytes:
    """The ROC curve, the chance diagonal and this model's operating point (the most probable class)."""
    figure = _new_figure(5.5, 5.5)
    axes = figure.subplots()
    curve, auc = evaluation["roc_curve"], evaluation["roc_auc"]
    level = f"{100 * evaluation['confidence']:g}%"
    auc_text = "AUC n/a" if auc["estimate"] is None else f"AUC = {auc['estimate']:.3f}"
    if auc["estimate"] is not None and auc["ci"][0] is not None:
        auc_text += f" ({level} CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})"
    # Straight segments between the points: a run of tied scores moves both rates at once (a diagonal step).
    axes.plot(curve["fpr"], curve["tpr"], label=auc_text)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUC = 0.5)")
    sensitivity, specificity = evaluation["sensitivity"]["estimate"], evaluation["specificity"]["estimate"]
    if sensitivity is not None and specificity is not None:
        axes.plot([1 - specificity], [sensitivity], "o", color="black", label="this model (most probable class)")
    axes.set(title=_plain(f"ROC curve (positive class: {evaluation['positive_label']})"),
             xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _png_bytes(figure)


def _confusion_matrix_png(evaluation: dict, labels: list[str]) -> bytes:
    """Counts[true, predicted]; the colour is the share of the true class (the row), so rows compare fairly."""
    counts = np.asarray(evaluation["confusion_matrix"], dtype=np.int64)  # (classes, classes)
    row_sums = counts.sum(axis=1, keepdims=True)  # (classes, 1) images truly in each class
    shares = counts / np.maximum(row_sums, 1)  # (classes, classes) an empty class shows as 0
    size = 2.5 + 0.9 * len(labels)
    figure = _new_figure(size + 1.2, size)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for true in range(counts.shape[0]):
        for predicted in range(counts.shape[1]):
            axes.text(predicted, true, f"{counts[true, predicted]}\n({100 * shares[true, predicted]:.0f}%)",
                      ha="center", va="center", color="white" if shares[true, predicted] > 0.5 else "black")
    ticks = range(len(labels))
    names = [_plain(label) for label in labels]
    axes.set_xticks(ticks, names, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    axes.set_yticks(ticks, names)
    axes.set(title="Confusion matrix", xlabel="predicted class", ylabel="true class")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return _png_bytes(figure)


def _reliability_png(evaluation: dict) -> bytes:
    """Top: accuracy per confidence bin against the diagonal. Bottom: how many images each bin holds."""
    bins = evaluation["calibration"]["bins"]
    figure = _new_figure(5.5, 6.5)
    reliability_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = [row for row in bins if row["count"] > 0]
    lows = [row["bin_low"] for row in filled]
    widths = [row["bin_high"] - row["bin_low"] for row in filled]
    reliability_axes.bar(lows, [row["accuracy"] for row in filled], width=widths, align="edge",
                         edgecolor="black", alpha=0.7, label="accuracy in bin")
    reliability_axes.plot([row["mean_confidence"] for row in filled], [row["accuracy"] for row in filled], "o",
                          color="black", label="(mean confidence, accuracy)")
    reliability_axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    reliability_axes.set(title=f"Reliability (ECE = {evaluation['calibration']['ece']:.3f})",
                         ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    reliability_axes.legend(loc="upper left")
    reliability_axes.grid(alpha=0.3)
    count_axes.bar([row["bin_low"] for row in bins], [row["count"] for row in bins],
                   width=[row["bin_high"] - row["bin_low"] for row in bins], align="edge", edgecolor="black",
                   color="tab:grey")
    count_axes.set(xlabel="confidence (probability of the predicted class)", ylabel="images")
    return _png_bytes(figure)


# ---------------------------------------------------------------- HTML (every piece of text goes through escape)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _interval(low: float, high: float, level: str) -> str:
    """'95% CI 73.7-90.9%' in the same form as the console lines of metrics.format_evaluation."""
    return f"{level} CI {100 * low:.1f}-{100 * high:.1f}%"


def _html_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    """A table whose first column holds row headers; every cell is escaped."""
    lines = [f"<table>\n<caption>{html.escape(caption)}</caption>",
             "<tr>" + "".join(f'<th scope="col">{html.escape(cell)}</th>' for cell in header) + "</tr>"]
    for row in rows:
        lines.append(f'<tr><th scope="row">{html.escape(row[0])}</th>'
                     + "".join(f"<td>{html.escape(cell)}</td>" for cell in row[1:]) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _figure(name: str, alt: str, written: set[str]) -> str:
    return f'<p><img src="{name}" alt="{html.escape(alt)}"></p>' if name in written else ""


def _paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _summary_rows(evaluation: dict, level: str) -> list[list[str]]:
    """[metric, value, detail] for accuracy, sensitivity, specificity, ROC AUC and ECE."""
    accuracy = evaluation["accuracy"]
    counts = f"{accuracy['successes']}/{accuracy['n']} right (N={evaluation['n']}"
    rows = [["Accuracy", _percent(accuracy["estimate"]), f"{counts}, {_interval(*accuracy['ci'], level)})"]]
    if "sensitivity" in evaluation:
        for name, key, label in (("Sensitivity", "sensitivity", evaluation["positive_label"]),
                                 ("Specificity", "specificity", evaluation["negative_label"])):
            rate = evaluation[key]
            rows.append([f"{name} ({label})", _percent(rate["estimate"]),
                         f"{rate['successes']}/{rate['n']} {label} images called {label} "
                         f"({_interval(*rate['ci'], level)})"])
        auc = evaluation["roc_auc"]
        if auc["estimate"] is None:
            rows.append(["ROC AUC", "n/a", "the test set has only one class"])
        elif auc["ci"][0] is None:
            rows.append(["ROC AUC", f"{auc['estimate']:.3f}", "too few images of a class for a CI"])
        else:
            rows.append(["ROC AUC", f"{auc['estimate']:.3f}",
                         f"{level} CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f} (DeLong)"])
    rows.append(["Expected calibration error", f"{evaluation['calibration']['ece']:.3f}",
                 "0 = perfectly calibrated; see the reliability table"])
    return rows


def _test_sections(evaluation: dict, labels: list[str], written: set[str]) -> list[str]:
    level = f"{100 * evaluation['confidence']:g}%"
    parts = ["<h2>Test results</h2>",
             _html_table(["Metric", "Value", "Detail"], _summary_rows(evaluation, level),
                         f"Test set of {evaluation['n']} images, each rate with its {level} confidence interval"),
             _paragraph(f"How to read: the test images were never used in training. Each rate comes with a {level} "
                        "confidence interval (Wilson; DeLong for the AUC): the range of true values that fit this "
                        "test set. A wide interval means the test set is too small to pin the number down. "
                        "Sensitivity is the share of truly positive images the model found (missed disease lowers "
                        "it); specificity is the share of truly negative images it called negative (false alarms "
                        "lower it).")]

    if "roc_curve" in evaluation:
        parts.append("<h2>ROC curve</h2>")
        if evaluation["roc_curve"]:
            parts.append(_figure("roc_curve.png", "ROC curve", written))
        parts.append(_paragraph(
            f"How to read: each point is one threshold on the probability of '{evaluation['positive_label']}'; "
            "lowering it finds more positives (up) at the cost of more false alarms (right). The dot is this "
            "model as it is used (most probable class). The area under the curve (AUC) is the chance that a random "
            "positive image scores higher than a random negative one: 0.5 is guessing, 1.0 is perfect ranking."
            + ("" if evaluation["roc_curve"] else " No curve: the test set holds only one of the two classes.")))

    matrix_rows = [[name] + [str(count) for count in row] for name, row in zip(labels, evaluation["confusion_matrix"])]
    per_class_rows = [[row["class"], str(row["recall"]["n"]),
                       f"{_percent(row['recall']['estimate'])} ({_interval(*row['recall']['ci'], level)})",
                       f"{_percent(row['precision']['estimate'])} ({_interval(*row['precision']['ci'], level)})"]
                      for row in evaluation["per_class"]]
    parts += ["<h2>Confusion matrix</h2>", _figure("confusion_matrix.png", "Confusion matrix", written),
              _html_table(["true \\ predicted"] + labels, matrix_rows,
                          "Rows = true class, columns = predicted class"),
              _html_table(["Class", "Images", "Recall (found)", "Precision (right when predicted)"], per_class_rows,
                          "Per class"),
              _paragraph("How to read: the diagonal counts the right answers; every other cell is one kind of "
                         "mistake, e.g. row 'true A', column 'predicted B' counts images of A called B. Recall is "
                         "the share of a class that was found, precision the share of a class's predictions that "
                         "were right.")]

    calibration = evaluation["calibration"]
    bin_rows = [[f"{row['bin_low']:.1f}-{row['bin_high']:.1f}", str(row["count"]),
                 _percent(row["mean_confidence"]), _percent(row["accuracy"]),
                 "n/a" if row["count"] == 0 else f"{100 * (row['accuracy'] - row['mean_confidence']):+.1f} points"]
                for row in calibration["bins"]]
    parts += ["<h2>Calibration</h2>", _figure("reliability.png", "Reliability diagram", written),
              _html_table(["Confidence bin", "Images", "Mean confidence", "Accuracy", "Accuracy - confidence"],
                          bin_rows, f"Reliability table (expected calibration error = {calibration['ece']:.3f})"),
              _paragraph("How to read: confidence is the probability the model gave its predicted class. In a "
                         "well-calibrated model, images it is 90% sure about are right 90% of the time, so the "
                         "points lie on the diagonal. Below the diagonal the model is overconfident. The expected "
                         "calibration error is the average gap, weighted by how many images each bin holds. Bins "
                         "with few images are noisy.")]
    return parts


def _history_sections(history: list[dict], written: set[str]) -> list[str]:
    if not history:
        return ["<h2>Learning curves</h2>", _paragraph("No training history was recorded.")]
    last = history[-1]
    final = (f"At the last evaluation (step {last['step']}): train batch accuracy {_percent(last['train_accuracy'])}, "
             f"cross-entropy {last['cross_entropy']:.4f}")
    if last.get("validation_accuracy") is not None:
        final += f", validation accuracy {_percent(last['validation_accuracy'])} (N={last.get('validation_n', '?')})"
    rows = [[str(row["step"]), _percent(row["train_accuracy"]), f"{row['cross_entropy']:.4f}",
             _percent(row.get("validation_accuracy")), str(row.get("validation_n", ""))] for row in history]
    return ["<h2>Learning curves</h2>", _figure("learning_curves.png", "Learning curves", written),
            _paragraph(final + "."),
            _paragraph("How to read: train accuracy and cross-entropy are measured on the batch just trained on, "
                       "validation accuracy on a random batch of validation images. Cross-entropy should fall and "
                       "level off. If train accuracy keeps rising while validation accuracy stalls or falls, the "
                       "layer is memorising the training images (overfitting)."),
            "<details><summary>Every evaluation step</summary>",
            _html_table(["Step", "Train accuracy", "Cross-entropy", "Validation accuracy", "Validation N"], rows,
                        "Training history"),
            "</details>"]


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
         "caption{text-align:left;font-weight:bold}img{max-width:100%}"
         ".warning{border:2px solid #b00;padding:.5em 1em;background:#fff4f4}")


def _html_page(title: str, history: list[dict], evaluation: dict, labels: list[str], written: set[str],
               plots_possible: bool) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="warning">{html.escape(NOT_A_DEVICE)}</p>',
             _paragraph("Classes: " + ", ".join(labels))]
    if not plots_possible:
        parts.append(_paragraph(f"Plots not drawn: matplotlib is missing; {INSTALL_HINT}. All numbers are below."))
    if evaluation["n"] > 0:
        parts += _test_sections(evaluation, labels, written)
    else:
        parts += ["<h2>Test results</h2>",
                  _paragraph("No test images, so no test metrics (raise --testing_percentage).")]
    parts += _history_sections(history, written)
    parts += ["</body>", "</html>", ""]
    return "\n".join(part for part in parts if part)
