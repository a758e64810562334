"""The int8 backbone: the float32 Inception v3 file rewritten to multiply in 8-bit integers (static quantisation).

Every convolution but the first has its input activations and weights stored as 8-bit integers with a scale (and,
for activations, a zero point), so the CPU multiplies uint8 x int8 into int32 sums: several times the float32 rate
with AVX512-VNNI, AVX-VNNI or AMX, 1.5 to 1.8 x with plain AVX2 (measured, benchmarks/README.md):

    x ~= scale_x (x_q - zero_x)     x_q uint8 (0..255), scale_x and zero_x per tensor, from calibration
    w ~= scale_w[c] w_q             w_q int8 in -64..63 (7 bits, see reduce_range), one scale per output channel c
    conv(x, w)[c] ~= scale_x scale_w[c] sum (x_q - zero_x) w_q + b[c]     the sum in int32, b[c] in int32 too

Done once, offline, from the float32 file, with onnxruntime.quantization (part of onnxruntime):

    1. fold_batch_norms   Conv -> BatchNormalization  becomes one Conv with a bias (same function, to rounding):
                          w' = w gamma / sqrt(var + eps),   b' = beta - mean gamma / sqrt(var + eps)
    2. calibrate          run the float32 graph on the calibration images and record each activation's range
                          (min and max over all of them: onnxruntime's MinMax calibration)
    3. quantise           write QuantizeLinear/DequantizeLinear pairs around each convolution ("QDQ"); onnxruntime
                          turns each Q -> Conv -> DQ pattern into one integer convolution when it loads the file

The calibration images (`pipeline.calibration`) are the bundled X-rays, so the file is built offline, and the same
float32 file and images give the same int8 file, byte for byte, on one machine (tests/test_int8.py builds it twice).
The options below were chosen by measurement (benchmarks/README.md, "int8", with the table of what was tried).

The graph outputs stay float32 and keep their names and meaning: pool_3 is still exactly the average of the mixed_10
output (the final pool and every `<block>/avg` stay float, on the dequantised feature map), so a class activation map
of an int8 graph still splits its logit exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mini_retrain.build.backbone_build import sidecar_path
from mini_retrain.paths import write_bytes_atomically

# Bumped whenever a change below gives another int8 file from the same float32 file: a cached one is then rebuilt.
QUANTIZATION_VERSION = 1
# The options, each chosen by measurement (benchmarks/README.md, int8 table).
OPTIONS: dict[str, Any] = {
    "format": "QDQ",  # QuantizeLinear/DequantizeLinear pairs; onnxruntime fuses them into integer kernels
    "activations": "uint8",  # asymmetric: a ReLU output uses all 256 levels of [0, max]
    "weights": "int8",  # symmetric
    "per_channel": True,  # one weight scale per output channel
    "reduce_range": True,  # 7-bit weights: without VNNI, u8 x s8 pairs saturate int16 sums (cosine 0.93, not 0.99)
    "calibration": "MinMax",
    "float_nodes": ["conv/conv"],  # left in float32 (besides the pools that make the outputs): the first convolution,
    # 3 input channels, little arithmetic to win and the most accurate to keep (worst held-out cosine 0.982 -> 0.984)
}


def int8_path(float_path: str | Path) -> Path:
    """`inception_v3_2015.onnx` -> `inception_v3_2015.int8.onnx`: the int8 file lies beside its float32 source."""
    float_path = Path(float_path)
    return float_path.with_name(f"{float_path.stem}.int8.onnx")


def fold_batch_norms(model) -> None:
    """Conv -> BatchNormalization (the Conv's only consumer) becomes one Conv with a bias, in place.

        y = gamma (conv(x, w) + b - mean) / sqrt(var + eps) + beta = conv(x, w k) + (b - mean) k + beta,
        k = gamma / sqrt(var + eps)   (one per output channel)

    A quantiser sees the folded weights (what the integer convolution really multiplies by) and one bias to add in
    int32, instead of a float BatchNormalization after every integer convolution."""
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {output: node for node in graph.node for output in node.output}
    removed, kept = set(), []
    for node in graph.node:
        conv = producer.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if conv is None or conv.op_type != "Conv" or consumers[conv.output[0]] != 1 or conv.input[1] not in weights:
            kept.append(node)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(weights[name]).astype(np.float64) for name in node.input[1:5])
        k = gamma / np.sqrt(var + epsilon)  # (out,)
        w = numpy_helper.to_array(weights[conv.input[1]]).astype(np.float64)  # (out, in, kh, kw)
        b = numpy_helper.to_array(weights[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        weights[conv.input[1]].CopyFrom(numpy_helper.from_array((w * k[:, None, None, None]).astype(np.float32),
                                                                conv.input[1]))
        bias_name = f"{conv.name or conv.output[0]}/bias"
        graph.initializer.append(numpy_helper.from_array(((b - mean) * k + beta).astype(np.float32), bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = node.output[0]  # the Conv now writes what the batch norm wrote
        removed.update(node.input[1:5])
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    initializers = [t for t in graph.initializer if t.name not in removed or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _output_pools(model) -> list[str]:
    """The nodes that make the graph outputs from feature maps (pool2, every `<block>/global_average` and their
    Flattens): left in float32, so each output is the exact average of the (dequantised) map it pools."""
    producer = {output: node for node in model.graph.node for output in node.output}
    names = set()
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in ("Flatten", "GlobalAveragePool", "AveragePool"):
            names.add(node.name)
            node = producer.get(node.input[0])
    return sorted(names)


class _Batches:
    """onnxruntime's CalibrationDataReader interface over a list of (N, 3, H, W) float32 batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.feeds = iter([{input_name: np.ascontiguousarray(b, np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantize_graph(float_path: str | Path, calibration: list[np.ndarray], input_name: str,
                   options: dict[str, Any] | None = None, ranges: Path | None = None) -> bytes:
    """The int8 graph of the float32 file `float_path`, serialised: fold, calibrate on `calibration` (a list of
    (N, 3, H, W) float32 batches, already scaled as the sidecar says), quantise with `options` (default OPTIONS).

    ranges: a JSON file of the calibrated ranges, written on the first call and read on the next ones instead of
    calibrating again (benchmarks/int8.py tries many options on one calibration)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {**OPTIONS, **(options or {})}
    if not calibration:
        raise ValueError("calibration: at least one batch of images is needed to calibrate the int8 backbone")
    model = onnx.load(str(float_path))
    fold_batch_norms(model)
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    extra = {"ActivationSymmetric": options["activations"] == "int8", "WeightSymmetric": True}
    extra.update(options.get("extra", {}))
    with tempfile.TemporaryDirectory(prefix="mini_retrain_int8_") as scratch:
        folded, quantised = Path(scratch) / "folded.onnx", Path(scratch) / "int8.onnx"
        onnx.save(model, str(folded))
        excluded = _output_pools(model) + list(options["float_nodes"])
        del model
        logging.disable(logging.WARNING)  # onnxruntime.quantization's advice on root logger ("consider pre-processing")
        try:
            quantize_static(
                str(folded), str(quantised), _Batches(input_name, calibration),
                quant_format=QuantFormat.QDQ if options["format"] == "QDQ" else QuantFormat.QOperator,
                per_channel=options["per_channel"], reduce_range=options["reduce_range"],
                activation_type=types[options["activations"]], weight_type=types[options["weights"]],
                nodes_to_exclude=excluded, calibrate_method=getattr(CalibrationMethod, options["calibration"]),
                extra_options=extra, calibration_cache_path=ranges,
            )
        finally:
            logging.disable(logging.NOTSET)
        return quantised.read_bytes()


def quantize_backbone(float_path: str | Path, calibration: Callable[[dict[str, Any]], list[np.ndarray]],
                      output: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Build the int8 file (default: beside the float32 one, `int8_path`) and its sidecar; return its path.

    calibration(sidecar) returns the calibration batches for the float32 backbone described by `sidecar`
    (pipeline.calibration.calibration_batches: the bundled X-rays). Nothing is left half-written on failure."""
    float_path = Path(float_path)
    output = Path(output) if output else int8_path(float_path)
    if output.suffix != ".onnx":
        raise ValueError(f"{output}: the int8 backbone file must end in .onnx")
    sidecar = json.loads(sidecar_path(float_path).read_text())
    if sidecar.get("precision", "fp32") != "fp32":
        raise ValueError(f"{float_path}: already {sidecar['precision']}; quantise a float32 backbone")
    batches = calibration(sidecar)
    log(f"Quantising {float_path.name} to int8 ({sum(len(b) for b in batches)} calibration images) ...")
    payload = quantize_graph(float_path, batches, sidecar["input_name"])
    write_bytes_atomically(output, payload)
    int8_sidecar = {**sidecar, "precision": "int8", "onnx_sha256": hashlib.sha256(payload).hexdigest(),
                    "float_onnx_sha256": _float_identity(float_path, sidecar),
                    "quantization": {"version": QUANTIZATION_VERSION, **OPTIONS}}
    write_bytes_atomically(sidecar_path(output), (json.dumps(int8_sidecar, indent=2) + "\n").encode())
    return output


def is_current(int8_file: Path, float_path: Path) -> bool:
    """True when `int8_file` was quantised, with today's options, from the float32 file as it is now."""
    try:
        int8_sidecar = json.loads(sidecar_path(int8_file).read_text())
        float_sidecar = json.loads(sidecar_path(float_path).read_text())
    except (OSError, ValueError):
        return False
    return (int8_file.is_file() and int8_sidecar.get("quantization", {}).get("version") == QUANTIZATION_VERSION
            and int8_sidecar.get("float_onnx_sha256") == _float_identity(float_path, float_sidecar))


def _float_identity(float_path: Path, sidecar: dict[str, Any]) -> str:
    """The float32 file's SHA-256: its sidecar's, else computed (a backbone of one's own may not record it)."""
    if sidecar.get("onnx_sha256"):
        return sidecar["onnx_sha256"]
    digest = hashlib.sha256()
    with open(float_path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
