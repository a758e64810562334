"""retrain.py's flags and their defaults, written once: the command line (cli.py), the Python API and every command
read them from here."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
    """retrain.py's flags, with its defaults (paths default to the current folder rather than /tmp)."""

    image_dir: Path
    output_graph: Path = Path("retrained_graph.onnx")
    output_labels: Path = Path("retrained_labels.txt")
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
    intermediate_store_frequency: int = 0
    intermediate_output_graphs_dir: Path = Path("intermediate_graphs")
    random_seed: int = 0
    class_balancing: bool = True  # retrain.py's batches: a class uniformly, then an image (see sampling.py)
    fast_decode: bool = False  # JPEG draft + Image.reduce before the resize (images.py); stored in the graph
    on_bad_image: str = "skip"
    positive_label: str | None = None
    explain_misclassified: Path | None = None
    report: Path | None = None
