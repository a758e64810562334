"""Tests for mini_retrain.commands.crossval: fold properties (hypothesis), honest out-of-fold predictions, and the CLI on the
real demo X-rays with the real Inception v3."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from mini_retrain.cli import main
from mini_retrain.commands.crossval import assign_folds, cross_validate
from mini_retrain.pipeline.dataset import Dataset
from mini_retrain.core.train import accuracy, train_final_layer
from tests.conftest import DEMO_DATA


def quiet(_line: str) -> None:
    pass


def make_files(group_sizes_per_class: list[list[int]], singles: list[list[bool]]):
    """Files "c<class>/pat<g>_nohash_<j>.png" (or "c<class>/img<g>.png" for a lone image), their classes and groups.

    The group of each file is recorded here, from how it was made, not from split.hash_key."""
    files, classes, groups = [], [], []
    for c, sizes in enumerate(group_sizes_per_class):
        for g, size in enumerate(sizes):
            if size == 1 and singles[c][g]:
                names = [f"c{c}/img{g}.png"]
            else:
                names = [f"c{c}/pat{g}_nohash_{j}.png" for j in range(size)]
            files += names
            classes += [c] * size
            groups += [(c, g)] * size
    return files, np.array(classes, dtype=np.int64), groups


@st.composite
def grouped_images(draw):
    class_count = draw(st.integers(2, 3))
    sizes = [draw(st.lists(st.integers(1, 3), min_size=2, max_size=9)) for _ in range(class_count)]
    singles = [[draw(st.booleans()) for _ in s] for s in sizes]
    folds = draw(st.integers(2, min(len(s) for s in sizes)))
    files, classes, groups = make_files(sizes, singles)
    order = draw(st.permutations(range(len(files))))
    return ([files[i] for i in order], classes[list(order)], [groups[i] for i in order], sizes, folds,
            draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None)
@given(grouped_images())
def test_folds_partition_the_images_keep_groups_whole_and_balance_classes(case):
    files, classes, groups, sizes, folds, seed = case
    fold_of = assign_folds(files, classes, folds, np.random.default_rng(seed))

    # Disjoint and complete: every image in exactly one fold 0..K-1, every fold used.
    assert fold_of.shape == (len(files),) and fold_of.dtype.kind == "i"
    assert sorted(np.concatenate([np.flatnonzero(fold_of == k) for k in range(folds)])) == list(range(len(files)))
    # Groups never split.
    for group in set(groups):
        assert len({int(fold_of[i]) for i, g in enumerate(groups) if g == group}) == 1
    # Stratified: every fold holds every class, and per class the fold counts differ by at most its largest group.
    for c, class_sizes in enumerate(sizes):
        per_fold = np.bincount(fold_of[classes == c], minlength=folds)
        assert per_fold.min() >= 1
        assert per_fold.max() - per_fold.min() <= max(class_sizes)
    # Deterministic for a seed, and independent of the order the files are listed in.
    again = assign_folds(files[::-1], classes[::-1], folds, np.random.default_rng(seed))[::-1]
    np.testing.assert_array_equal(again, fold_of)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(2, 30), min_size=2, max_size=4), st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_single_images_give_floor_or_ceil_per_class_and_totals_within_one(class_sizes, folds, seed):
    folds = min(folds, min(class_sizes))
    classes = np.repeat(np.arange(len(class_sizes)), class_sizes)
    files = [f"c{c}/img{i}.png" for i, c in enumerate(classes)]
    fold_of = assign_folds(files, classes, folds, np.random.default_rng(seed))
    for c, n_c in enumerate(class_sizes):
        per_fold = np.bincount(fold_of[classes == c], minlength=folds)
        assert set(per_fold.tolist()) <= {n_c // folds, -(-n_c // folds)}
    totals = np.bincount(fold_of, minlength=folds)
    assert totals.max() - totals.min() <= 1


def test_the_seed_changes_the_folds_and_the_same_seed_repeats_them():
    files = [f"c{i % 2}/img{i}.png" for i in range(40)]
    classes = np.arange(40) % 2
    first = assign_folds(files, classes, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(first, assign_folds(files, classes, 4, np.random.default_rng(7)))
    assert any(not np.array_equal(first, assign_folds(files, classes, 4, np.random.default_rng(s))) for s in range(3))


def test_too_many_folds_names_the_class_and_the_fix():
    # "tb" has 3 patients (4 images, two of one patient): at most 3 folds.
    files = [f"normal/n{i}.png" for i in range(6)] + ["tb/p1_nohash_a.png", "tb/p1_nohash_b.png", "tb/p2.png",
                                                      "tb/p3.png"]
    classes = np.array([0] * 6 + [1] * 4)
    assign_folds(files, classes, 3, np.random.default_rng(0))  # fine
    message = r"^folds 4 is more than class 'tb' has .*\(3 patient groups\); use folds=3 or fewer"
    with pytest.raises(ValueError, match=message):
        assign_folds(files, classes, 4, np.random.default_rng(0), ["normal", "tb"])
    for folds in (1, 0, 2.5):
        with pytest.raises(ValueError, match="^folds must be an integer >= 2"):
            assign_folds(files, classes, folds, np.random.default_rng(0))


def test_a_group_spanning_two_classes_is_refused():
    files = ["x/p1_nohash_0.png", "x/p1_nohash_1.png", "x/a.png", "x/b.png"]
    with pytest.raises(ValueError, match="patient group 'x/p1' holds images of different classes"):
        assign_folds(files, np.array([0, 1, 0, 1]), 2, np.random.default_rng(0))


def synthetic_dataset(bottlenecks: np.ndarray, classes: np.ndarray, files: list[str]) -> Dataset:
    n = len(files)
    return Dataset(Path("synthetic"), ["normal", "tb"], files, np.array(["training"] * n), classes.astype(np.int64),
                   bottlenecks.astype(np.float32), [f"key{i}" for i in range(n)], None)


def separable_dataset(seed: int = 0) -> tuple[Dataset, list]:
    """Two classes 6 standard deviations apart along one direction, with two-image _nohash_ groups."""
    rng = np.random.default_rng(seed)
    files, classes, groups = make_files([[2] * 10, [2] * 8 + [1] * 4], [[False] * 10, [False] * 8 + [True] * 4])
    bottlenecks = rng.standard_normal((len(files), 32))
    bottlenecks[:, 0] += np.where(classes == 1, 3.0, -3.0)
    return synthetic_dataset(bottlenecks, classes, files), groups


def test_separable_data_is_predicted_perfectly_once_per_image_with_groups_whole():
    dataset, groups = separable_dataset()
    lines = []
    result = cross_validate(dataset, 4, np.random.default_rng(0), how_many_training_steps=200, learning_rate=0.1,
                            train_batch_size=20, class_balancing=True, log=lines.append)
    predictions = result["predictions"]
    assert [p["file"] for p in predictions] == dataset.files  # each image predicted exactly once
    assert all(p["predicted"] == p["true"] for p in predictions)
    assert result["pooled"]["accuracy"]["successes"] == result["pooled"]["n"] == len(dataset.files)
    for group in set(groups):
        assert len({p["fold"] for p, g in zip(predictions, groups) if g == group}) == 1
    for row in result["per_fold"]:
        held_out = sum(p["fold"] == row["fold"] for p in predictions)
        assert row["n_test"] == held_out and row["n_train"] == len(dataset.files) - held_out
        # n/n correct: the Wilson lower bound is n / (n + z^2) (the textbook formula with p = 1).
        z = norm.ppf(0.975)
        assert row["accuracy"]["ci"][0] == pytest.approx(row["n_test"] / (row["n_test"] + z * z))
    assert [line.split(":")[0] for line in lines[:4]] == [f"Fold {k}/4" for k in (1, 2, 3, 4)]
    assert "Cross-validated accuracy = 100.0% (N=40, 95% CI" in "\n".join(lines)
    json.dumps(result)  # JSON-serialisable


def test_held_out_folds_are_never_trained_on():
    """Random labels on random bottlenecks: a layer memorises its training images (100% on them), so any leak of a
    held-out image into its fold's training would push the pooled accuracy far above chance (50%)."""
    rng = np.random.default_rng(3)
    n, d = 120, 256
    bottlenecks = rng.standard_normal((n, d))
    classes = rng.permutation(np.repeat([0, 1], n // 2))
    dataset = synthetic_dataset(bottlenecks, classes, [f"c{c}/img{i}.png" for i, c in enumerate(classes)])
    steps = dict(how_many_training_steps=300, learning_rate=0.1, train_batch_size=50, class_balancing=True)

    leaky, _ = train_final_layer(dataset.bottlenecks, classes, np.empty((0, d)), np.empty(0, np.int64), 2,
                                 np.random.default_rng(0), validation_batch_size=100, eval_step_interval=10,
                                 log=quiet, **steps)
    assert accuracy(leaky, dataset.bottlenecks, classes) == 1.0  # what a leak would score
    result = cross_validate(dataset, 5, np.random.default_rng(0), log=quiet, **steps)
    # Chance is 60/120 with standard deviation sqrt(120 / 4) = 5.5 images; 90/120 is 5.5 standard deviations above.
    assert result["pooled"]["accuracy"]["successes"] < 90


def test_cross_validate_repeats_with_the_same_seed():
    dataset, _ = separable_dataset(seed=1)
    runs = [cross_validate(dataset, 3, np.random.default_rng(5), how_many_training_steps=20, learning_rate=0.01,
                           train_batch_size=100, class_balancing=True, log=quiet)
            for _ in range(2)]
    assert json.dumps(runs[0]) == json.dumps(runs[1])


# ---------------------------------------------------------------- the CLI, on the real X-rays and Inception v3


def test_crossval_cli_on_the_demo_xrays(tmp_path, real_backbone_path, capsys):
    image_dir = tmp_path / "images"
    for source in (DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"):
        (image_dir / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image_dir / source.parent.name / source.name)
    common = ["--image_dir", str(image_dir), "--backbone", str(real_backbone_path), "--device", "cpu",
              "--bottleneck_dir", str(tmp_path / "bottlenecks")]
    output = tmp_path / "cv.json"
    code = main(["crossval", *common, "--folds", "4", "--how_many_training_steps", "100", "--train_batch_size", "16",
                 "--output_json", str(output)])
    assert code == 0
    text = capsys.readouterr().out
    for k in (1, 2, 3, 4):
        # 8 + 8 single images in 4 folds: exactly 2 of each class held out per fold.
        assert re.search(rf"^Fold {k}/4: accuracy = \d+\.\d% \(\d/4, 95% CI [\d.]+-[\d.]+%\); "
                         r"held out normal 2, pneumonia 2; trained on 12$", text, re.M)
    assert re.search(r"^Cross-validated accuracy = \d+\.\d% \(N=16, 95% CI [\d.]+-[\d.]+%\)$", text, re.M)
    assert re.search(r"^Sensitivity \(pneumonia\) = ", text, re.M)

    result = json.loads(output.read_text())
    predictions = result["predictions"]
    assert sorted(p["file"] for p in predictions) == sorted(
        f"{f.parent.name}/{f.name}" for f in image_dir.glob("*/*.jpeg"))
    correct = sum(p["predicted"] == p["true"] for p in predictions)
    assert result["pooled"]["accuracy"]["successes"] == correct
    assert sum(row["accuracy"]["successes"] for row in result["per_fold"]) == correct
    assert correct > 8  # pneumonia vs normal X-rays: better than a coin on 16 images
    for p in predictions:
        assert p["predicted"] == ["normal", "pneumonia"][int(np.argmax(p["probabilities"]))]

    # Too many folds: one line naming the class and the fix, exit code 2 (bottlenecks now come from the cache).
    assert main(["crossval", *common, "--folds", "9", "--output_json", str(output)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["mini_retrain: error: --folds 9 is more than class 'normal' has independent images "
                     "(8 patient groups); use --folds 8 or fewer"]


def test_crossval_takes_class_balancing_and_writes_a_report(tmp_path, real_backbone_path, monkeypatch, capsys):
    """retrain's --class_balancing reaches every fold; --report writes the pooled results with a record of the run."""
    import mini_retrain.commands.crossval as crossval_module

    image_dir = tmp_path / "images"
    for source in (DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"):
        (image_dir / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image_dir / source.parent.name / source.name)
    seen = []
    real_train_layer = crossval_module.train_layer
    monkeypatch.setattr(crossval_module, "train_layer",
                        lambda *args, **kwargs: seen.append(kwargs["class_balancing"]) or
                        real_train_layer(*args, **kwargs))
    output, report = tmp_path / "cv.json", tmp_path / "report"
    assert main(["crossval", "--image_dir", str(image_dir), "--backbone", str(real_backbone_path), "--device", "cpu",
                 "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--folds", "4", "--how_many_training_steps", "50",
                 "--class_balancing", "off", "--output_json", str(output), "--report", str(report)]) == 0
    assert seen == [False] * 4 and json.loads(output.read_text())["class_balancing"] == "off"
    assert f"Wrote report {report / 'index.html'}" in capsys.readouterr().out
    page = (report / "index.html").read_text()
    assert "mini_retrain cross-validation report (4 folds)" in page and "Test set of 16 images" in page
    assert f"--image_dir {image_dir}" in page and "--class_balancing off" in page and "--folds 4" in page
    assert "--output_graph" not in page  # retrain's flags are not crossval's
    assert "Misclassified images" in page
