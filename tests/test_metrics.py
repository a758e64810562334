"""Tests for mini_retrain.evaluation.metrics: every expected value is worked out by hand or by an independent method."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from mini_retrain.evaluation.metrics import (
    auc_interval,
    calibration,
    confusion_matrix,
    default_positive_label,
    evaluate,
    format_evaluation,
    newcombe_interval,
    roc_auc,
    roc_curve,
    wilson_interval,
)

# ---------------------------------------------------------------- Wilson interval


def test_wilson_58_of_69_matches_the_closed_form_by_hand():
    # The other textbook form of the Wilson bounds: (2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)).
    z = norm.ppf(0.975)
    n, k = 69, 58
    p = k / n
    root = z * math.sqrt(z * z + 4 * n * p * (1 - p))
    expected = ((2 * n * p + z * z - root) / (2 * (n + z * z)), (2 * n * p + z * z + root) / (2 * (n + z * z)))
    low, high = wilson_interval(58, 69)
    assert low == pytest.approx(expected[0], abs=1e-12)
    assert high == pytest.approx(expected[1], abs=1e-12)
    # The numbers the report prints for retrain.py's 84.1% on 69 test images.
    assert (round(100 * low, 1), round(100 * high, 1)) == (73.7, 90.9)


@pytest.mark.parametrize(
    "successes, n, expected",
    [
        # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score, no continuity correction).
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
        # 0/10: the upper bound is z^2 / (n + z^2) = 3.8415 / 13.8415; 10/10 mirrors it.
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
    ],
)
def test_wilson_published_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=5e-5)
    assert high == pytest.approx(expected[1], abs=5e-5)


def test_wilson_zero_successes_has_exact_zero_lower_bound_and_other_levels():
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    # 0/n at level c: upper = z^2 / (n + z^2) with z the two-sided quantile.
    z = norm.ppf(0.995)
    assert wilson_interval(0, 10, confidence=0.99)[1] == pytest.approx(z * z / (10 + z * z), abs=1e-12)


def test_wilson_no_observations_means_no_information():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("successes, n, confidence", [(3, 2, 0.95), (-1, 5, 0.95), (1, 5, 1.0), (1, 5, 0.0)])
def test_wilson_rejects_bad_input(successes, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(successes, n, confidence)


@given(
    n=st.integers(min_value=1, max_value=5000),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    confidence=st.floats(min_value=0.5, max_value=0.999),
)
def test_wilson_contains_the_estimate_and_lies_in_unit_interval(n, fraction, confidence):
    successes = int(round(fraction * n))
    low, high = wilson_interval(successes, n, confidence)
    assert 0.0 <= low <= successes / n <= high <= 1.0


# ---------------------------------------------------------------- Newcombe's interval for a difference


def test_newcombe_56_of_70_minus_48_of_80_by_hand():
    """Newcombe (1998), the first example, worked by hand from the two Wilson intervals (z = 1.959964):

    56/70: p1 = 0.8, z^2/n = 0.054878, centre = (0.8 + 0.027439) / 1.054878 = 0.784393,
           halfwidth = 1.959964 / 1.054878 * sqrt(0.16 / 70 + 0.054878 / 280) = 0.092560 -> (0.691834, 0.876953)
    48/80: p2 = 0.6, z^2/n = 0.048018, centre = (0.6 + 0.024009) / 1.048018 = 0.595418,
           halfwidth = 1.959964 / 1.048018 * sqrt(0.24 / 80 + 0.048018 / 320) = 0.104964 -> (0.490455, 0.700382)
    low  = 0.2 - sqrt((0.8 - 0.691834)^2 + (0.700382 - 0.6)^2) = 0.2 - 0.147569 = 0.0524
    high = 0.2 + sqrt((0.876953 - 0.8)^2 + (0.6 - 0.490455)^2) = 0.2 + 0.133873 = 0.3339
    """
    low, high = newcombe_interval(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


@pytest.mark.parametrize("counts, expected", [
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
])
def test_newcombe_published_values(counts, expected):
    """Newcombe (1998), Table II, method 10 (score interval without continuity correction)."""
    assert tuple(round(bound, 4) for bound in newcombe_interval(*counts)) == expected


@given(n_1=st.integers(1, 2000), n_2=st.integers(1, 2000), f_1=st.floats(0, 1), f_2=st.floats(0, 1))
def test_newcombe_contains_the_difference_and_is_antisymmetric(n_1, n_2, f_1, f_2):
    x_1, x_2 = int(round(f_1 * n_1)), int(round(f_2 * n_2))
    low, high = newcombe_interval(x_1, n_1, x_2, n_2)
    assert -1.0 - 1e-12 <= low <= x_1 / n_1 - x_2 / n_2 <= high <= 1.0 + 1e-12
    swapped = newcombe_interval(x_2, n_2, x_1, n_1)  # p2 - p1: the same interval, mirrored
    assert swapped == pytest.approx((-high, -low), abs=1e-12)


def test_newcombe_needs_both_groups():
    with pytest.raises(ValueError, match="n_2=0"):
        newcombe_interval(3, 10, 0, 0)


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 3), expected)


def test_confusion_matrix_rejects_out_of_range_and_mismatched():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=0, max_size=60))
def test_confusion_matrix_sums_to_n_and_rows_are_class_sizes(pairs):
    labels = np.array([t for t, _ in pairs], dtype=int)
    predictions = np.array([p for _, p in pairs], dtype=int)
    counts = confusion_matrix(labels, predictions, 4)
    assert counts.sum() == len(pairs)
    np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(labels, minlength=4))
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(predictions, minlength=4))
    assert np.trace(counts) == int(np.sum(labels == predictions))


# ---------------------------------------------------------------- ROC and AUC


def test_auc_by_hand_without_ties():
    # Positives 0.9, 0.4; negatives 0.5, 0.1. Pairs won: (0.9,0.5) (0.9,0.1) (0.4,0.1) -> 3 of 4.
    scores = np.array([0.9, 0.4, 0.5, 0.1])
    is_positive = np.array([True, True, False, False])
    assert roc_auc(scores, is_positive) == pytest.approx(0.75)


def test_auc_by_hand_with_ties():
    # Positives 0.8, 0.5; negatives 0.5, 0.2: wins 1 + 1 + 1/2 (tie) + 1 = 3.5 of 4.
    scores = np.array([0.8, 0.5, 0.5, 0.2])
    is_positive = np.array([1, 1, 0, 0])
    assert roc_auc(scores, is_positive) == pytest.approx(0.875)
    # All scores equal: every pair is a tie.
    assert roc_auc(np.ones(5), np.array([1, 0, 1, 0, 0])) == pytest.approx(0.5)


def test_auc_is_nan_when_a_class_is_absent():
    assert math.isnan(roc_auc(np.array([0.1, 0.7]), np.array([True, True])))
    assert math.isnan(roc_auc(np.array([0.1, 0.7]), np.array([False, False])))


def test_roc_curve_by_hand_with_ties():
    scores = np.array([0.9, 0.8, 0.8, 0.3])
    is_positive = np.array([True, False, True, False])
    fpr, tpr, thresholds = roc_curve(scores, is_positive)
    # score >= inf: nothing; >= 0.9: one positive; >= 0.8: both positives and one negative; >= 0.3: all.
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.3])
    # Trapezoids: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875 = 3.5 of 4 pairs.
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.875)


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.array([0.2, 0.4]), np.array([True, True]))


score_lists = st.lists(st.integers(min_value=-20, max_value=20), min_size=2, max_size=40)


@given(scores=score_lists, data=st.data())
def test_auc_properties(scores, data):
    scores = np.array(scores, dtype=float)
    is_positive = np.array(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))))
    auc = roc_auc(scores, is_positive)
    if is_positive.all() or not is_positive.any():
        assert math.isnan(auc)
        return
    assert 0.0 <= auc <= 1.0
    # Only the order matters: strictly increasing transforms leave AUC unchanged (ties stay ties).
    assert roc_auc(scores**3 + 2 * scores, is_positive) == pytest.approx(auc, abs=1e-12)
    assert roc_auc(np.exp(scores / 10.0), is_positive) == pytest.approx(auc, abs=1e-12)
    # Reversing the order swaps wins and losses; ties count 1/2 either way.
    assert roc_auc(-scores, is_positive) == pytest.approx(1.0 - auc, abs=1e-12)
    # The area under the (tie-aware) ROC curve is the same number.
    fpr, tpr, _ = roc_curve(scores, is_positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc, abs=1e-12)


# ---------------------------------------------------------------- DeLong interval


def slow_delong_variance(scores, is_positive):
    """DeLong et al. (1988) straight from the definition, one pair at a time."""
    positives = [s for s, p in zip(scores, is_positive) if p]
    negatives = [s for s, p in zip(scores, is_positive) if not p]
    m, n = len(positives), len(negatives)

    def psi(x, y):
        return 1.0 if x > y else (0.5 if x == y else 0.0)

    v10 = [sum(psi(x, y) for y in negatives) / n for x in positives]
    v01 = [sum(psi(x, y) for x in positives) / m for y in negatives]
    auc = sum(v10) / m
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    return auc, s10 / m + s01 / n


def test_delong_by_hand():
    # psi = [[1, 1], [0, 1]]: V10 = (1, 1/2), V01 = (1/2, 1); each sample variance 0.125, Var = 0.125.
    scores = np.array([0.9, 0.4, 0.5, 0.1])
    is_positive = np.array([True, True, False, False])
    halfwidth = norm.ppf(0.975) * math.sqrt(0.125)
    low, high = auc_interval(scores, is_positive)
    assert low == pytest.approx(0.75 - halfwidth)
    assert high == 1.0  # 0.75 + 0.693 clipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_slow_pairwise_computation_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    is_positive = rng.random(n) < 0.4
    # Rounded scores make plenty of ties, within and across classes.
    scores = np.round(rng.random(n) + 0.4 * is_positive, 1)
    auc, variance = slow_delong_variance(list(scores), list(is_positive))
    assert roc_auc(scores, is_positive) == pytest.approx(auc, abs=1e-12)
    for confidence in (0.95, 0.8):
        z = norm.ppf(0.5 + confidence / 2)
        low, high = auc_interval(scores, is_positive, confidence)
        assert low == pytest.approx(max(0.0, auc - z * math.sqrt(variance)), abs=1e-12)
        assert high == pytest.approx(min(1.0, auc + z * math.sqrt(variance)), abs=1e-12)


def test_delong_needs_two_of_each_class():
    low, high = auc_interval(np.array([0.9, 0.4, 0.5]), np.array([True, False, False]))
    assert math.isnan(low) and math.isnan(high)


# ---------------------------------------------------------------- calibration


def test_ece_by_hand():
    probabilities = np.array(
        [
            [0.95, 0.05],  # label 0: conf 0.95, right   -> bin (0.9, 1]
            [0.92, 0.08],  # label 1: conf 0.92, wrong   -> bin (0.9, 1]
            [0.28, 0.72],  # label 1: conf 0.72, right   -> bin (0.7, 0.8]
            [0.25, 0.75],  # label 0: conf 0.75, wrong   -> bin (0.7, 0.8]
            [0.55, 0.45],  # label 0: conf 0.55, right   -> bin (0.5, 0.6]
        ]
    )
    labels = np.array([0, 1, 1, 0, 0])
    ece, table = calibration(probabilities, labels, bins=10)
    # (2/5)|0.5 - 0.935| + (2/5)|0.5 - 0.735| + (1/5)|1 - 0.55| = 0.174 + 0.094 + 0.09
    assert ece == pytest.approx(0.358)
    assert len(table) == 10
    assert [row["count"] for row in table] == [0, 0, 0, 0, 0, 1, 0, 2, 0, 2]
    assert table[9]["bin_low"] == pytest.approx(0.9) and table[9]["bin_high"] == pytest.approx(1.0)
    assert table[9]["mean_confidence"] == pytest.approx(0.935)
    assert table[9]["accuracy"] == pytest.approx(0.5)
    assert table[7]["mean_confidence"] == pytest.approx(0.735)
    assert table[0]["mean_confidence"] is None and table[0]["accuracy"] is None
    # Two bins: (0, 0.5] is empty, (0.5, 1] holds all five: |3/5 - 0.778| = 0.178.
    ece2, table2 = calibration(probabilities, labels, bins=2)
    assert ece2 == pytest.approx(abs(0.6 - (0.95 + 0.92 + 0.72 + 0.75 + 0.55) / 5))
    assert [row["count"] for row in table2] == [0, 5]


def test_ece_is_zero_when_confidence_matches_accuracy():
    # Four images at confidence 0.75, three right.
    probabilities = np.tile([0.75, 0.25], (4, 1))
    labels = np.array([0, 0, 0, 1])
    ece, _ = calibration(probabilities, labels)
    assert ece == pytest.approx(0.0, abs=1e-12)


def test_calibration_rejects_logits_and_bad_bins():
    with pytest.raises(ValueError, match="logits"):
        calibration(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="bins"):
        calibration(np.array([[0.6, 0.4]]), np.array([0]), bins=0)


@given(
    data=st.data(),
    n=st.integers(min_value=1, max_value=30),
    classes=st.integers(min_value=2, max_value=4),
    bins=st.integers(min_value=1, max_value=15),
)
@settings(max_examples=60)
def test_ece_in_unit_interval(data, n, classes, bins):
    raw = np.array(
        data.draw(st.lists(st.floats(0.0, 1.0), min_size=n * classes, max_size=n * classes))
    ).reshape(n, classes)
    raw[:, 0] += 1e-3  # keep rows away from all-zero
    probabilities = raw / raw.sum(axis=1, keepdims=True)
    labels = np.array(data.draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    ece, table = calibration(probabilities, labels, bins=bins)
    assert 0.0 <= ece <= 1.0
    assert sum(row["count"] for row in table) == n


# ---------------------------------------------------------------- positive label


@pytest.mark.parametrize(
    "names, expected",
    [
        (["normal", "abnormal"], "abnormal"),
        (["Normal", "TB"], "TB"),
        (["tuberculosis", "healthy"], "tuberculosis"),
        (["positive", "tb"], "tb"),  # "tb" comes before "positive" in the priority list
        (["cat", "dog"], "dog"),
        (["b", "a"], "b"),
        (["0", "1"], "1"),
        (["a", "b", "c"], None),
    ],
)
def test_default_positive_label(names, expected):
    assert default_positive_label(names) == expected


# ---------------------------------------------------------------- evaluate and format


def _two_class_case():
    # class 0 = normal, 1 = abnormal (positive). Columns are P(normal), P(abnormal).
    probabilities = np.array(
        [
            [0.9, 0.1],  # normal, called normal
            [0.8, 0.2],  # normal, called normal
            [0.4, 0.6],  # normal, called abnormal (false positive)
            [0.3, 0.7],  # abnormal, called abnormal
            [0.2, 0.8],  # abnormal, called abnormal
            [0.65, 0.35],  # abnormal, called normal (false negative)
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    return probabilities, labels, ["normal", "abnormal"]


def test_evaluate_two_classes_by_hand():
    probabilities, labels, names = _two_class_case()
    result = evaluate(probabilities, labels, names)
    assert result["n"] == 6
    assert result["accuracy"]["successes"] == 4 and result["accuracy"]["n"] == 6
    assert result["accuracy"]["estimate"] == pytest.approx(4 / 6)
    assert result["accuracy"]["ci"] == pytest.approx(list(wilson_interval(4, 6)))
    assert result["confusion_matrix"] == [[2, 1], [1, 2]]
    assert result["positive_label"] == "abnormal" and result["negative_label"] == "normal"
    assert (result["sensitivity"]["successes"], result["sensitivity"]["n"]) == (2, 3)
    assert (result["specificity"]["successes"], result["specificity"]["n"]) == (2, 3)
    # Precision of "abnormal": 2 right of 3 called abnormal.
    abnormal = result["per_class"][1]
    assert abnormal["class"] == "abnormal"
    assert (abnormal["precision"]["successes"], abnormal["precision"]["n"]) == (2, 3)
    # AUC on P(abnormal): positives 0.7, 0.8, 0.35 vs negatives 0.1, 0.2, 0.6.
    # 0.7 and 0.8 beat all three; 0.35 beats two -> 8 of 9.
    assert result["roc_auc"]["estimate"] == pytest.approx(8 / 9)
    assert result["roc_curve"]["thresholds"][0] is None  # +inf written as null
    assert result["roc_curve"]["fpr"][-1] == 1.0 and result["roc_curve"]["tpr"][-1] == 1.0
    assert 0.0 <= result["calibration"]["ece"] <= 1.0
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN, no infinity, no numpy types


def test_evaluate_explicit_positive_label_swaps_sensitivity_and_specificity():
    probabilities, labels, names = _two_class_case()
    labels = np.array([0, 0, 1, 1, 1, 1])  # make the two rates differ
    default = evaluate(probabilities, labels, names)
    swapped = evaluate(probabilities, labels, names, positive_label="normal")
    assert swapped["positive_label"] == "normal"
    assert swapped["sensitivity"] == default["specificity"]
    assert swapped["specificity"] == default["sensitivity"]
    assert swapped["roc_auc"]["estimate"] == pytest.approx(default["roc_auc"]["estimate"])


def test_evaluate_rejects_unknown_positive_label_and_bad_shapes():
    probabilities, labels, names = _two_class_case()
    with pytest.raises(ValueError, match="positive_label 'cow' is not one of the classes"):
        evaluate(probabilities, labels, names, positive_label="cow")
    with pytest.raises(ValueError, match="class_names"):
        evaluate(probabilities, labels, ["normal"])
    with pytest.raises(ValueError, match="labels"):
        evaluate(probabilities, labels[:-1], names)
    with pytest.raises(ValueError, match="empty"):
        evaluate(np.zeros((0, 2)), np.zeros(0, dtype=int), names)


def test_evaluate_one_class_in_test_set_is_still_json():
    probabilities, _, names = _two_class_case()
    labels = np.zeros(6, dtype=int)
    result = evaluate(probabilities, labels, names)
    assert result["roc_auc"]["estimate"] is None
    assert result["roc_curve"] is None
    assert result["sensitivity"]["estimate"] is None and result["sensitivity"]["ci"] == [0.0, 1.0]
    json.dumps(result, allow_nan=False)
    assert any(line.startswith("ROC AUC = n/a") for line in format_evaluation(result))


def test_evaluate_three_classes_has_no_binary_rates():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 2, 1])
    result = evaluate(probabilities, labels, ["a", "b", "c"])
    assert "sensitivity" not in result and "roc_auc" not in result
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    lines = format_evaluation(result)
    assert lines[0] == "Final test accuracy = 75.0% (N=4, 95% CI 30.1-95.4%)"
    assert any(line.startswith("Recall (b) = 50.0% (1/2, 95% CI") for line in lines)
    json.dumps(result, allow_nan=False)


def test_format_evaluation_retrain_example():
    # 69 test images, 58 right, as in retrain.py's "Final test accuracy = 84.1% (N=69)".
    # 34 abnormal (29 found), 35 normal (29 correctly cleared): 58 / 69.
    labels = np.array([1] * 34 + [0] * 35)
    predicted_abnormal = np.array([True] * 29 + [False] * 5 + [False] * 29 + [True] * 6)
    p_abnormal = np.where(predicted_abnormal, 0.8, 0.3)
    probabilities = np.c_[1 - p_abnormal, p_abnormal]
    lines = format_evaluation(evaluate(probabilities, labels, ["normal", "abnormal"]))
    assert lines[0] == "Final test accuracy = 84.1% (N=69, 95% CI 73.7-90.9%)"
    assert lines[1].startswith("Sensitivity (abnormal) = 85.3% (29/34, 95% CI ")
    assert lines[2].startswith("Specificity (normal) = 82.9% (29/35, 95% CI ")
    assert lines[3].startswith("ROC AUC = ")
    assert lines[4].startswith("Expected calibration error = ")
    # Confusion matrix rows name the classes and hold the counts.
    matrix_rows = lines[-2:]
    assert matrix_rows[0].split() == ["normal", "29", "6"]
    assert matrix_rows[1].split() == ["abnormal", "5", "29"]
    assert format_evaluation(evaluate(probabilities, labels, ["normal", "abnormal"]), title="Validation")[0].startswith(
        "Validation = 84.1%"
    )
