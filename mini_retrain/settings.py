"""retrain.py's flags and their defaults, written once: the command line (cli.py), the Python API and every command
read them from here.

`check_settings` checks every value and every output path BEFORE any work: a run that would fail after an hour of
bottlenecks fails at once instead, with one line naming the flag and the fix. `output_files` says where each output
goes: beside the graph, named after it, unless the user names another place.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path

from mini_retrain.paths import cache_dir


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
    """retrain.py's flags, with its defaults (paths default to the current folder rather than /tmp)."""

    image_dir: Path
    output_graph: Path = Path("retrained_graph.onnx")
    output_labels: Path | None = None  # default: beside the graph, <output_graph>.labels.txt (output_files)
    output_weights: Path | None = None  # default: <output_graph>.final_layer.npz
    summaries_dir: Path | None = None
    bottleneck_dir: Path | None = None  # default: the per-user cache (bottlenecks are keyed by content)
    backbone: Path | None = None
    device: str = "auto"
    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    testing_percentage: float = 10.0
    validation_percentage: float = 10.0
    eval_step_interval: int = 10
    train_batch_size: int = 100
    test_batch_size: int = -1
    validation_batch_size: int = 100
    print_misclassified_test_images: bool = False
    final_tensor_name: str = "final_result"
    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0
    intermediate_store_frequency: int = 0
    intermediate_output_graphs_dir: Path | None = None  # default: <output_graph folder>/intermediate_graphs
    random_seed: int = 0
    class_balancing: bool = True  # retrain.py's batches: a class uniformly, then an image (see sampling.py)
    fast_decode: bool = False  # JPEG draft + Image.reduce before the resize (images.py); stored in the graph
    on_bad_image: str = "skip"
    positive_label: str | None = None
    explain_misclassified: Path | None = None
    report: Path | None = None


def default(name: str):
    """The default of one setting, e.g. default("learning_rate") -> 0.01 (what cli.py shows in --help)."""
    return RetrainSettings.__dataclass_fields__[name].default


def bottleneck_folder(settings: RetrainSettings) -> Path:
    """--bottleneck_dir, else the per-user cache: $MINI_RETRAIN_HOME/bottlenecks (paths.cache_dir)."""
    return Path(settings.bottleneck_dir) if settings.bottleneck_dir else cache_dir() / "bottlenecks"


def output_files(settings: RetrainSettings) -> dict[str, Path]:
    """Where retrain writes: every output beside the graph and named after it, unless its flag says otherwise.

        --output_graph lungs/g.onnx  ->  lungs/g.onnx, lungs/g.labels.txt, lungs/g.final_layer.npz,
                                         lungs/g.metrics.json, lungs/intermediate_graphs/ (only with
                                         --intermediate_store_frequency)
    """
    graph = Path(settings.output_graph)
    return {
        "graph": graph,
        "labels": Path(settings.output_labels) if settings.output_labels else graph.with_suffix(".labels.txt"),
        "weights": Path(settings.output_weights) if settings.output_weights else graph.with_suffix(".final_layer.npz"),
        "metrics": graph.with_suffix(".metrics.json"),
        "intermediate_graphs": Path(settings.intermediate_output_graphs_dir) if settings.intermediate_output_graphs_dir
        else graph.parent / "intermediate_graphs",
    }


def _whole(name: str, value, smallest: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < smallest:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= {smallest}; {fix}")


def _batch(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value == 0 or value < -1:
        raise ValueError(f"{name} = {value!r}: must be a whole number >= 1, or -1 for all images; "
                         f"pass --{name} 100 or --{name} -1")


def check_values(settings: RetrainSettings) -> None:
    """Every number and choice of `settings`; ValueError naming the setting (= the flag) and the fix."""
    _whole("how_many_training_steps", settings.how_many_training_steps, 1,
           "pass --how_many_training_steps 1 or more (retrain.py's default is 4000)")
    if not (isinstance(settings.learning_rate, numbers.Real) and math.isfinite(settings.learning_rate)
            and settings.learning_rate > 0):
        raise ValueError(f"learning_rate = {settings.learning_rate!r}: must be a number > 0; "
                         "pass e.g. --learning_rate 0.01")
    _whole("train_batch_size", settings.train_batch_size, 1, "pass --train_batch_size 1 or more (default 100)")
    _whole("eval_step_interval", settings.eval_step_interval, 1, "pass --eval_step_interval 1 or more")
    _whole("intermediate_store_frequency", settings.intermediate_store_frequency, 0,
           "pass --intermediate_store_frequency 0 (never) or a number of steps")
    _batch("validation_batch_size", settings.validation_batch_size)
    _batch("test_batch_size", settings.test_batch_size)
    for name in ("validation_percentage", "testing_percentage"):
        value = getattr(settings, name)
        if not (isinstance(value, numbers.Real) and 0 <= value < 100):
            raise ValueError(f"{name} = {value!r}: must be a percentage from 0 to below 100; pass e.g. --{name} 10")
    if not settings.validation_percentage + settings.testing_percentage < 100:
        raise ValueError(f"validation_percentage + testing_percentage = {settings.validation_percentage:g} + "
                         f"{settings.testing_percentage:g}: must be below 100 so some images are left for training")
    # A margin of 100% already crops half the width away; beyond it the crop would show a small part of the image.
    for name in ("random_crop", "random_scale", "random_brightness"):
        value = getattr(settings, name)
        if not (isinstance(value, numbers.Real) and 0 <= value < 100):
            raise ValueError(f"{name} = {value!r}: must be a percentage from 0 to below 100 "
                             f"(retrain.py's examples use 5 to 30); pass e.g. --{name} 10")
    if settings.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device = {settings.device!r}: must be auto, cpu or cuda")
    if settings.on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image = {settings.on_bad_image!r}: must be skip or error")
    if not str(settings.final_tensor_name).strip():
        raise ValueError("final_tensor_name is empty; pass --final_tensor_name final_result")


def check_writable(path: str | Path, flag: str, is_folder: bool) -> None:
    """Fail now, not after hours of work: `path` (a file, or a folder when is_folder) can be written.

    Nothing is created: the nearest existing folder on the way must be a writable folder, an output file must not
    be an existing folder, an output folder not an existing file."""
    path = Path(path)
    if not is_folder and path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file name; choose another output path for {flag}")
    if is_folder and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: {path} is a file, not a folder; choose another output path for {flag}")
    folder = path.resolve() if is_folder else path.resolve().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{path}: {existing} is a file, not a folder; choose another output path for {flag}")
    try:  # os.access says yes to root on a read-only mount such as /proc: try a real write
        probe = existing / f".mini_retrain_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{path}: cannot write there ({error.strerror}); choose another output path for {flag}") \
            from None


def check_settings(settings: RetrainSettings) -> None:
    """Everything retrain can check before the first image is decoded: the values, then every output path.

    (The classes are checked next, once the folder is listed: --positive_label in pipeline/dataset.py.)"""
    check_values(settings)
    outputs = output_files(settings)
    for key, flag in (("graph", "--output_graph"), ("labels", "--output_labels"), ("weights", "--output_weights"),
                      ("metrics", "--output_graph")):
        check_writable(outputs[key], flag, is_folder=False)
    if outputs["graph"].suffix != ".onnx":
        raise ValueError(f"{outputs['graph']}: --output_graph must be a file name ending in .onnx, "
                         f"e.g. {outputs['graph'] / 'retrained_graph.onnx'}")
    folders = [(settings.summaries_dir, "--summaries_dir"), (bottleneck_folder(settings), "--bottleneck_dir"),
               (settings.explain_misclassified, "--explain_misclassified"), (settings.report, "--report")]
    if settings.intermediate_store_frequency > 0:
        folders.append((outputs["intermediate_graphs"], "--intermediate_output_graphs_dir"))
    for folder, flag in folders:
        if folder is not None:
            check_writable(folder, flag, is_folder=True)
