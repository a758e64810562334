"""The training report: one folder with index.html and four plots, every plot next to its numbers.

The console ends with a few lines (metrics.format_evaluation). This page shows the same evaluation
so it can be read, shared and questioned:

    learning_curves.png   train/validation accuracy and cross-entropy per evaluation step
    roc_curve.png         two classes only: sensitivity against 1 - specificity over all thresholds
    confusion_matrix.png  rows = true class, columns = predicted class, with counts
    reliability.png       accuracy against confidence per bin, with the diagonal of perfect calibration
    index.html            the plots, the numbers with their confidence intervals, and how to read them;
                          the misclassified images (with their heat maps, if drawn); a record of the run (data
                          folder, images per class and split, every flag, seed, version, date, OOD threshold)

An interval that rests on fewer than metrics.FEW_IMAGES images (per class) says so: "95% CI 1.000-1.000
(DeLong) on 10 + 6 images: too few to trust" reads as what it is, not as certainty. Numbers are
right-aligned, prose left-aligned; plots take the page's width.

Plots need matplotlib, an optional extra (`pip install mini_retrain[report]`). It is imported only
here, through its object-oriented API (Figure + the Agg canvas) so no global pyplot state or display
is touched. Without it the page still has every number, as HTML tables, and says how to get the plots
(and so does the console, through `log`).
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.evaluation.metrics import FEW_IMAGES
from mini_retrain.paths import write_bytes_atomically

PLOT_FILES = ("learning_curves.png", "roc_curve.png", "confusion_matrix.png", "reliability.png")
INSTALL_HINT = "install mini_retrain[report] for the plots (pip install 'mini_retrain[report]')"
NOT_A_DEVICE = (
    "Not a diagnostic device. mini_retrain is a teaching and research tool. These numbers describe how this "
    "model did on one test set; they are not evidence that it is safe or accurate for any patient, and it must "
    "not be used to make clinical decisions."
)


def write_report(folder: Path, history: list[dict], evaluation: dict, labels: list[str],
                 title: str = "mini_retrain training report", heat_maps: dict[str, Path] | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Write index.html and the plots into `folder`; return the path of index.html.

    history: train.train_final_layer's rows {step, train_accuracy, cross_entropy[, validation_accuracy,
    validation_n]}. evaluation: metrics.evaluate's dict (or {"n": 0} when there was no test set), with, when the
    command adds them, "run" (commands.retrain.run_record: the data, flags, seed, version, date) and "misclassified"
    ([{file, true, predicted, score}]). labels: the class names, in the order of the final layer's outputs.
    heat_maps: {file: heat map path} of misclassified images (retrain --explain_misclassified), shown beside them.
    log: where to say that the plots are missing (matplotlib not installed), besides the page itself.
    """
    folder = Path(folder)
    labels = [str(label) for label in labels]
    _check_inputs(folder, history, evaluation, labels)
    has_test = evaluation["n"] > 0
    folder.mkdir(parents=True, exist_ok=True)

    plots_possible = _matplotlib_installed()
    if not plots_possible and log is not None:
        log(f"WARNING: the report has no plots, only tables: matplotlib is missing; {INSTALL_HINT}")
    plots: dict[str, bytes] = {}
    if plots_possible:
        if history:
            plots["learning_curves.png"] = _png_bytes(_learning_curves_figure(history))
        if has_test and evaluation.get("roc_curve"):
            plots["roc_curve.png"] = _png_bytes(_roc_curve_figure(evaluation))
        if has_test:
            plots["confusion_matrix.png"] = _png_bytes(_confusion_matrix_figure(evaluation, labels))
            plots["reliability.png"] = _png_bytes(_reliability_figure(evaluation))
    for name in PLOT_FILES:  # a plot from an earlier run that this one did not draw would be stale
        if name in plots:
            write_bytes_atomically(folder / name, plots[name])
        else:
            (folder / name).unlink(missing_ok=True)

    links = {file: os.path.relpath(path, folder) for file, path in (heat_maps or {}).items()}
    page = _html_page(title, history, evaluation, labels, set(plots), plots_possible, links)
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


def _learning_curves_figure(history: list[dict]):
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
    return figure


def _roc_curve_figure(evaluation: dict):
    """The ROC curve, the chance diagonal and this model's operating point (the most probable class); the legend
    beside the square plot, so the figure fills the page's width."""
    figure = _new_figure(10, 5)
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
    axes.legend(loc="upper left", bbox_to_anchor=(1.04, 1.0))
    return figure


def _confusion_matrix_figure(evaluation: dict, labels: list[str]):
    """Counts[true, predicted]; the colour is the share of the true class (the row), so rows compare fairly."""
    counts = np.asarray(evaluation["confusion_matrix"], dtype=np.int64)  # (classes, classes)
    row_sums = counts.sum(axis=1, keepdims=True)  # (classes, 1) images truly in each class
    shares = counts / np.maximum(row_sums, 1)  # (classes, classes) an empty class shows as 0
    # aspect="auto": cells need not be square, and the layout then keeps the "true class" label inside the figure
    # (with square cells, matplotlib's constrained layout pushed it past the left edge).
    figure = _new_figure(10, 2.0 + 0.7 * len(labels))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
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
    return figure


def _reliability_figure(evaluation: dict):
    """Left: accuracy per confidence bin against the diagonal. Right: how many images each bin holds."""
    bins = evaluation["calibration"]["bins"]
    figure = _new_figure(10, 4.5)
    reliability_axes, count_axes = figure.subplots(1, 2, sharex=True, width_ratios=(3, 2))
    filled = [row for row in bins if row["count"] > 0]
    lows = [row["bin_low"] for row in filled]
    widths = [row["bin_high"] - row["bin_low"] for row in filled]
    reliability_axes.bar(lows, [row["accuracy"] for row in filled], width=widths, align="edge",
                         edgecolor="black", alpha=0.7, label="accuracy in bin")
    reliability_axes.plot([row["mean_confidence"] for row in filled], [row["accuracy"] for row in filled], "o",
                          color="black", label="(mean confidence, accuracy)")
    reliability_axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    reliability_axes.set(title=f"Reliability (ECE = {evaluation['calibration']['ece']:.3f})",
                         xlabel="confidence (probability of the predicted class)", ylabel="accuracy", xlim=(0, 1),
                         ylim=(0, 1.02))
    reliability_axes.legend(loc="upper left")
    reliability_axes.grid(alpha=0.3)
    count_axes.bar([row["bin_low"] for row in bins], [row["count"] for row in bins],
                   width=[row["bin_high"] - row["bin_low"] for row in bins], align="edge", edgecolor="black",
                   color="tab:grey")
    count_axes.set(title="Images per bin", xlabel="confidence (probability of the predicted class)", ylabel="images")
    return figure


# ---------------------------------------------------------------- HTML (every piece of text goes through escape)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _interval(low: float, high: float, level: str) -> str:
    """'95% CI 73.7-90.9%' in the same form as the console lines of metrics.format_evaluation."""
    return f"{level} CI {100 * low:.1f}-{100 * high:.1f}%"


def _html_table(header: list[str], rows: list[list[str]], caption: str, text_columns: tuple[int, ...] = ()) -> str:
    """A table whose first column holds row headers; every cell is escaped. Numbers are right-aligned (so their
    digits line up), the columns in text_columns (prose, file names) left-aligned."""
    lines = [f"<table>\n<caption>{html.escape(caption)}</caption>",
             "<tr>" + "".join(f'<th scope="col" class="text">{html.escape(cell)}</th>' if column in text_columns
                              else f'<th scope="col">{html.escape(cell)}</th>' for column, cell in enumerate(header))
             + "</tr>"]
    for row in rows:
        lines.append(f'<tr><th scope="row">{html.escape(row[0])}</th>'
                     + "".join(f'<td class="text">{html.escape(cell)}</td>' if column in text_columns
                               else f"<td>{html.escape(cell)}</td>" for column, cell in enumerate(row[1:], 1))
                     + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _too_few(n: int) -> str:
    return f": on {n} images, too few to trust" if n < FEW_IMAGES else ""


def _figure(name: str, alt: str, written: set[str]) -> str:
    return f'<p><img src="{name}" alt="{html.escape(alt)}"></p>' if name in written else ""


def _paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _summary_rows(evaluation: dict, level: str) -> list[list[str]]:
    """[metric, value, detail] for accuracy, sensitivity, specificity, ROC AUC and ECE."""
    accuracy = evaluation["accuracy"]
    counts = f"{accuracy['successes']}/{accuracy['n']} right (N={evaluation['n']}"
    rows = [["Accuracy", _percent(accuracy["estimate"]),
             f"{counts}, {_interval(*accuracy['ci'], level)}){_too_few(accuracy['n'])}"]]
    if "sensitivity" in evaluation:
        for name, key, label in (("Sensitivity", "sensitivity", evaluation["positive_label"]),
                                 ("Specificity", "specificity", evaluation["negative_label"])):
            rate = evaluation[key]
            rows.append([f"{name} ({label})", _percent(rate["estimate"]),
                         f"{rate['successes']}/{rate['n']} {label} images called {label} "
                         f"({_interval(*rate['ci'], level)}){_too_few(rate['n'])}"])
        auc = evaluation["roc_auc"]
        positives, negatives = evaluation["sensitivity"]["n"], evaluation["specificity"]["n"]
        if auc["estimate"] is None:
            rows.append(["ROC AUC", "n/a", "the test set has only one class"])
        elif auc["ci"][0] is None:
            rows.append(["ROC AUC", f"{auc['estimate']:.3f}", "too few images of a class for a CI"])
        else:
            few = ": too few to trust" if min(positives, negatives) < FEW_IMAGES else ""
            rows.append(["ROC AUC", f"{auc['estimate']:.3f}",
                         f"{level} CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f} (DeLong) on {positives} + {negatives} "
                         f"images{few}"])
    rows.append(["Expected calibration error", f"{evaluation['calibration']['ece']:.3f}",
                 "0 = perfectly calibrated; see the reliability table"])
    return rows


def _test_sections(evaluation: dict, labels: list[str], written: set[str]) -> list[str]:
    level = f"{100 * evaluation['confidence']:g}%"
    parts = ["<h2>Test results</h2>",
             _html_table(["Metric", "Value", "Detail"], _summary_rows(evaluation, level),
                         f"Test set of {evaluation['n']} images, each rate with its {level} confidence interval",
                         text_columns=(2,))]
    smallest = min(row["recall"]["n"] for row in evaluation["per_class"])
    if smallest < FEW_IMAGES:
        parts.append(f'<p class="warning">{html.escape(_few_images_note(evaluation, smallest))}</p>')
    parts.append(_paragraph(
        f"How to read: the test images were never used in training. Each rate comes with a {level} confidence "
        "interval (Wilson; DeLong for the AUC): the range of true values that fit this test set. A wide interval "
        "means the test set is too small to pin the number down. Sensitivity is the share of truly positive images "
        "the model found (missed disease lowers it); specificity is the share of truly negative images it called "
        "negative (false alarms lower it)."))

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


def _few_images_note(evaluation: dict, smallest: int) -> str:
    run = evaluation.get("run", {})
    command = f"mini_retrain crossval --image_dir {run['image_dir']}" if "image_dir" in run else "mini_retrain crossval"
    return (f"Too few images to trust these numbers: the smallest class has {smallest} test image(s) (fewer than "
            f"{FEW_IMAGES}). An interval like 1.000-1.000 then says only that these few images were ranked right, "
            f"not that new ones will be. For an interval on every image, run {command}.")


def _misclassified_section(evaluation: dict, heat_maps: dict[str, str]) -> list[str]:
    """Every misclassified test image: its file, true and predicted class, the score, and its heat map if drawn."""
    wrong = evaluation.get("misclassified")
    if wrong is None:
        return []
    if not wrong:
        return ["<h2>Misclassified images</h2>", _paragraph("None: every test image was classified right.")]
    rows = []
    for entry in wrong:
        link = heat_maps.get(entry["file"])
        heat = (f'<a href="{html.escape(link)}"><img class="heat" src="{html.escape(link)}" '
                f'alt="heat map of {html.escape(entry["file"])}"></a>' if link else "")
        score = f" (score = {entry['score']:.5f})" if entry.get("score") is not None else ""
        rows.append(f'<tr><th scope="row" class="text">{html.escape(entry["file"])}</th>'
                    f'<td class="text">{html.escape(entry["true"])}</td>'
                    f'<td class="text">{html.escape(entry["predicted"] + score)}</td>'
                    f'<td class="text">{heat}</td></tr>')
    hint = ("Heat maps show where the evidence for the predicted class lies (retrain --explain_misclassified)."
            if heat_maps else "retrain --explain_misclassified FOLDER adds a heat map of each.")
    return ["<h2>Misclassified images</h2>",
            f"<table>\n<caption>{len(wrong)} of {evaluation['n']} test images, files relative to the data folder"
            "</caption>",
            '<tr><th scope="col" class="text">File</th><th scope="col" class="text">True class</th>'
            '<th scope="col" class="text">Predicted</th><th scope="col" class="text">Heat map</th></tr>', *rows,
            "</table>", _paragraph(hint)]


def _run_section(run: dict | None) -> list[str]:
    """The record of the run: what was trained on, how, and when, so the page can be traced back to a command."""
    if not run:
        return []
    classes = run.get("classes", {})
    splits = list(next(iter(classes.values()), {}))
    class_rows = [[label] + [str(row[split]) for split in splits] + [str(sum(row.values()))]
                  for label, row in classes.items()]
    class_rows.append(["all"] + [str(sum(row[split] for row in classes.values())) for split in splits]
                      + [str(sum(sum(row.values()) for row in classes.values()))])
    facts = [["Data folder", run.get("image_dir", "")],
             ["Random seed", str(run.get("random_seed", ""))], ["mini_retrain version", run.get("version", "")],
             ["Date", run.get("date", "")]]
    if run.get("ood_threshold") is not None:
        facts.append(["Out-of-distribution threshold", f"{run['ood_threshold']:.2f} (Mahalanobis distance; label "
                      "and explain warn beyond it)"])
    if run.get("folds") is not None:
        facts.append(["Folds", str(run["folds"])])
    flags = [[f"--{name}", "(not given)" if value is None else str(value)]
             for name, value in run.get("flags", {}).items()]
    # The command one flag per line, as a shell reads it (a browser would break lines inside "--flag_name").
    words = run.get("command", "").split(" --")  # "mini_retrain retrain", "image_dir lungs", "learning_rate 0.1", ...
    command = " \\\n    --".join([" --".join(words[:2]), *words[2:]])
    return ["<h2>Record of the run</h2>",
            _paragraph("The command that repeats this run:"), f"<pre>{html.escape(command)}</pre>",
            _html_table(["", "Value"], facts, "What was run, on what, when", text_columns=(1,)),
            _html_table(["Class"] + splits + ["all"], class_rows, "Images per class and split (usable images)"),
            "<details><summary>Every flag</summary>",
            _html_table(["Flag", "Value"], flags, "Flags of the run (defaults included)", text_columns=(1,)),
            "</details>"]


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
         "th[scope=row],td.text,th.text{text-align:left}caption{text-align:left;font-weight:bold}"
         "img{width:100%;height:auto}img.heat{width:12em}"
         ".warning{border:2px solid #b00;padding:.5em 1em;background:#fff4f4}"
         "pre{background:#f4f4f4;padding:.5em 1em;overflow-x:auto}")


def _html_page(title: str, history: list[dict], evaluation: dict, labels: list[str], written: set[str],
               plots_possible: bool, heat_maps: dict[str, str] | None = None) -> str:
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
    parts += _misclassified_section(evaluation, heat_maps or {})
    if history or evaluation.get("run", {}).get("folds") is None:
        parts += _history_sections(history, written)
    parts += _run_section(evaluation.get("run"))
    parts += ["</body>", "</html>", ""]
    return "\n".join(part for part in parts if part)
