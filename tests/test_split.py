"""Tests for mini_retrain.core.split: retrain.py's hashing rule on relative paths, and the small-class rule."""

import hashlib
import posixpath
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mini_retrain.core.split import SPLITS, hash_key, percentage_hash, split_image_lists, which_split


def retrain_percentage(name: str) -> float:
    """retrain.py's formula, typed out from its source, used as the independent reference."""
    hash_name = re.sub(r"_nohash_.*$", "", name)
    hash_name_hashed = hashlib.sha1(hash_name.encode("utf-8")).hexdigest()
    return (int(hash_name_hashed, 16) % ((2**27 - 1) + 1)) * (100.0 / (2**27 - 1))


def retrain_split(name: str, validation_percentage: float, testing_percentage: float) -> str:
    percentage = retrain_percentage(name)
    if percentage < validation_percentage:
        return "validation"
    if percentage < testing_percentage + validation_percentage:
        return "testing"
    return "training"


# Relative paths "<dir>/<stem>.png"; stems never contain "_nohash_" unless a test adds it.
path_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
relative_paths = st.builds(lambda d, s: f"{d}/{s}.png", path_part, path_part)
percentages = st.tuples(
    st.floats(min_value=0, max_value=60, allow_nan=False),
    st.floats(min_value=0, max_value=39.9, allow_nan=False),
)
image_lists_strategy = st.dictionaries(
    keys=st.sampled_from(["normal", "tuberculosis", "other"]),
    values=st.lists(path_part, min_size=1, max_size=25, unique=True),
    min_size=1,
).map(lambda d: {label: [f"{label}/{stem}.png" for stem in stems] for label, stems in d.items()})


def test_which_split_on_a_b_png_matches_retrain_formula_by_hand():
    # sha1("a/b.png") computed here, reduced and scaled exactly as retrain.py does.
    digest = hashlib.sha1(b"a/b.png").hexdigest()
    expected = (int(digest, 16) % 2**27) * (100.0 / (2**27 - 1))
    assert percentage_hash("a/b.png") == expected
    for validation, testing in [(10, 10), (0, 0), (expected, 10), (0, expected), (50, 49)]:
        if expected < validation:
            split = "validation"
        elif expected < validation + testing:
            split = "testing"
        else:
            split = "training"
        assert which_split("a/b.png", validation, testing) == split


@given(relative_paths, percentages)
def test_which_split_equals_retrain_rule_on_the_relative_path(path, vt):
    assert which_split(path, *vt) == retrain_split(path, *vt)
    assert 0.0 <= percentage_hash(path) <= 100.0


def test_hash_key_examples_derived_by_hand():
    assert hash_key("normal/pat7_nohash_1.png") == "normal/pat7"
    assert hash_key("normal/pat7_nohash_.png") == "normal/pat7"
    assert hash_key("normal/a.png") == "normal/a.png"
    # Only the file name is cut, never a directory that happens to contain "_nohash_".
    assert hash_key("x_nohash_y/b.png") == "x_nohash_y/b.png"
    # Windows separators hash like forward slashes.
    assert hash_key("normal\\pat7_nohash_2.png") == "normal/pat7"
    assert percentage_hash("normal\\a.png") == percentage_hash("normal/a.png")


@pytest.mark.parametrize("bad", ["", "/abs/normal/a.png", "C:/data/normal/a.png", "C:\\data\\a.png"])
def test_hash_key_rejects_empty_and_absolute_paths(bad):
    with pytest.raises(ValueError, match="relative_path"):
        hash_key(bad)


@given(image_lists_strategy, percentages)
@settings(deadline=None)
def test_split_is_deterministic_disjoint_and_complete(image_lists, vt):
    splits, warnings = split_image_lists(image_lists, *vt)
    again, warnings_again = split_image_lists(image_lists, *vt)
    assert splits == again and warnings == warnings_again
    assert list(splits) == list(image_lists)
    for label, paths in image_lists.items():
        parts = splits[label]
        assert tuple(parts) == SPLITS
        joined = parts["training"] + parts["validation"] + parts["testing"]
        assert sorted(joined) == sorted(paths)  # complete, and no image twice (disjoint)
        for split in SPLITS:
            assert parts[split] == sorted(parts[split])
        assert parts["training"], "every class keeps at least one training image"


@given(image_lists_strategy, percentages, st.randoms(use_true_random=False))
@settings(deadline=None)
def test_split_is_independent_of_listing_order(image_lists, vt, rnd):
    shuffled = {}
    for label in rnd.sample(list(image_lists), len(image_lists)):
        shuffled[label] = rnd.sample(image_lists[label], len(image_lists[label]))
    splits, warnings = split_image_lists(image_lists, *vt)
    splits_shuffled, warnings_shuffled = split_image_lists(shuffled, *vt)
    assert splits == splits_shuffled
    assert sorted(warnings) == sorted(warnings_shuffled)


@given(image_lists_strategy, percentages)
@settings(deadline=None)
def test_split_does_not_depend_on_where_the_folder_lives(image_lists, vt):
    # The same images under two different roots: relative paths are equal, so splits are equal.
    def relative_to(root):
        return {label: [posixpath.relpath(posixpath.join(root, p), root) for p in paths]
                for label, paths in image_lists.items()}

    from_home = relative_to("/home/alice/xrays")
    from_usb = relative_to("/media/usb/backup/2024/xrays")
    assert from_home == from_usb == image_lists
    assert split_image_lists(from_home, *vt) == split_image_lists(from_usb, *vt)


@given(
    st.lists(st.tuples(path_part, st.integers(2, 5)), min_size=1, max_size=15, unique_by=lambda t: t[0]),
    percentages,
)
@settings(deadline=None)
def test_nohash_groups_land_in_one_split(groups, vt):
    paths = [f"normal/{stem}_nohash_{k}.png" for stem, size in groups for k in range(size)]
    splits, _ = split_image_lists({"normal": paths}, *vt)
    split_of = {path: split for split in SPLITS for path in splits["normal"][split]}
    for stem, size in groups:
        members = {split_of[f"normal/{stem}_nohash_{k}.png"] for k in range(size)}
        assert len(members) == 1
        # Without the small-class move, the group's split is retrain.py's rule on the shared key.
        if any(retrain_split(p, *vt) == "training" for p in paths):
            assert members == {retrain_split(f"normal/{stem}", *vt)}


# 20,000 names from a fixed seed: the hash values are fixed, so these tests cannot flake.
_RNG = random.Random(1234)
LARGE_NAMES = [f"class{_RNG.randrange(3)}/{_RNG.getrandbits(64):016x}.png" for _ in range(20_000)]
LARGE_PERCENTAGES = np.array([retrain_percentage(name) for name in LARGE_NAMES])


def test_hash_percentages_are_uniform_on_0_100():
    # Kolmogorov-Smirnov against U[0, 100]: an independent check that the hash spreads evenly.
    assert stats.kstest(LARGE_PERCENTAGES, stats.uniform(loc=0, scale=100).cdf).pvalue > 1e-3


@given(st.floats(min_value=1, max_value=40), st.floats(min_value=1, max_value=40))
@settings(max_examples=15, deadline=None)
def test_split_fractions_match_requested_percentages_on_20k_images(validation, testing):
    image_lists: dict[str, list[str]] = {}
    for name in LARGE_NAMES:
        image_lists.setdefault(name.split("/")[0], []).append(name)
    splits, warnings = split_image_lists(image_lists, validation, testing)
    assert warnings == []
    count = {split: sum(len(parts[split]) for parts in splits.values()) for split in SPLITS}
    n = len(LARGE_NAMES)
    # Each fraction is an empirical CDF at one threshold (validation: below v, training: at or above v + t),
    # whose binomial std with n = 20,000 is at most 0.35 percentage points; allow 0.6. Testing lies
    # between two thresholds, so its error is at most the sum of two such errors: allow 1.2.
    assert abs(100 * count["validation"] / n - validation) < 0.6
    assert abs(100 * count["training"] / n - (100 - validation - testing)) < 0.6
    assert abs(100 * count["testing"] / n - testing) < 1.2


@given(
    st.integers(1, 3).flatmap(lambda k: st.lists(path_part, min_size=k, max_size=k, unique=True)),
    st.floats(min_value=0, max_value=70),
    st.floats(min_value=0, max_value=29.9),
)
@settings(deadline=None)
def test_small_classes_keep_a_training_image_and_warn(stems, validation, testing):
    paths = [f"tb/{stem}.png" for stem in stems]
    splits, warnings = split_image_lists({"tb": paths, "normal": ["normal/x.png"]}, validation, testing)
    tb = splits["tb"]
    assert len(tb["training"]) >= 1

    by_hash = {p: retrain_split(p, validation, testing) for p in paths}
    tb_warnings = [w for w in warnings if "'tb'" in w]
    assert all(w.startswith("WARNING: class 'tb'") for w in tb_warnings)  # marked like retrain.py's warnings
    if "training" in by_hash.values():
        # Nothing moved: exactly retrain.py's rule.
        assert {p: s for s in SPLITS for p in tb[s]} == by_hash
        assert not any("moved" in w for w in tb_warnings)
    else:
        # Exactly one image moves: the one with the highest percentage_hash.
        highest = max(paths, key=retrain_percentage)
        assert tb["training"] == [highest]
        assert any("moved" in w and highest in w for w in tb_warnings)
        rest = {p: by_hash[p] for p in paths if p != highest}
        assert {p: s for s in ("validation", "testing") for p in tb[s]} == rest
    for split, percentage in (("validation", validation), ("testing", testing)):
        warned = any(f"no {split} image" in w for w in tb_warnings)
        nobody_has_one = not tb[split] and not splits["normal"][split]
        assert warned == (percentage > 0 and not tb[split] and not nobody_has_one)
        assert any(f"no {split} images at all" in w for w in warnings) == (percentage > 0 and nobody_has_one)


def test_single_image_class_moves_to_training_with_a_named_warning():
    path = "tb/only.png"
    # With 99.99% in validation + testing, the image lands outside training unless its hash is >= 99.99.
    assert retrain_percentage(path) < 99.99
    splits, warnings = split_image_lists({"tb": [path]}, 50, 49.99)
    assert splits["tb"] == {"training": [path], "validation": [], "testing": []}
    assert any("'tb'" in w and "moved" in w for w in warnings)
    assert any("no validation images at all" in w for w in warnings)  # the only class: the split is empty
    assert any("no testing images at all" in w for w in warnings)


def test_nohash_group_moves_to_training_together():
    paths = ["tb/p1_nohash_0.png", "tb/p1_nohash_1.png"]
    assert retrain_percentage("tb/p1") < 99.99
    splits, warnings = split_image_lists({"tb": paths}, 50, 49.99)
    assert splits["tb"]["training"] == sorted(paths)
    assert any("moved" in w for w in warnings)


def test_zero_percentage_means_no_warning_for_that_split():
    _, warnings = split_image_lists({"a": ["a/1.png"], "b": ["b/1.png"]}, 0, 0)
    assert warnings == []


@pytest.mark.parametrize(
    "validation, testing",
    [(-1, 10), (10, -0.5), (50, 50), (60, 45), (float("nan"), 10), (10, float("nan"))],
)
def test_bad_percentages_raise_clear_errors(validation, testing):
    with pytest.raises(ValueError, match="percentage"):
        which_split("a/b.png", validation, testing)
    with pytest.raises(ValueError, match="percentage"):
        split_image_lists({"a": ["a/b.png"]}, validation, testing)


def test_empty_class_and_duplicate_paths_raise():
    with pytest.raises(ValueError, match="'tb' has no images"):
        split_image_lists({"tb": []}, 10, 10)
    with pytest.raises(ValueError, match="more than once"):
        split_image_lists({"tb": ["tb/a.png", "tb/a.png"]}, 10, 10)


def test_an_empty_split_is_one_warning_not_one_per_class():
    """16 images, 10% validation: hashing can leave every class without a validation image. Then one line says the
    split is empty (not "covers the other classes only", which would be untrue), and the per-class lines go."""
    image_lists = {"normal": ["normal/a.png"], "tb": ["tb/b.png"]}
    splits, warnings = split_image_lists(image_lists, 0.001, 0.001)
    assert all(not splits[label]["validation"] for label in splits)
    empty = [w for w in warnings if "no validation images at all" in w]
    assert empty == ["WARNING: no validation images at all (0.001% of 2 images fell to none), so there is no "
                     "validation accuracy. Raise --validation_percentage or add images."]
    assert not any("covers the other classes" in w and "validation" in w for w in warnings)


def test_a_split_missing_in_one_class_only_names_that_class():
    image_lists = {"normal": [f"normal/{i}.png" for i in range(200)], "tb": ["tb/b.png"]}
    splits, warnings = split_image_lists(image_lists, 10, 10)
    assert splits["normal"]["validation"] and not splits["tb"]["validation"]
    assert any("'tb' has no validation image" in w and "covers the other classes only" in w for w in warnings)
    assert not any("at all" in w for w in warnings)
