"""Cached distorted copies (pipeline/distorted_copies.py) and how training, retrain, crossval and sweep use them.

A tiny ONNX backbone made in the test (conftest.tiny_backbone) stands in for Inception v3: this is plumbing.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from mini_retrain.cli import main
from mini_retrain.core.train import train_final_layer
from mini_retrain.pipeline import distorted_copies
from mini_retrain.pipeline.backbone import load_backbone
from mini_retrain.pipeline.bottlenecks import get_bottlenecks
from mini_retrain.pipeline.distorted_copies import get_distorted_copies
from mini_retrain.pipeline.distortions import Distortions

CROP = Distortions(random_crop=20, random_brightness=30)
QUIET = dict(log=lambda line: None)


def films(folder, count: int, seed: int = 0) -> list:
    """`count` small random grey PNG films (every one different)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = folder / f"film{seed}_{number:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 34), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def setup(tmp_path, tiny_backbone):
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    paths = films(tmp_path / "films", 7)
    keys = get_bottlenecks(paths, backbone, tmp_path / "cache", **QUIET).keys
    return backbone, paths, keys


def test_copies_are_reproducible_and_do_not_depend_on_the_order_of_the_films(setup, tmp_path):
    backbone, paths, keys = setup
    first = get_distorted_copies(paths, keys, backbone, tmp_path / "a", CROP, 2, random_seed=5, **QUIET)
    again = get_distorted_copies(paths, keys, backbone, tmp_path / "b", CROP, 2, random_seed=5, **QUIET)
    assert first.values.shape == (2, 7, 4) and first.computed == again.computed == 14
    np.testing.assert_array_equal(first.values, again.values)  # made twice from nothing: the same numbers
    assert not np.allclose(first.values[0], first.values[1])  # copy 1 and copy 2 are different draws
    reverse = get_distorted_copies(paths[::-1], keys[::-1], backbone, tmp_path / "c", CROP, 2, random_seed=5, **QUIET)
    np.testing.assert_allclose(reverse.values[:, ::-1], first.values, rtol=1e-5, atol=1e-6)
    other_seed = get_distorted_copies(paths, keys, backbone, tmp_path / "d", CROP, 2, random_seed=6, **QUIET)
    assert not np.allclose(other_seed.values, first.values)


def test_a_second_run_makes_none_and_a_changed_setting_remakes_only_what_it_affects(setup, tmp_path, capsys):
    backbone, paths, keys = setup
    cache = tmp_path / "copies"
    one = get_distorted_copies(paths, keys, backbone, cache, CROP, 1, **QUIET)
    assert (one.computed, one.reused) == (7, 0)
    assert "Creating distorted copies: 0/7" in capsys.readouterr().err  # the bottlenecks' progress line
    again = get_distorted_copies(paths, keys, backbone, cache, CROP, 1, **QUIET)
    assert (again.computed, again.reused) == (0, 7)
    np.testing.assert_array_equal(again.values, one.values)
    assert "Creating distorted copies" not in capsys.readouterr().err

    two = get_distorted_copies(paths, keys, backbone, cache, CROP, 2, **QUIET)  # N 1 -> 2: only copy 2 is made
    assert (two.computed, two.reused) == (7, 7)
    np.testing.assert_array_equal(two.values[0], one.values[0])

    brighter = CROP._replace(random_brightness=40)  # one setting changed: every copy has a new key
    changed = get_distorted_copies(paths, keys, backbone, cache, brighter, 2, **QUIET)
    assert (changed.computed, changed.reused) == (14, 0)
    assert not np.allclose(changed.values, two.values)
    back = get_distorted_copies(paths, keys, backbone, cache, CROP, 2, **QUIET)  # the old ones are still there
    assert (back.computed, back.reused) == (0, 14)

    fewer = get_distorted_copies(paths[:3], keys[:3], backbone, cache, CROP, 2, **QUIET)
    assert fewer.computed == 0 and np.array_equal(fewer.values, two.values[:, :3])


def test_identical_films_share_their_copies(setup, tmp_path):
    backbone, paths, keys = setup
    doubled = get_distorted_copies(paths + paths[:2], keys + keys[:2], backbone, tmp_path / "x", CROP, 2, **QUIET)
    assert doubled.computed == 14 and doubled.reused == 4
    np.testing.assert_array_equal(doubled.values[:, 7:], doubled.values[:, :2])


def test_an_interrupted_run_keeps_its_finished_batches(setup, tmp_path, monkeypatch):
    backbone, paths, keys = setup
    real_run = distorted_copies.run_backbone
    calls = []

    def interrupted_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(distorted_copies, "run_backbone", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        get_distorted_copies(paths, keys, backbone, tmp_path / "cache", CROP, 2, batch_size=4, **QUIET)
    monkeypatch.setattr(distorted_copies, "run_backbone", real_run)
    resumed = get_distorted_copies(paths, keys, backbone, tmp_path / "cache", CROP, 2, batch_size=4, **QUIET)
    assert (resumed.computed, resumed.reused) == (10, 4)
    fresh = get_distorted_copies(paths, keys, backbone, tmp_path / "fresh", CROP, 2, batch_size=4, **QUIET)
    np.testing.assert_allclose(resumed.values, fresh.values, rtol=1e-5, atol=1e-6)


def test_copies_need_a_whole_number_and_sane_settings(setup, tmp_path):
    backbone, paths, keys = setup
    with pytest.raises(ValueError, match="distorted_copies"):
        get_distorted_copies(paths, keys, backbone, tmp_path, CROP, 0, **QUIET)
    with pytest.raises(ValueError, match="random_contrast"):
        get_distorted_copies(paths, keys, backbone, tmp_path, Distortions(random_contrast=150), 1, **QUIET)


# ------------------------------------------------------------------------------------------------ the training loop

def test_training_draws_class_then_film_then_one_of_its_versions_uniformly(monkeypatch):
    """30 films of class 0, 10 of class 1, 2 copies each. Row i's bottleneck is (i, version), so every row the loop
    trains on says which film and which version it is. Documented: P(class) = 1/2, P(film | class) uniform,
    P(version) = 1/3 whatever the film."""
    from mini_retrain.core import train

    labels = np.array([0] * 30 + [1] * 10)
    films_ = np.arange(40, dtype=np.float32)
    bottlenecks = np.stack([films_, np.zeros(40, np.float32)], axis=1)  # (40, 2)
    copies = np.stack([np.stack([films_, np.full(40, v, np.float32)], axis=1) for v in (1, 2)])  # (2, 40, 2)
    seen = []
    real = train.gradients

    def recording(x, *args):
        seen.append(x.copy())
        return real(x, *args)

    monkeypatch.setattr(train, "gradients", recording)
    train_final_layer(bottlenecks, labels, np.zeros((0, 2), np.float32), np.zeros(0, np.int64), 2,
                      np.random.default_rng(0), how_many_training_steps=300, learning_rate=0.01, train_batch_size=100,
                      validation_batch_size=-1, eval_step_interval=1000, class_balancing=True,
                      log=lambda line: None, train_copies=copies)
    drawn = np.concatenate(seen)  # (30000, 2)
    film, version = drawn[:, 0].astype(int), drawn[:, 1].astype(int)
    assert stats.binomtest(int((labels[film] == 1).sum()), len(film), 0.5).pvalue > 1e-3
    assert stats.chisquare(np.bincount(version, minlength=3)).pvalue > 1e-3
    assert stats.chisquare(np.bincount(film[labels[film] == 1], minlength=40)[30:]).pvalue > 1e-3
    assert stats.chisquare(np.bincount(film[labels[film] == 0], minlength=40)[:30]).pvalue > 1e-3
    # the version does not depend on the film or its class
    table = np.array([np.bincount(version[labels[film] == c], minlength=3) for c in (0, 1)])  # (2 classes, 3)
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_copies_must_match_the_training_rows():
    with pytest.raises(ValueError, match="train_copies"):
        train_final_layer(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), np.zeros((0, 2), np.float32),
                          np.zeros(0, np.int64), 2, np.random.default_rng(0), how_many_training_steps=1,
                          learning_rate=0.01, train_batch_size=4, validation_batch_size=-1, eval_step_interval=1,
                          class_balancing=True, log=lambda line: None,
                          train_copies=np.zeros((1, 3, 2), np.float32))


# ------------------------------------------------------------------------------------------------ the commands

@pytest.fixture
def image_dir(tmp_path):
    for seed, label in enumerate(("normal", "pneumonia")):
        films(tmp_path / "images" / label, 14, seed)
    return tmp_path / "images"


def run(arguments: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(arguments)
    return code, out.getvalue(), err.getvalue()


def retrain_arguments(tmp_path, image_dir, backbone, *extra) -> list[str]:
    return ["retrain", "--image_dir", str(image_dir), "--backbone", str(backbone), "--device", "cpu",
            "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--output_graph", str(tmp_path / "graph.onnx"),
            "--output_labels", str(tmp_path / "labels.txt"), "--how_many_training_steps", "20",
            "--testing_percentage", "25", "--validation_percentage", "25", *extra]


def test_retrain_makes_copies_of_the_training_films_only_then_finds_them(tmp_path, image_dir, tiny_backbone,
                                                                        monkeypatch):
    distorted_files = []
    real_read = distorted_copies.read_for_distortion
    monkeypatch.setattr(distorted_copies, "read_for_distortion",
                        lambda path, *args: distorted_files.append(path.relative_to(image_dir).as_posix())
                        or real_read(path, *args))
    seen_copies = []
    real_train = train_final_layer

    def spy(train_x, *args, **kwargs):
        seen_copies.append((train_x.shape, kwargs["train_copies"]))
        return real_train(train_x, *args, **kwargs)

    from mini_retrain.commands import retrain as retrain_module

    monkeypatch.setattr(retrain_module, "train_final_layer", spy)
    arguments = retrain_arguments(tmp_path, image_dir, tiny_backbone, "--random_crop", "10", "--distorted_copies",
                                  "2")
    code, out, _ = run(arguments)
    assert code == 0
    from mini_retrain.core.split import split_image_lists
    from mini_retrain.pipeline.image_lists import find_images

    splits, _ = split_image_lists(find_images(image_dir)[0], 25, 25)
    training = {f for label in splits for f in splits[label]["training"]}
    others = {f for label in splits for split in ("validation", "testing") for f in splits[label][split]}
    assert others and set(distorted_files) == training  # every training film, and no validation or test film
    assert f"{2 * len(training)} distorted copies ready (2 of each of {len(training)} training films, " \
           f"random_crop=10): {2 * len(training)} made now, 0 from the cache" in out
    (shape, copies), = seen_copies
    assert copies.shape == (2, *shape)

    distorted_files.clear()
    code, out, _ = run(arguments)
    assert code == 0 and distorted_files == []
    assert f"0 made now, {2 * len(training)} from the cache" in out


def test_retrain_distort_every_step_is_retrains_slow_way(tmp_path, image_dir, tiny_backbone, monkeypatch):
    calls = []
    from mini_retrain.commands import retrain as retrain_module

    real = retrain_module.run_backbone
    monkeypatch.setattr(retrain_module, "run_backbone", lambda *args, **kwargs: calls.append(1) or real(*args,
                                                                                                       **kwargs))
    code, out, _ = run(retrain_arguments(tmp_path, image_dir, tiny_backbone, "--random_rotation", "5",
                                         "--distort_every_step", "--how_many_training_steps", "3",
                                         "--train_batch_size", "4"))
    assert code == 0 and len(calls) == 3  # the backbone ran once per training step
    assert "distorted copies ready" not in out and "--distort_every_step" in out
    assert not list((tmp_path / "bottlenecks").glob("*-distorted-*"))


@pytest.mark.parametrize("extra, message", [
    (["--distort_every_step"], "--distort_every_step needs a distortion flag"),
    (["--random_crop", "10", "--distorted_copies", "0"], "--distorted_copies must be a whole number >= 1, got 0"),
    (["--random_contrast", "100"], "random_contrast must be a percentage below 100"),
    (["--random_rotation", "-3"], "random_rotation is degrees"),
])
def test_bad_distortion_flags_stop_retrain_before_any_work(tmp_path, image_dir, extra, message):
    code, out, err = run(retrain_arguments(tmp_path, image_dir, tmp_path / "no-backbone.onnx", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert out == ""  # not even the images were listed


def test_crossval_trains_each_fold_on_the_copies_of_its_training_films_only(tmp_path, image_dir, tiny_backbone,
                                                                           monkeypatch):
    from mini_retrain.commands import crossval as crossval_module

    folds = []
    real = crossval_module.train_layer

    def spy(x, y, *args, train_copies=None, **kwargs):
        folds.append((x.copy(), train_copies))
        return real(x, y, *args, train_copies=train_copies, **kwargs)

    monkeypatch.setattr(crossval_module, "train_layer", spy)
    output = tmp_path / "crossval.json"
    code, out, _ = run(["crossval", "--image_dir", str(image_dir), "--backbone", str(tiny_backbone), "--device",
                        "cpu", "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--folds", "3",
                        "--how_many_training_steps", "10", "--random_crop", "10", "--output_json", str(output)])
    assert code == 0 and "28 distorted copies ready" in out
    result = json.loads(output.read_text())
    assert result["distortions"] == "random_crop=10" and result["distorted_copies"] == 1
    # the copies of all 28 films, in the cache: fold k's training copies are those of its training rows
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    files = [image_dir / row["file"] for row in result["predictions"]]
    keys = get_bottlenecks(files, backbone, tmp_path / "bottlenecks", **QUIET).keys
    every = get_distorted_copies(files, keys, backbone, tmp_path / "bottlenecks", Distortions(random_crop=10), 1,
                                 **QUIET)
    assert every.computed == 0
    fold_of = np.array([row["fold"] for row in result["predictions"]])
    assert len(folds) == 3
    for k, (_, copies) in enumerate(folds, start=1):
        np.testing.assert_array_equal(copies, every.values[:, fold_of != k])


def test_sweep_compares_named_distortions_on_cached_copies(tmp_path, image_dir, tiny_backbone):
    output = tmp_path / "sweep.json"
    arguments = ["sweep", "--image_dir", str(image_dir), "--backbone", str(tiny_backbone), "--device", "cpu",
                 "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--learning_rates", "0.01",
                 "--how_many_training_steps", "20", "--class_balancing", "on", "--validation_percentage", "25",
                 "--testing_percentage", "25", "--distortions", "none", "crop:random_crop=10,flip_left_right",
                 "random_rotation=5", "--distorted_copies", "2", "--output_json", str(output)]
    code, out, _ = run(arguments)
    assert code == 0
    result = json.loads(output.read_text())
    assert [row["distortions"] for row in result["settings"]] == ["none", "crop", "random_rotation=5"]
    assert [row["distorted_copies"] for row in result["settings"]] == [0, 2, 2]
    assert out.count(" made now, 0 from the cache") == 2
    chosen = result["settings"][result["chosen_index"]]
    assert result["chosen"]["distortions"] == chosen["distortions"]
    expected_flags = {"none": "", "crop": "--flip_left_right --random_crop 10 --distorted_copies 2 ",
                      "random_rotation=5": "--random_rotation 5 --distorted_copies 2 "}[chosen["distortions"]]
    assert f"mini_retrain retrain --image_dir {image_dir} {expected_flags}--learning_rate" in out

    code, out, _ = run(arguments)  # on cached copies: none made again
    assert code == 0 and out.count(" 0 made now, ") == 2


@pytest.mark.parametrize("setting, message", [
    ("random_crop", "needs a number"), ("tilt=5", "not a distortion"), ("flip_left_right=1", "without a value"),
    ("random_gamma=-2", "random_gamma"), ("random_crop=1,random_crop=2", "given twice"),
])
def test_sweep_refuses_a_bad_distortion_setting_with_its_text(tmp_path, image_dir, setting, message):
    code, out, err = run(["sweep", "--image_dir", str(image_dir), "--backbone", str(tmp_path / "none.onnx"),
                          "--distortions", "none", setting])
    assert code == 2 and message in err and setting in err and out == ""


@pytest.mark.parametrize("extra, session_kept", [
    ([], False), (["--random_crop", "10"], False), (["--random_crop", "10", "--distort_every_step"], True),
])
def test_the_network_session_is_released_once_no_step_needs_it(tmp_path, image_dir, tiny_backbone, monkeypatch,
                                                                extra, session_kept):
    """Its memory arena (0.75 GB for Inception v3) is freed before training and the export, unless every step runs
    the network (benchmarks/README.md, Memory of a whole run)."""
    from mini_retrain.commands import retrain as retrain_module
    from mini_retrain.pipeline import export

    sessions = []
    real = export.build_retrained_model

    def spy(backbone, *args, **kwargs):
        sessions.append(backbone.session)
        return real(backbone, *args, **kwargs)

    monkeypatch.setattr(retrain_module, "build_retrained_model", spy, raising=False)
    monkeypatch.setattr(export, "build_retrained_model", spy)
    code, _, err = run(retrain_arguments(tmp_path, image_dir, tiny_backbone, *extra))
    assert code == 0, err
    assert len(sessions) == 1 and (sessions[0] is not None) == session_kept
