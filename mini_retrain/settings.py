"""retrain.py's flags and their defaults, written once: the command line (cli.py), the Python API and every command
read them from here. The functions that do the work (core/train.py, ...) take them as arguments without defaults.

A RetrainSettings checks itself when it is made, so a bad value fails at once, before any image is read:

    RetrainSettings(image_dir="lungs", learning_rate=-1)   ->  ValueError: learning_rate must be a finite number > 0
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mini_retrain.core.checks import check_batch_size, check_distortions, check_positive, check_split_percentages

DEVICES = ("auto", "cpu", "cuda")  # where onnxruntime runs: auto = CUDA when available, else CPU
ON_BAD_IMAGE = ("skip", "error")  # an unreadable image: skip it with a message, or stop


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
    """retrain.py's flags, with its defaults (paths default to the current folder rather than /tmp).

    Paths may be given as str or any os.PathLike; they are kept as pathlib.Path."""

    image_dir: Path
    output_graph: Path = Path("retrained_graph.onnx")
    output_labels: Path = Path("retrained_labels.txt")
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
    intermediate_output_graphs_dir: Path = Path("intermediate_graphs")
    random_seed: int = 0
    class_balancing: bool = True  # retrain.py's batches: a class uniformly, then an image (see sampling.py)
    fast_decode: bool = False  # JPEG draft + Image.reduce before the resize (images.py); stored in the graph
    on_bad_image: str = "skip"
    group_pattern: str | None = None  # regex: file names with the same match are one patient (split.py)
    positive_label: str | None = None
    explain_misclassified: Path | None = None
    report: Path | None = None

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
                     if self.output_graph.is_dir() else "must end in .onnx")
            raise ValueError(f"{self.output_graph}: output_graph {fault}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'skip' or 'error', not {self.on_bad_image!r}")
        check_positive(self.how_many_training_steps, "how_many_training_steps", integer=True)
        check_positive(self.learning_rate, "learning_rate")
        check_positive(self.eval_step_interval, "eval_step_interval", integer=True)
        check_split_percentages(self.validation_percentage, self.testing_percentage)
        for name in ("train_batch_size", "test_batch_size", "validation_batch_size"):
            check_batch_size(getattr(self, name), name)
        check_distortions(self.random_crop, self.random_scale, self.random_brightness)
        for name in ("intermediate_store_frequency", "random_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if not isinstance(self.final_tensor_name, str) or not self.final_tensor_name:
            raise ValueError(f"final_tensor_name must be a non-empty name, got {self.final_tensor_name!r}")
        if self.positive_label is not None and not isinstance(self.positive_label, str):
            raise ValueError(f"positive_label must be a class name or None, got {self.positive_label!r}")
