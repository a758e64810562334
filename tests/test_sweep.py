"""Tests for mini_retrain.commands.sweep: the two samplers, the selection rule, the test split's exclusion from the choice,
and the CLI on the real demo X-rays with the real Inception v3."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import mini_retrain.commands.sweep as sweep_module
from mini_retrain.cli import main
from mini_retrain.pipeline.dataset import Dataset
from mini_retrain.core.sampling import sample_batch, uniform_batch
from mini_retrain.core.softmax_layer import softmax
from mini_retrain.commands.sweep import choose_setting, grid_search, parse_grid
from mini_retrain.core.train import train_final_layer, train_layer
from tests.conftest import DEMO_DATA


def quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------- samplers and training


def test_uniform_batch_follows_the_class_frequencies_and_sample_batch_does_not():
    labels = np.array([0] * 900 + [1] * 100)
    uniform = uniform_batch(labels, 40_000, np.random.default_rng(0))
    balanced = sample_batch(labels, 40_000, np.random.default_rng(0))
    # Binomial(40000, p) proportions have standard deviation <= 0.0025; allow 4 of them.
    assert np.mean(labels[uniform] == 1) == pytest.approx(0.1, abs=0.01)
    assert np.mean(labels[balanced] == 1) == pytest.approx(0.5, abs=0.01)
    # Every image equally likely: 40 draws each on average; a minority image is not drawn 9x more often.
    counts = np.bincount(uniform, minlength=1000)
    assert counts[900:].mean() == pytest.approx(40, rel=0.1) and counts[:900].mean() == pytest.approx(40, rel=0.1)
    assert uniform.min() >= 0 and uniform.max() <= 999 and uniform.shape == (40_000,)


def test_uniform_batch_all_and_bad_sizes():
    np.testing.assert_array_equal(uniform_batch(np.array([1, 0, 1]), -1, np.random.default_rng(0)), [0, 1, 2])
    for size in (0, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive whole number"):
            uniform_batch(np.array([0, 1]), size, np.random.default_rng(0))


def test_train_layer_with_retrains_sampler_is_train_final_layer():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 16)).astype(np.float32), rng.integers(0, 3, 50)
    knobs = dict(how_many_training_steps=120, learning_rate=0.05, train_batch_size=10, class_balancing=True)
    ours = train_layer(x, y, 3, np.random.default_rng(4), **knobs)
    theirs, _ = train_final_layer(x, y, np.empty((0, 16)), np.empty(0, np.int64), 3, np.random.default_rng(4),
                                  validation_batch_size=100, eval_step_interval=10, log=quiet, **knobs)
    np.testing.assert_array_equal(ours.weights, theirs.weights)
    np.testing.assert_array_equal(ours.biases, theirs.biases)


@pytest.mark.parametrize("class_balancing, expected_p1", [(False, 0.1), (True, 0.5)])
def test_with_no_signal_the_layer_learns_the_class_frequency_of_its_batches(class_balancing, expected_p1):
    """Bottlenecks all 0: logits = biases, and the loss is minimised where softmax(biases) equals the class
    frequencies of the batches: 10% for uniform sampling of a 90/10 set, 50% for class-balanced sampling."""
    labels = np.array([0] * 90 + [1] * 10)
    layer = train_layer(np.zeros((100, 1)), labels, 2, np.random.default_rng(0), how_many_training_steps=3000,
                        learning_rate=0.5, train_batch_size=100, class_balancing=class_balancing)
    assert softmax(layer.biases)[1] == pytest.approx(expected_p1, abs=0.04)


# ---------------------------------------------------------------- choosing


def row(successes: int, cross_entropy: float, n: int = 10) -> dict:
    return {"validation_accuracy": {"successes": successes, "n": n, "estimate": successes / n},
            "validation_cross_entropy": cross_entropy}


def test_choose_highest_accuracy_then_lowest_cross_entropy_then_first():
    assert choose_setting([row(7, 0.1), row(8, 0.9), row(6, 0.01)]) == 1  # accuracy first, whatever the loss
    assert choose_setting([row(8, 0.5), row(8, 0.2), row(8, 0.3)]) == 1  # tie: lower cross-entropy
    assert choose_setting([row(5, 0.4), row(9, 0.3), row(9, 0.3)]) == 1  # full tie: the earlier one
    with pytest.raises(ValueError, match="no settings"):
        choose_setting([])


def test_parse_grid_and_its_messages():
    assert parse_grid("0.001, 0.01,0.1", "500,4000", "off,on") == ([0.001, 0.01, 0.1], [500, 4000], [False, True])
    assert parse_grid("1e-3", "7", "on") == ([0.001], [7], [True])
    bad = [(("0.01,,0.1", "5", "on"), "learning_rates '0.01,,0.1' has an empty item"),
           (("-1", "5", "on"), "learning_rates: '-1' is not a positive number"),
           (("fast", "5", "on"), "learning_rates: 'fast' is not a positive number"),
           (("nan", "5", "on"), "learning_rates: 'nan' is not a positive number"),
           (("0.1", "0", "on"), "how_many_training_steps: '0' is not a whole number >= 1"),
           (("0.1", "1.5", "on"), "how_many_training_steps: '1.5' is not a whole number >= 1"),
           (("0.1", "5", "yes"), "class_balancing: 'yes' is neither 'on' nor 'off'")]
    for arguments, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_grid(*arguments)


def split_dataset(test_labels_flipped: bool, test_noise_seed: int | None = None) -> Dataset:
    """Class = sign of the first bottleneck number, 40 training / 20 validation / 20 test images.

    test_labels_flipped makes the test split adversarial: a layer that learnt the rule scores 0% on it, one that
    learnt nothing scores whatever its random start gives (far more, with this seed), so choosing on the test split
    would pick a setting that learnt nothing."""
    rng = np.random.default_rng(0)
    n = 80
    classes = np.repeat([0, 1], n // 2)
    bottlenecks = rng.standard_normal((n, 8)).astype(np.float32)
    bottlenecks[:, 0] = np.where(classes == 1, 1.0, -1.0) * (1.0 + rng.random(n))
    splits = np.array((["training"] * 20 + ["validation"] * 10 + ["testing"] * 10) * 2)
    test = splits == "testing"
    labels = classes.copy()
    if test_labels_flipped:
        labels[test] = 1 - labels[test]
    if test_noise_seed is not None:
        bottlenecks[test] = np.random.default_rng(test_noise_seed).standard_normal((test.sum(), 8))
    files = [f"c{c}/img{i}.png" for i, c in enumerate(classes)]
    return Dataset(Path("synthetic"), ["normal", "tb"], files, splits, labels.astype(np.int64), bottlenecks,
                   [f"k{i}" for i in range(n)], None)


GRID = dict(learning_rates=[1e-7, 0.5], how_many_training_steps=[1, 200], class_balancing=[False, True], random_seed=0)


def test_the_test_split_never_influences_the_choice(monkeypatch):
    evaluated = []
    real_evaluate = sweep_module.evaluate
    monkeypatch.setattr(sweep_module, "evaluate",
                        lambda probabilities, labels, *rest: evaluated.append(labels) or
                        real_evaluate(probabilities, labels, *rest))
    lines = []
    adversarial = grid_search(split_dataset(test_labels_flipped=True), **GRID, train_batch_size=20, log=lines.append)

    # Test metrics are computed once, for the winner only, on the test images.
    assert len(evaluated) == 1 and len(evaluated[0]) == 20
    assert all("test" not in key for setting in adversarial["settings"] for key in setting)
    # Validation picks a learning rate that learnt the rule (100% on validation) ...
    chosen = adversarial["chosen"]
    assert chosen["learning_rate"] == 0.5 and chosen["validation_accuracy"]["successes"] == 20
    # ... which the flipped test split scores at 0%: the test result belongs to the winner, and was not chosen for.
    assert adversarial["test"]["accuracy"]["successes"] == 0
    assert "Final test accuracy = 0.0% (N=20" in "\n".join(lines)

    # Changing only the test split (labels back, bottlenecks replaced by noise) changes nothing about the choice.
    for honest in (split_dataset(test_labels_flipped=False), split_dataset(False, test_noise_seed=9)):
        other = grid_search(honest, **GRID, train_batch_size=20, log=quiet)
        assert other["settings"] == adversarial["settings"] and other["chosen_index"] == adversarial["chosen_index"]
    assert other["test"]["n"] == 20


def test_grid_search_rows_table_and_winner_follow_the_rule():
    lines = []
    result = grid_search(split_dataset(False), **GRID, train_batch_size=20, log=lines.append)
    rows = result["settings"]
    assert [(r["learning_rate"], r["how_many_training_steps"], r["class_balancing"]) for r in rows] == [
        (rate, steps, balancing) for rate in (1e-7, 0.5) for steps in (1, 200) for balancing in ("off", "on")]
    assert all(r["validation_accuracy"]["n"] == 20 for r in rows)
    # The winner by the rule, worked out here with a sort: most correct, then lowest loss, then grid order.
    expected = sorted(range(8), key=lambda i: (-rows[i]["validation_accuracy"]["successes"],
                                               rows[i]["validation_cross_entropy"], i))[0]
    assert result["chosen_index"] == expected and result["chosen"] == rows[expected]
    # A learning rate of 1e-7 barely moves the weights from their tiny start; 0.5 for 200 steps fits the rule.
    assert rows[-1]["validation_cross_entropy"] < 0.2 < rows[0]["validation_cross_entropy"]
    table = [line for line in lines if re.match(r"^[ *] +[\d.e-]+ +\d+ +(on|off)  ", line)]
    assert len(table) == 8 and [line[0] for line in table].count("*") == 1
    assert table[expected].startswith("*")
    json.dumps(result)


def test_no_validation_images_is_a_clear_error():
    dataset = split_dataset(False)
    dataset = dataset._replace(splits=np.where(dataset.splits == "validation", "training", dataset.splits))
    with pytest.raises(ValueError, match="no validation images to choose on; raise validation_percentage"):
        grid_search(dataset, [0.1], [5], [True], random_seed=0, train_batch_size=100, log=quiet)


# ---------------------------------------------------------------- the CLI, on the real X-rays and Inception v3


def test_sweep_cli_on_the_demo_xrays(tmp_path, real_backbone_path, capsys):
    image_dir = tmp_path / "images"
    for source in (DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"):
        (image_dir / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image_dir / source.parent.name / source.name)
    output = tmp_path / "sweep.json"
    common = ["--image_dir", str(image_dir), "--backbone", str(real_backbone_path), "--device", "cpu",
              "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--output_json", str(output)]
    code = main(["sweep", *common, "--validation_percentage", "25", "--testing_percentage", "25",
                 "--learning_rates", "0.001,0.1", "--how_many_training_steps", "5,50", "--train_batch_size", "16"])
    assert code == 0
    text = capsys.readouterr().out
    # retrain.py's hash split at 25% / 25% of these 16 files: 4 validation, 2 test (split.py, tested there).
    assert "Validation results of 8 settings (N=4 validation images; test images not used):" in text
    table = re.findall(r"^([ *]) +([\d.]+) +(\d+) +(on|off)  +\d+\.\d% \(\d/4, 95% CI [\d.]+-[\d.]+%\) +(\d+\.\d+)$",
                       text, re.M)
    assert [(rate, steps, balancing) for _, rate, steps, balancing, _ in table] == [
        (rate, steps, balancing) for rate in ("0.001", "0.1") for steps in ("5", "50") for balancing in ("off", "on")]
    assert [mark for mark, *_ in table].count("*") == 1
    assert re.search(r"^Chosen on validation only .*: learning_rate [\d.]+, \d+ steps, class balancing (on|off)$",
                     text, re.M)
    assert re.search(r"^Final test accuracy = \d+\.\d% \(N=2, 95% CI [\d.]+-[\d.]+%\)$", text, re.M)
    # The winner's retrain command is printed with the folder the sweep ran on, and retrain accepts it as it stands.
    command = re.search(r"^To retrain with these settings: mini_retrain (retrain --image_dir (\S+) .*)$", text, re.M)
    assert command.group(2) == str(image_dir)
    winner_flags = command.group(1).split()[1:]
    assert winner_flags[winner_flags.index("--class_balancing") + 1] in ("on", "off")
    graph = tmp_path / "winner.onnx"
    assert main(["retrain", *winner_flags, "--output_graph", str(graph),
                 "--output_labels", str(tmp_path / "winner.txt"), "--backbone", str(real_backbone_path),
                 "--device", "cpu", "--bottleneck_dir", str(tmp_path / "bottlenecks")]) == 0
    assert graph.exists()
    # ... on the sweep's split (its 25% / 25%, not retrain's default 10% / 10%): the same 2 test images
    assert re.search(r"^Final test accuracy = \d+\.\d% \(N=2, ", capsys.readouterr().out, re.M)

    result = json.loads(output.read_text())
    rows = result["settings"]
    assert len(rows) == 8 and result["test"]["n"] == 2
    best = max(range(8), key=lambda i: (rows[i]["validation_accuracy"]["successes"],
                                        -rows[i]["validation_cross_entropy"], -i))
    assert result["chosen_index"] == best and table[best][0] == "*"
    assert table[best][4] == f"{rows[best]['validation_cross_entropy']:.4f}"

    # A bad grid value: one line, exit code 2, before any image is read.
    assert main(["sweep", *common, "--how_many_training_steps", "500,lots"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mini_retrain: error: --how_many_training_steps: 'lots' is not a whole number >= 1; "
        "e.g. --how_many_training_steps 500,4000"]
