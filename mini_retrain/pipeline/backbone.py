"""Run the pretrained backbone under onnxruntime: images (N, 3, 299, 299) -> bottlenecks (N, 2048).

The "bottleneck" is retrain.py's name for the layer just before the ImageNet classifier: Inception v3's `pool_3`, the
average over the 8x8 grid of `mixed_10`. Everything the retrained model knows about an image is these 2048 numbers,
or, with --bottleneck_layers, the averages of earlier blocks (`<block>/avg` outputs, listed in the sidecar's `layers`).

The ONNX file comes with a JSON sidecar (see `backbone_build.backbone_sidecar` and models/README.md) that names the
input, the outputs and the pixel scaling, so a different backbone can be used by writing a different sidecar.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mini_retrain.build.backbone_build import ensure_backbone, sidecar_path
from mini_retrain.settings import DEVICES, PRECISIONS

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
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
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


def session_options(threads: int | None = None):
    """onnxruntime settings for one process that owns the machine: all cores on each operator, full graph fusion.

    threads: the cores each operator may use (default: every core). A Dask worker uses 1 (pipeline/cluster.py): there
    the worker processes and threads are the parallelism."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
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
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def at_precision(path: Path, precision: str, log: Callable[[str], None] = print) -> Path:
    """The backbone file to run at `precision`: `path` itself when its sidecar says it is that precision; for
    int8, the file quantised from a float32 `path` (beside it, built on first use: pipeline/calibration.py)."""
    from mini_retrain.pipeline.calibration import ensure_int8_backbone

    check_precision(precision)
    have = read_sidecar(path).get("precision", "fp32")
    if have == precision:
        return path
    if precision == "int8" and have == "fp32":
        return ensure_int8_backbone(path, log)
    raise ValueError(f"{path}: the backbone is {have}; pass --precision {have}, or the float32 file it was made from")


def load_backbone(path: str | os.PathLike | None = None, device: str = "auto",
                  log: Callable[[str], None] = print, threads: int | None = None,
                  precision: str = "fp32") -> Backbone:
    """Open the backbone ONNX in an onnxruntime session (building the default one on first use).

    log receives the line naming the provider used, and a WARNING when CUDA was asked for but is missing.
    threads: see session_options. precision "int8" opens the int8 file quantised from the float32 one (quantised
    on first use, beside it)."""
    import onnxruntime

    check_precision(precision)  # before building anything
    path = at_precision(ensure_backbone(path, log), precision, log)
    sidecar = read_sidecar(path)
    providers, message = choose_providers(device, onnxruntime.get_available_providers())
    if message:
        log(f"WARNING: {message}")
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for damaged files
        raise ValueError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0]}); rebuild it") from None
    provider = session.get_providers()[0]
    log(f"Backbone {path.name} on {provider}")
    return Backbone(session, path, sidecar, provider)


def backbone_input(image, sidecar: dict[str, Any], fast: bool = False) -> np.ndarray:
    """A decoded RGB or grey image -> the network's input (3, H, W) float32: resize, then (x - mean) / std as the sidecar says."""
    from mini_retrain.pipeline.images import resize_for_backbone, to_backbone_input

    height, width = sidecar["input_size"]
    if height != width:
        raise ValueError(f"backbone input_size {sidecar['input_size']} is not square; mini_retrain resizes to squares")
    pixels = resize_for_backbone(image, height, fast)  # (H, W, 3) float32 in 0..255
    return to_backbone_input(pixels, sidecar["input_mean"], sidecar["input_std"])  # (3, H, W)


DEFAULT_LAYER = "pool_3"  # --bottleneck_layers' default: on any backbone, the name of its bottleneck_output


def offered_layers(sidecar: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer: {output, size, feature_map, feature_shape}}: the pooled layers the backbone file offers.

    A sidecar without a `layers` table (another backbone, or one built before the pooled layers) offers only its
    bottleneck output, whose feature map is its spatial_output. "pool_3" always names the bottleneck, so the default
    of --bottleneck_layers works with any backbone."""
    bottleneck = {"output": sidecar["bottleneck_output"], "size": int(sidecar["bottleneck_size"])}
    if sidecar.get("spatial_output"):
        bottleneck |= {"feature_map": sidecar["spatial_output"], "feature_shape": sidecar.get("spatial_shape")}
    table = dict(sidecar.get("layers") or {sidecar["bottleneck_output"]: bottleneck})
    table.setdefault(DEFAULT_LAYER, bottleneck)
    return table


def layer_outputs(sidecar: dict[str, Any], layers: tuple[str, ...], flag: str = "layers") -> list[str]:
    """The graph outputs that hold the pooled `layers`, checked against what the backbone file offers."""
    offered = offered_layers(sidecar)
    if not layers:
        raise ValueError(f"{flag} must name at least one backbone layer, e.g. pool_3")
    for layer in layers:
        if layer not in offered:
            hint = ("rebuild it with `mini_retrain backbone`" if "layers" not in sidecar
                    else f"choose from {', '.join(offered)}")
            raise ValueError(f"{flag}: the backbone has no layer {layer!r}; {hint}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{flag}: {','.join(layers)} names a layer twice")
    return [offered[layer]["output"] for layer in layers]


def parse_layers(text: str, flag: str = "--bottleneck_layers") -> tuple[str, ...]:
    """"pool_3,mixed_8" -> ("pool_3", "mixed_8"): the comma-separated layer names of a flag, checked for form only
    (which layers exist is the backbone's sidecar's to say: layer_outputs)."""
    layers = tuple(item.strip() for item in str(text).split(","))
    if any(not layer for layer in layers):
        raise ValueError(f"{flag} {text!r} has an empty item; give layer names separated by commas, e.g. pool_3,mixed_8")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{flag} {text!r} names a layer twice")
    return layers


def layer_sizes(sidecar: dict[str, Any], layers: tuple[str, ...], flag: str = "layers") -> list[int]:
    """How many numbers each pooled layer gives (its channels): [2048] for pool_3, [1280] for mixed_8, ..."""
    layer_outputs(sidecar, layers, flag)  # the names are checked first
    offered = offered_layers(sidecar)
    return [int(offered[layer]["size"]) for layer in layers]


def split_layers(values: np.ndarray, sidecar: dict[str, Any], layers: tuple[str, ...]) -> dict[str, np.ndarray]:
    """run_backbone's layers side by side, (..., D1 + D2 + ...), taken apart: {layer: (..., D_layer)}, views."""
    starts = np.cumsum([0] + layer_sizes(sidecar, layers))  # column where each layer begins
    return {layer: values[..., start:end] for layer, start, end in zip(layers, starts[:-1], starts[1:])}


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
    outputs = layer_outputs(backbone.sidecar, tuple(layers or (DEFAULT_LAYER,)))
    if spatial:
        outputs.append(backbone.sidecar["spatial_output"])
    results = backbone.session.run(outputs, {backbone.sidecar["input_name"]: images})
    pooled = results[:len(results) - spatial]
    bottlenecks = pooled[0] if len(pooled) == 1 else np.concatenate(pooled, axis=1)  # (N, D1 + D2 + ...)
    return (bottlenecks, results[-1]) if spatial else bottlenecks
