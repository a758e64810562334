"""Honest test metrics: every rate comes with its sample size and a confidence interval.

retrain.py ended with one line, "Final test accuracy = 84.1% (N=69)". With 69 test images that
number could easily be 74% or 91%, and accuracy alone hides whether the errors are missed
disease (false negatives) or false alarms. Here we report:

- accuracy, sensitivity, specificity, per-class precision/recall, each with a Wilson score
  interval (a binomial proportion interval that behaves well near 0% and 100% and for small n);
- the confusion matrix (rows = true class, columns = predicted class);
- for two classes, the ROC curve and its area (AUC) with DeLong's confidence interval;
- calibration: does a "0.99" mean right 99% of the time? (expected calibration error).

Everything is plain NumPy on arrays of probabilities and integer labels; `evaluate` returns a
JSON-serialisable dict and `format_evaluation` turns it into a few readable lines.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, rankdata

from mini_retrain.core.checks import check_labels

# Names that, in a two-class problem, mean "the condition we are looking for".
POSITIVE_NAMES = ("abnormal", "tb", "tuberculosis", "pneumonia", "positive", "disease", "sick")


# Below this many images (of a class, for sensitivity, specificity and the AUC) an interval is wide and its
# approximations (Wilson, DeLong's normal) are rough: the report and retrain say so, and point to crossval.
FEW_IMAGES = 30

def _z_quantile(confidence: float) -> float:
    """Two-sided standard normal quantile: z with P(|Z| <= z) = confidence (1.96 for 95%)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion p = successes / n.

    The interval is the set of p0 for which the score test |p - p0| / sqrt(p0 (1 - p0) / n) <= z
    does not reject. Solving that quadratic in p0 gives

        centre    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

    Unlike the textbook p +- z sqrt(p(1-p)/n), it never leaves [0, 1] and does not collapse to a
    zero-width interval at 0/n or n/n. With no observations (n == 0) we know nothing: (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z_quantile(confidence)
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2_n = z * z / n
    centre = (p + z2_n / 2.0) / (1.0 + z2_n)
    halfwidth = z / (1.0 + z2_n) * math.sqrt(p * (1.0 - p) / n + z2_n / (4.0 * n))
    # At 0/n the lower bound is exactly 0 (and at n/n the upper exactly 1): the two terms cancel
    # algebraically, so write the exact value rather than a last-bit rounding error.
    low = 0.0 if successes == 0 else centre - halfwidth
    high = 1.0 if successes == n else centre + halfwidth
    return (low, high)


def newcombe_interval(successes_1: int, n_1: int, successes_2: int, n_2: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval for the difference p1 - p2 of two independent proportions (Newcombe 1998, method 10).

    The "hybrid score" interval: each proportion's Wilson interval (l1, u1) and (l2, u2) gives the distance from
    its estimate to its bounds, and the two distances are combined as independent errors are, in quadrature:

        low  = (p1 - p2) - sqrt((p1 - l1)^2 + (u2 - p2)^2)
        high = (p1 - p2) + sqrt((u1 - p1)^2 + (p2 - l2)^2)

    Like the Wilson interval it stays inside [-1, 1] and behaves at 0/n and n/n, where p1 - p2 +- z * standard
    error does not. Newcombe's first example: 56/70 - 48/80 = 0.2000, 95% interval 0.0524 to 0.3339.
    """
    if n_1 < 1 or n_2 < 1:
        raise ValueError(f"newcombe_interval needs at least one observation in each group, got n_1={n_1}, n_2={n_2}")
    p_1, p_2 = successes_1 / n_1, successes_2 / n_2
    low_1, high_1 = wilson_interval(successes_1, n_1, confidence)
    low_2, high_2 = wilson_interval(successes_2, n_2, confidence)
    difference = p_1 - p_2
    return (difference - math.sqrt((p_1 - low_1) ** 2 + (high_2 - p_2) ** 2),
            difference + math.sqrt((high_1 - p_1) ** 2 + (p_2 - low_2) ** 2))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_count: int) -> np.ndarray:
    """Counts[t, p] = number of images whose true class is t and predicted class is p.

    Rows are true classes, columns predicted classes, so the diagonal holds the correct answers,
    row sums are the class sizes, and matrix.sum() == n.
    """
    labels = check_labels(labels, class_count)
    predictions = check_labels(predictions, class_count, name="predictions")
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must have the same length")
    # Each (true, predicted) pair gets a unique cell index t * classes + p; count them all at once.
    cells = labels * class_count + predictions  # (n,)
    counts = np.bincount(cells, minlength=class_count * class_count)  # (classes * classes,)
    return counts.reshape(class_count, class_count)


def _check_scores(scores: np.ndarray, is_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive)
    if scores.ndim != 1 or is_positive.shape != scores.shape:
        raise ValueError(
            f"scores and is_positive must be 1-d arrays of the same length, got {scores.shape} and {is_positive.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite numbers (no NaN or infinity)")
    if is_positive.dtype != np.bool_:
        if not np.all((is_positive == 0) | (is_positive == 1)):
            raise ValueError("is_positive must be booleans (or 0/1)")
        is_positive = is_positive.astype(bool)
    return scores, is_positive


def roc_curve(scores: np.ndarray, is_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic: (false positive rate, true positive rate) per threshold.

    Calling an image positive when score >= t gives, for each distinct score t (high to low),

        tpr(t) = #{positives with score >= t} / #positives     (sensitivity)
        fpr(t) = #{negatives with score >= t} / #negatives     (1 - specificity)

    The curve starts at (0, 0) with threshold +inf (call nothing positive) and ends at (1, 1).
    Tied scores move both rates in one step, which is what makes the area equal the tie-aware AUC.
    """
    scores, is_positive = _check_scores(scores, is_positive)
    positive_count = int(is_positive.sum())
    negative_count = is_positive.size - positive_count
    if positive_count == 0 or negative_count == 0:
        raise ValueError(
            f"roc_curve needs both classes, got {positive_count} positives and {negative_count} negatives"
        )
    order = np.argsort(-scores, kind="stable")  # highest score first
    sorted_scores = scores[order]
    sorted_positive = is_positive[order]
    true_positives = np.cumsum(sorted_positive)  # (n,) positives with score >= sorted_scores[i]
    false_positives = np.cumsum(~sorted_positive)  # (n,)
    # Keep only the last index of each run of equal scores: a threshold admits all ties at once.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, false_positives[last_of_run] / negative_count]
    tpr = np.r_[0.0, true_positives[last_of_run] / positive_count]
    thresholds = np.r_[np.inf, sorted_scores[last_of_run]]
    return fpr, tpr, thresholds


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative).

    Counting ties as one half, this is the Mann-Whitney U statistic over n_pos * n_neg:

        AUC = (sum of the positives' mid-ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    (ranks of all scores together, ties getting the average rank). NaN if a class is absent.
    """
    scores, is_positive = _check_scores(scores, is_positive)
    positive_count = int(is_positive.sum())
    negative_count = is_positive.size - positive_count
    if positive_count == 0 or negative_count == 0:
        return float("nan")
    ranks = rankdata(scores)  # (n,) mid-ranks, 1..n
    u_statistic = ranks[is_positive].sum() - positive_count * (positive_count + 1) / 2.0
    return float(u_statistic / (positive_count * negative_count))


def auc_interval(scores: np.ndarray, is_positive: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """DeLong's confidence interval for the ROC AUC (DeLong, DeLong & Clarke-Pearson, 1988).

    With psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise, for positive scores X_i and negative
    scores Y_j the "structural components" are

        V10_i = mean_j psi(X_i, Y_j)      (how many negatives positive i beats)
        V01_j = mean_i psi(X_i, Y_j)      (how many positives beat negative j)

    AUC = mean(V10) = mean(V01) and Var(AUC) = var(V10) / n_pos + var(V01) / n_neg (sample
    variances). Instead of the n_pos x n_neg psi matrix we use mid-ranks (Sun & Xu, 2014):
    rank of X_i among all scores minus its rank among the positives = #{Y_j < X_i} + #{Y_j == X_i}/2.

    The interval is AUC +- z sqrt(Var), clipped to [0, 1]. NaN bounds if either class has fewer
    than 2 samples (no variance estimate). A perfectly separated sample gives a zero-width
    interval at 1.0: DeLong's variance is 0 there, a known weakness for small test sets.
    """
    scores, is_positive = _check_scores(scores, is_positive)
    z = _z_quantile(confidence)
    positive_scores = scores[is_positive]  # (n_pos,)
    negative_scores = scores[~is_positive]  # (n_neg,)
    positive_count, negative_count = positive_scores.size, negative_scores.size
    if positive_count < 2 or negative_count < 2:
        return (float("nan"), float("nan"))
    ranks_all = rankdata(np.r_[positive_scores, negative_scores])  # (n,) positives first
    v10 = (ranks_all[:positive_count] - rankdata(positive_scores)) / negative_count  # (n_pos,)
    v01 = 1.0 - (ranks_all[positive_count:] - rankdata(negative_scores)) / positive_count  # (n_neg,)
    auc = v10.mean()
    variance = v10.var(ddof=1) / positive_count + v01.var(ddof=1) / negative_count
    halfwidth = z * math.sqrt(variance)
    return (float(max(0.0, auc - halfwidth)), float(min(1.0, auc + halfwidth)))


def _check_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (images, classes >= 2), got {probabilities.shape}")
    if probabilities.shape[0] == 0:
        raise ValueError("probabilities is empty: need at least one test image")
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0.0 or probabilities.max() > 1.0:
        raise ValueError("probabilities must be finite and in [0, 1] (softmax outputs, not logits)")
    labels = check_labels(labels, probabilities.shape[1])
    if labels.shape[0] != probabilities.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but probabilities has {probabilities.shape[0]} rows"
        )
    return probabilities, labels


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error (ECE) and the reliability table, on top-class confidence.

    Each image's confidence is its largest probability (the predicted class). Confidences are
    grouped into `bins` equal-width bins (0, 1/B], (1/B, 2/B], ... (a confidence of exactly 0 goes
    into the first). In bin b with n_b images, mean confidence conf_b and accuracy acc_b:

        ECE = sum_b (n_b / n) |acc_b - conf_b|

    0 means "90% sure" is right 90% of the time; the cow photo that was "normal (score = 0.99828)"
    is one reason to look. Table rows: bin_low, bin_high, count, mean_confidence, accuracy (the
    last two None for an empty bin).
    """
    probabilities, labels = _check_probabilities(probabilities, labels)
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    confidence = probabilities.max(axis=1)  # (n,)
    correct = probabilities.argmax(axis=1) == labels  # (n,)
    edges = np.linspace(0.0, 1.0, bins + 1)  # (bins + 1,)
    # Right-closed bins: index b such that edges[b] < confidence <= edges[b + 1].
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (n,)
    counts = np.bincount(bin_index, minlength=bins)  # (bins,)
    confidence_sums = np.bincount(bin_index, weights=confidence, minlength=bins)
    correct_sums = np.bincount(bin_index, weights=correct, minlength=bins)
    filled = counts > 0
    gaps = np.abs(correct_sums[filled] - confidence_sums[filled])  # n_b |acc_b - conf_b|
    expected_calibration_error = float(gaps.sum() / labels.size)
    table = []
    for b in range(bins):
        table.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "count": int(counts[b]),
                "mean_confidence": float(confidence_sums[b] / counts[b]) if counts[b] else None,
                "accuracy": float(correct_sums[b] / counts[b]) if counts[b] else None,
            }
        )
    return expected_calibration_error, table


def default_positive_label(class_names: list[str]) -> str | None:
    """The class that means "disease" in a two-class problem, or None for other class counts.

    The first of POSITIVE_NAMES present (case-insensitive) wins; otherwise the second class in
    sorted order (so {"0", "1"} gives "1").
    """
    if len(class_names) != 2:
        return None
    by_lower = {name.lower(): name for name in class_names}
    for candidate in POSITIVE_NAMES:
        if candidate in by_lower:
            return by_lower[candidate]
    return sorted(class_names)[1]


def _proportion(successes: int, n: int, confidence: float) -> dict:
    """A rate as a JSON record: estimate (None when n == 0), counts and Wilson interval."""
    low, high = wilson_interval(int(successes), int(n), confidence)
    return {
        "estimate": successes / n if n else None,
        "successes": int(successes),
        "n": int(n),
        "ci": [low, high],
    }


def _finite_or_none(value: float) -> float | None:
    """NaN and infinity are not JSON; write them as null."""
    return float(value) if math.isfinite(value) else None


def evaluate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    positive_label: str | None = None,
    confidence: float = 0.95,
) -> dict:
    """All test metrics for softmax `probabilities` (n, classes) and true `labels` (n,).

    The prediction is the most probable class. Returns a JSON-serialisable dict:
      n, confidence, class_names, accuracy, confusion_matrix, per_class (precision, recall),
      calibration {ece, bins}, and for two classes also positive_label, negative_label,
      sensitivity (recall of the positive class), specificity (recall of the negative class),
      roc_auc {estimate, ci} and roc_curve {fpr, tpr, thresholds} on the positive-class probability.
    Rates are records {estimate, successes, n, ci: [low, high]} with Wilson intervals.
    positive_label must name a class; it only matters for two classes (default:
    default_positive_label(class_names)).
    """
    probabilities, labels = _check_probabilities(probabilities, labels)
    class_names = [str(name) for name in class_names]
    class_count = probabilities.shape[1]
    if len(class_names) != class_count:
        raise ValueError(
            f"class_names has {len(class_names)} names but probabilities has {class_count} columns"
        )
    _z_quantile(confidence)  # validates confidence once, with a clear message
    predictions = probabilities.argmax(axis=1)  # (n,)
    counts = confusion_matrix(labels, predictions, class_count)  # (classes, classes)
    n = int(labels.size)
    true_positives = np.diag(counts)  # (classes,) correct answers per class
    class_sizes = counts.sum(axis=1)  # (classes,) row sums: how many truly are class c
    predicted_sizes = counts.sum(axis=0)  # (classes,) column sums: how many were called class c

    evaluation: dict = {
        "n": n,
        "confidence": float(confidence),
        "class_names": class_names,
        "accuracy": _proportion(true_positives.sum(), n, confidence),
        "confusion_matrix": counts.tolist(),
        "per_class": [
            {
                "class": name,
                "precision": _proportion(true_positives[c], predicted_sizes[c], confidence),
                "recall": _proportion(true_positives[c], class_sizes[c], confidence),
            }
            for c, name in enumerate(class_names)
        ],
    }

    if positive_label is not None and positive_label not in class_names:
        raise ValueError(
            f"positive_label {positive_label!r} is not one of the classes {class_names}; "
            "pass one of them or leave it out"
        )
    if class_count == 2:
        positive_label = positive_label if positive_label is not None else default_positive_label(class_names)
        positive = class_names.index(positive_label)
        negative = 1 - positive
        is_positive = labels == positive  # (n,)
        scores = probabilities[:, positive]  # (n,) probability of the positive class
        evaluation["positive_label"] = positive_label
        evaluation["negative_label"] = class_names[negative]
        evaluation["sensitivity"] = _proportion(true_positives[positive], class_sizes[positive], confidence)
        evaluation["specificity"] = _proportion(true_positives[negative], class_sizes[negative], confidence)
        both_classes_present = 0 < is_positive.sum() < n
        auc_low, auc_high = auc_interval(scores, is_positive, confidence)
        evaluation["roc_auc"] = {
            "estimate": _finite_or_none(roc_auc(scores, is_positive)),
            "ci": [_finite_or_none(auc_low), _finite_or_none(auc_high)],
        }
        if both_classes_present:
            fpr, tpr, thresholds = roc_curve(scores, is_positive)
            evaluation["roc_curve"] = {
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "thresholds": [_finite_or_none(t) for t in thresholds],  # first is +inf -> null
            }
        else:
            evaluation["roc_curve"] = None

    ece, table = calibration(probabilities, labels)
    evaluation["calibration"] = {"ece": ece, "bins": table}
    return evaluation


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _rate_line(title: str, rate: dict, level: str) -> str:
    """'Title = 85.3% (29/34, 95% CI 69.9-93.6%)'."""
    low, high = rate["ci"]
    return (
        f"{title} = {_percent(rate['estimate'])} "
        f"({rate['successes']}/{rate['n']}, {level} CI {100 * low:.1f}-{100 * high:.1f}%)"
    )


def format_evaluation(evaluation: dict, title: str = "Final test accuracy") -> list[str]:
    """A few readable lines for the console, most important first.

        Final test accuracy = 84.1% (N=69, 95% CI 73.7-90.9%)
        Sensitivity (abnormal) = 85.3% (29/34, 95% CI 69.9-93.6%)
        Specificity (normal) = 82.9% (29/35, 95% CI 67.3-91.9%)
        ROC AUC = 0.912 (95% CI 0.846-0.978)
        Expected calibration error = 0.041
        Confusion matrix (rows = true class, columns = predicted):
        ...
    """
    level = f"{100 * evaluation['confidence']:g}%"
    accuracy = evaluation["accuracy"]
    low, high = accuracy["ci"]
    lines = [
        f"{title} = {_percent(accuracy['estimate'])} "
        f"(N={evaluation['n']}, {level} CI {100 * low:.1f}-{100 * high:.1f}%)"
    ]
    if "sensitivity" in evaluation:
        lines.append(_rate_line(f"Sensitivity ({evaluation['positive_label']})", evaluation["sensitivity"], level))
        lines.append(_rate_line(f"Specificity ({evaluation['negative_label']})", evaluation["specificity"], level))
        auc = evaluation["roc_auc"]
        if auc["estimate"] is None:
            lines.append("ROC AUC = n/a (the test set has only one class)")
        elif auc["ci"][0] is None:
            lines.append(f"ROC AUC = {auc['estimate']:.3f} (too few images of a class for a CI)")
        else:
            lines.append(f"ROC AUC = {auc['estimate']:.3f} ({level} CI {auc['ci'][0]:.3f}-{auc['ci'][1]:.3f})")
    else:
        for row in evaluation["per_class"]:
            lines.append(_rate_line(f"Recall ({row['class']})", row["recall"], level))
    lines.append(f"Expected calibration error = {evaluation['calibration']['ece']:.3f}")

    names = evaluation["class_names"]
    matrix = evaluation["confusion_matrix"]
    width = max(max(len(name) for name in names), max(len(str(v)) for row in matrix for v in row))
    lines.append("Confusion matrix (rows = true class, columns = predicted):")
    lines.append("  " + " " * width + "".join(f"  {name:>{width}}" for name in names))
    for name, row in zip(names, matrix):
        lines.append(f"  {name:<{width}}" + "".join(f"  {value:>{width}}" for value in row))
    return lines
