"""The int8 backbone's calibration images, and building that backbone on first use.

Quantisation (build/quantize.py) needs to see what the activations of real inputs look like: the range of each one
fixes its 8-bit scale. We calibrate on the 16 chest X-rays bundled with the package (demo_data/pneumonia-demo),
prepared exactly as bottlenecks are (images.read_image, resize_for_backbone, to_backbone_input), each also
mirrored left-right:

    32 inputs = 16 films x {as is, mirrored},  in the order of their sorted file names,  in batches of 8

so the build needs no download and gives the same file every time. More or other films were measured too
(benchmarks/README.md, int8): what matters is that the calibration images are X-rays; the mirrored copies widen
the ranges a little and were measured to help.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mini_retrain.build.quantize import int8_path, is_current, quantize_backbone
from mini_retrain.pipeline.images import read_image, resize_for_backbone, to_backbone_input

CALIBRATION_FOLDER = Path(__file__).resolve().parents[1] / "demo_data" / "pneumonia-demo"
CALIBRATION_BATCH = 8


def calibration_files() -> list[Path]:
    return sorted(CALIBRATION_FOLDER.glob("*/*.jpeg"))


def calibration_batches(sidecar: dict[str, Any], mirrored: bool = True) -> list[np.ndarray]:
    """The calibration inputs as (8, 3, H, W) float32 batches, scaled as `sidecar` says."""
    inputs = []
    for path in calibration_files():
        pixels = resize_for_backbone(read_image(path, keep_gray=True), sidecar["input_size"][0])  # (H, W, 3)
        x = to_backbone_input(pixels, sidecar["input_mean"], sidecar["input_std"])  # (3, H, W)
        inputs.append(x)
        if mirrored:
            inputs.append(np.ascontiguousarray(x[:, :, ::-1]))  # left-right mirror image
    stacked = np.stack(inputs)  # (32, 3, H, W)
    return [stacked[i:i + CALIBRATION_BATCH] for i in range(0, len(stacked), CALIBRATION_BATCH)]


def ensure_int8_backbone(float_path: Path, log: Callable[[str], None] = print) -> Path:
    """The int8 file beside `float_path` (`x.onnx` -> `x.int8.onnx`), quantised now if it is missing or was made
    from another float32 file or with other options."""
    path = int8_path(float_path)
    if not is_current(path, float_path):
        log(f"Building the int8 backbone (once) at {path} ...")
        quantize_backbone(float_path, calibration_batches, path, log)
    return path
