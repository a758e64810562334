"""Run the pretrained backbone under onnxruntime: images (N, 3, 299, 299) -> bottlenecks (N, 2048).

The "bottleneck" is retrain.py's name for the layer just before the ImageNet classifier: Inception v3's `pool_3`, the
average over the 8x8 grid of `mixed_10`. Everything the retrained model knows about an image is these 2048 numbers.

The ONNX file comes with a JSON sidecar (see `backbone_build.backbone_sidecar` and models/README.md) that names the
input, the outputs and the pixel scaling, so a different backbone can be used by writing a different sidecar.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mini_retrain.build.backbone_build import ensure_backbone, sidecar_path

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "int8")  # float32 (the default), or the int8 file quantised from it (build/quantize.py)
REQUIRED_SIDECAR_KEYS = ("input_name", "input_size", "input_mean", "input_std", "bottleneck_output", "bottleneck_size")


class Backbone(NamedTuple):
    session: Any  # onnxruntime.InferenceSession; None once released (retrain drops it after the bottlenecks)
    path: Path
    sidecar: dict[str, Any]
    provider: str  # the execution provider actually used, e.g. "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> tuple[list[str], str | None]:
    """Execution providers for `device`, and a message when the request cannot be met.

    auto: CUDA when this onnxruntime has it, else CPU.  cuda: CUDA, or CPU with a message.  cpu: CPU.
    CPU is always last in the list, so onnxruntime can place any node CUDA cannot run.
    """
    if device not in DEVICES:
        raise ValueError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"], None
    if has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    return ["CPUExecutionProvider"], (
        "CUDA was asked for, but this onnxruntime has no CUDAExecutionProvider "
        "(install onnxruntime-gpu and a CUDA runtime); using the CPU"
    )


def read_sidecar(onnx_path: Path) -> dict[str, Any]:
    path = sidecar_path(onnx_path)
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; a backbone needs its JSON sidecar (see models/README.md)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rebuild with `mini_retrain backbone`") from None
    missing = [key for key in REQUIRED_SIDECAR_KEYS if key not in sidecar]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (see models/README.md for the sidecar fields)")
    return sidecar


def session_options():
    """onnxruntime settings for one process that owns the machine: all cores on each operator, full graph fusion."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # Between operators onnxruntime's worker threads normally spin (busy-wait) for the next one. Our image decoding
    # runs on the same cores at the same time, so a spinning thread steals exactly the CPU the decoder needs; with
    # spinning off they sleep instead (measured in benchmarks/README.md: faster pipeline, same raw forward speed).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The CPU memory arena (onnxruntime's default, kept) reuses the buffers of one run in the next: 6% faster at
    # batch 32 for about 350 MB more peak memory (benchmarks/README.md, row b).
    options.enable_cpu_mem_arena = True
    return options


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def at_precision(path: Path, precision: str) -> Path:
    """The backbone file to run at `precision`: `path` itself when its sidecar says it is that precision; for
    int8, the file quantised from a float32 `path` (beside it, built on first use: pipeline/calibration.py)."""
    from mini_retrain.pipeline.calibration import ensure_int8_backbone

    check_precision(precision)
    have = read_sidecar(path).get("precision", "fp32")
    if have == precision:
        return path
    if precision == "int8" and have == "fp32":
        return ensure_int8_backbone(path)
    raise ValueError(f"{path}: the backbone is {have}; pass --precision {have}, or the float32 file it was made from")


def load_backbone(path: str | Path | None = None, device: str = "auto", verbose: bool = True,
                  precision: str = "fp32") -> Backbone:
    """Open the backbone ONNX in an onnxruntime session (building the default one on first use).

    precision "int8" opens the int8 file quantised from the float32 one (quantised on first use)."""
    import onnxruntime

    check_precision(precision)  # before building anything
    path = at_precision(ensure_backbone(path), precision)
    sidecar = read_sidecar(path)
    providers, message = choose_providers(device, onnxruntime.get_available_providers())
    if message and verbose:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=session_options(), providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for damaged files
        raise ValueError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0]}); rebuild it") from None
    provider = session.get_providers()[0]
    if verbose:
        print(f"Backbone {path.name} on {provider}", flush=True)
    return Backbone(session, path, sidecar, provider)


def backbone_input(image, sidecar: dict[str, Any], fast: bool = False) -> np.ndarray:
    """A decoded RGB or grey image -> the network's input (3, H, W) float32: resize, then (x - mean) / std as the sidecar says."""
    from mini_retrain.pipeline.images import resize_for_backbone, to_backbone_input

    height, width = sidecar["input_size"]
    if height != width:
        raise ValueError(f"backbone input_size {sidecar['input_size']} is not square; mini_retrain resizes to squares")
    pixels = resize_for_backbone(image, height, fast)  # (H, W, 3) float32 in 0..255
    return to_backbone_input(pixels, sidecar["input_mean"], sidecar["input_std"])  # (3, H, W)


def layer_outputs(sidecar: dict[str, Any], layers: tuple[str, ...]) -> list[str]:
    """The graph outputs that hold the pooled `layers`, checked against what the backbone file offers.

    A sidecar without a `layers` table (another backbone, or one built before the pooled layers) offers only its
    bottleneck output."""
    offered = sidecar.get("layers") or {sidecar["bottleneck_output"]: {"output": sidecar["bottleneck_output"]}}
    if not layers:
        raise ValueError("layers must name at least one backbone layer, e.g. pool_3")
    for layer in layers:
        if layer not in offered:
            hint = ("rebuild it with `mini_retrain backbone`" if "layers" not in sidecar
                    else f"choose from {', '.join(offered)}")
            raise ValueError(f"layers: the backbone has no layer {layer!r}; {hint}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: {','.join(layers)} names a layer twice")
    return [offered[layer]["output"] for layer in layers]


def run_backbone(backbone: Backbone, images: np.ndarray, spatial: bool = False, layers: tuple[str, ...] | None = None):
    """Bottlenecks of a batch of backbone inputs.

    images: (N, 3, H, W) float32, already scaled as the sidecar says ((x - 128) / 128 for Inception v3).
    Returns the bottleneck (N, D): pool_3 (N, 2048) by default, else the global averages of `layers` side by side
    (N, sum of their sizes), in the order given; with spatial=True, also the last feature map mixed_10 (N, 2048, 8, 8).
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    height, width = backbone.sidecar["input_size"]
    if images.ndim != 4 or images.shape[1:] != (3, height, width):
        raise ValueError(f"backbone input must be (N, 3, {height}, {width}), got {images.shape}")
    outputs = layer_outputs(backbone.sidecar, tuple(layers or (backbone.sidecar["bottleneck_output"],)))
    if spatial:
        outputs.append(backbone.sidecar["spatial_output"])
    results = backbone.session.run(outputs, {backbone.sidecar["input_name"]: images})
    pooled = results[:len(results) - spatial]
    bottlenecks = pooled[0] if len(pooled) == 1 else np.concatenate(pooled, axis=1)  # (N, D1 + D2 + ...)
    return (bottlenecks, results[-1]) if spatial else bottlenecks
