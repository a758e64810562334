"""retrain.py's flags and their defaults, written once: the command line (cli.py), the Python API and every command
read them from here. The functions that do the work (core/train.py, ...) take them as arguments without defaults.

A RetrainSettings checks itself when it is made, so a bad value fails at once, before any image is read:

    RetrainSettings(image_dir="lungs", learning_rate=-1)   ->  ValueError: learning_rate must be a finite number > 0

`check_settings` checks every output path the same way, BEFORE any work, and `output_files` says where each output
goes: beside the graph, named after it, unless the user names another place.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mini_retrain.core.checks import check_batch_size, check_distortions, check_positive, check_split_percentages
from mini_retrain.paths import cache_dir

DEVICES = ("auto", "cpu", "cuda")  # where onnxruntime runs: auto = CUDA when available, else CPU
PRECISIONS = ("fp32", "int8")  # float32 (the default), or the int8 file quantised from it (build/quantize.py)
ON_BAD_IMAGE = ("skip", "error")  # an unreadable image: skip it with a message, or stop
DISTORTION_FLAGS = ("flip_left_right", "random_crop", "random_scale", "random_brightness",  # retrain.py's four
                    "random_rotation", "random_contrast", "random_gamma", "random_noise")  # four for X-rays


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
    """retrain.py's flags, with its defaults (paths default to the current folder rather than /tmp).

    Paths may be given as str or any os.PathLike; they are kept as pathlib.Path."""

    image_dir: Path
    output_graph: Path = Path("retrained_graph.onnx")
    output_labels: Path | None = None  # default: beside the graph, <output_graph>.labels.txt (output_files)
    output_weights: Path | None = None  # default: <output_graph>.final_layer.npz
    summaries_dir: Path | None = None
    bottleneck_dir: Path | None = None  # default: the per-user cache (bottlenecks are keyed by content)
    backbone: Path | None = None
    device: str = "auto"
    precision: str = "fp32"  # or "int8": the backbone quantised from the float32 one (build/quantize.py)
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
    random_rotation: float = 0.0  # degrees; this and the next three are for X-rays (pipeline/distortions.py)
    random_contrast: float = 0.0
    random_gamma: float = 0.0
    random_noise: float = 0.0
    distorted_copies: int = 1  # cached distorted copies of each training film (pipeline/distorted_copies.py)
    distort_every_step: bool = False  # retrain.py's slow way instead: a fresh distortion of every image, every step
    intermediate_store_frequency: int = 0
    intermediate_output_graphs_dir: Path | None = None  # default: <output_graph folder>/intermediate_graphs
    random_seed: int = 0
    class_balancing: bool = True  # retrain.py's batches: a class uniformly, then an image (see sampling.py)
    fast_decode: bool = False  # JPEG draft + Image.reduce before the resize (images.py); stored in the graph
    bottleneck_layers: str = "pool_3"  # comma-separated backbone layers, each globally averaged, side by side
    on_bad_image: str = "skip"
    group_pattern: str | None = None  # regex: file names with the same match are one patient (split.py)
    positive_label: str | None = None
    explain_misclassified: Path | None = None
    report: Path | None = None
    dask_scheduler: str | None = None  # a Dask scheduler's address: its workers compute the bottlenecks (cluster.py)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if "Path" in str(field.type) and value is not None:
                if not isinstance(value, str | os.PathLike) or str(value) == "":
                    raise ValueError(f"{field.name} must be a path (str or os.PathLike), got {value!r}")
                object.__setattr__(self, field.name, Path(value))  # frozen: set once, here
            elif field.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be True or False, got {value!r}")
        if self.output_graph.suffix != ".onnx":
            fault = ("is a folder, not a file name; choose another output path ending in .onnx"
                     if self.output_graph.is_dir() else
                     f"must end in .onnx: a file name, e.g. {self.output_graph / 'retrained_graph.onnx'}")
            raise ValueError(f"{self.output_graph}: output_graph {fault}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'skip' or 'error', not {self.on_bad_image!r}")
        check_positive(self.how_many_training_steps, "how_many_training_steps", integer=True)
        check_positive(self.learning_rate, "learning_rate")
        check_positive(self.eval_step_interval, "eval_step_interval", integer=True)
        check_split_percentages(self.validation_percentage, self.testing_percentage)
        for name in ("train_batch_size", "test_batch_size", "validation_batch_size"):
            check_batch_size(getattr(self, name), name)
        check_distortions({name: getattr(self, name) for name in DISTORTION_FLAGS})
        check_positive(self.distorted_copies, "distorted_copies", integer=True)
        if self.distort_every_step and not any(getattr(self, name) for name in DISTORTION_FLAGS):
            raise ValueError("distort_every_step needs a distortion flag (e.g. random_crop=10); without one there "
                             "is nothing to distort")
        for name in ("intermediate_store_frequency", "random_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if not isinstance(self.final_tensor_name, str) or not self.final_tensor_name:
            raise ValueError(f"final_tensor_name must be a non-empty name, got {self.final_tensor_name!r}")
        if self.positive_label is not None and not isinstance(self.positive_label, str):
            raise ValueError(f"positive_label must be a class name or None, got {self.positive_label!r}")


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
    """Everything retrain can check before the first image is decoded: the values (checked when the settings were
    made, in __post_init__), then every output path.

    (The classes are checked next, once the folder is listed: --positive_label in pipeline/dataset.py.)"""
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
