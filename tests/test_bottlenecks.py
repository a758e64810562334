"""Tests for the bottleneck store: shards, merging, loading (no network needed: the rows are random numbers), and one
store per layer (a tiny backbone; the real one where pool_3 must stay the same bit for bit)."""

import numpy as np
import pytest
from PIL import Image

from mini_retrain.pipeline.backbone import load_backbone, parse_layers, run_backbone
from mini_retrain.pipeline.bottlenecks import compact_store, get_bottlenecks, load_store, store_folder, write_shard
from tests.conftest import quiet


def keys_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:039d}" for i in range(n)]


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def everything(folder) -> dict[str, np.ndarray]:
    index, values = load_store(folder, log=lambda line: None)
    return {key: values[row] for key, row in index.items()}


def test_small_shards_are_merged_and_the_big_store_is_left_alone(tmp_path):
    big = write_shard(tmp_path, keys_for("a", 500), rows(500, 0))
    big_stat = big.stat()
    write_shard(tmp_path, keys_for("b", 30), rows(30, 1))
    write_shard(tmp_path, keys_for("c", 20), rows(20, 2))
    before = everything(tmp_path)
    compact_store(tmp_path)
    shards = sorted(tmp_path.glob("shard-*.npz"))
    assert len(shards) == 2 and big in shards
    assert big.stat().st_mtime_ns == big_stat.st_mtime_ns and big.stat().st_ino == big_stat.st_ino  # not rewritten
    after = everything(tmp_path)
    assert after.keys() == before.keys() and len(after) == 550
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_everything_is_merged_once_the_new_shards_outgrow_the_store(tmp_path):
    write_shard(tmp_path, keys_for("a", 40), rows(40, 0))
    write_shard(tmp_path, keys_for("b", 30), rows(30, 1))
    write_shard(tmp_path, keys_for("c", 20), rows(20, 2))  # 30 + 20 rows > 40 rows
    before = everything(tmp_path)
    compact_store(tmp_path)
    assert len(list(tmp_path.glob("shard-*.npz"))) == 1
    after = everything(tmp_path)
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_a_key_in_two_shards_is_kept_once(tmp_path):
    write_shard(tmp_path, keys_for("a", 3), rows(3, 0))
    write_shard(tmp_path, keys_for("a", 2), rows(2, 0))  # two runs computed the same images
    compact_store(tmp_path)
    index, values = load_store(tmp_path, log=lambda line: None)
    assert len(index) == 3
    np.testing.assert_array_equal(values[[index[key] for key in keys_for("a", 3)]], rows(3, 0))


def test_one_shard_is_not_rewritten(tmp_path):
    only = write_shard(tmp_path, keys_for("a", 5), rows(5, 0))
    stamp = only.stat().st_mtime_ns
    compact_store(tmp_path)
    assert list(tmp_path.glob("shard-*.npz")) == [only] and only.stat().st_mtime_ns == stamp


def test_files_hashed_by_several_threads_keep_their_order(tmp_path, tiny_backbone):
    """The cache keys are computed by a thread pool; rows, skip lines and duplicates still follow the order of the
    paths, and --on_bad_image error stops at the first bad file."""
    import pytest
    from PIL import Image

    from mini_retrain.pipeline.backbone import load_backbone
    from mini_retrain.pipeline.bottlenecks import get_bottlenecks
    from mini_retrain.pipeline.images import BadImageError

    rng = np.random.default_rng(0)
    paths = []
    for number in range(12):
        path = tmp_path / f"{number:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "folder.png").mkdir()  # not a regular file
    paths[3] = tmp_path / "folder.png"
    paths[8] = tmp_path / "missing.png"
    paths[10] = paths[1]  # the same file twice
    backbone = load_backbone(tiny_backbone, device="cpu", log=quiet)
    lines: list[str] = []
    found = get_bottlenecks(paths, backbone, tmp_path / "cache", workers=3, log=lines.append)

    assert found.kept == [i for i in range(12) if i not in (3, 8)]
    assert found.keys[found.kept.index(10)] == found.keys[found.kept.index(1)]
    skips = [line for line in lines if line.startswith("Skipping")]
    assert [line.split(":")[0] for line in skips] == [f"Skipping {paths[3]}", f"Skipping {paths[8]}"]
    one_by_one = [get_bottlenecks([path], backbone, tmp_path / "other", workers=1, log=lambda line: None)
                  for path in paths if path not in (paths[3], paths[8])]
    np.testing.assert_array_equal(found.values, np.concatenate([result.values for result in one_by_one]))

    with pytest.raises(BadImageError, match="folder.png"):
        get_bottlenecks(paths, backbone, tmp_path / "cache", on_bad_image="error", workers=3, log=lambda line: None)


# ---------------------------------------------------------------- one store per layer (--bottleneck_layers)


def write_images(folder, count, seed=0, classes=("normal", "pneumonia")):
    """count random grey PNGs per class, class 1 brighter, so a layer can learn something."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, label in enumerate(classes):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 160, (60, 50)) + 60 * c
            path = folder / label / f"{label}_{i:02d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(path)
    return paths


@pytest.fixture
def layered(tiny_layered_backbone):
    return load_backbone(tiny_layered_backbone, device="cpu", log=lambda line: None)


def test_parse_layers_and_its_messages():
    assert parse_layers("pool_3") == ("pool_3",)
    assert parse_layers(" mixed_8 , pool_3") == ("mixed_8", "pool_3")
    with pytest.raises(ValueError, match="--bottleneck_layers 'pool_3,' has an empty item"):
        parse_layers("pool_3,")
    with pytest.raises(ValueError, match="names a layer twice"):
        parse_layers("mixed_8,mixed_8")


def test_the_cache_key_is_weights_precision_layer_and_preprocessing(layered, tmp_path):
    """One store per layer; the backbone file's own hash does not matter (adding outputs keeps every cache), the
    weights, the precision (an int8 backbone) and the layer do."""
    folder = store_folder(tmp_path, layered)
    assert folder == store_folder(tmp_path, layered, layer="pool_3")
    assert folder.name.startswith("7777777777777777-fp32-pool_3-")
    assert store_folder(tmp_path, layered, layer="mixed_8") != folder
    assert store_folder(tmp_path, layered, fast_decode=True) != folder
    other_file = layered._replace(sidecar={**layered.sidecar, "onnx_sha256": "0" * 64})
    assert store_folder(tmp_path, other_file) == folder
    int8 = layered._replace(sidecar={**layered.sidecar, "precision": "int8"})
    assert store_folder(tmp_path, int8) != folder
    other_weights = layered._replace(sidecar={**layered.sidecar, "weights_sha1": "8" * 40})
    assert store_folder(tmp_path, other_weights) != folder


def test_layers_come_side_by_side_and_a_second_layer_reuses_the_first_ones_cache(layered, tmp_path, monkeypatch):
    from mini_retrain.pipeline import bottlenecks as store

    paths = write_images(tmp_path / "images", 3)
    cache = tmp_path / "cache"
    calls = []
    real = store.run_backbone
    monkeypatch.setattr(store, "run_backbone", lambda *a, **k: calls.append(k.get("layers")) or real(*a, **k))
    quiet = dict(log=lambda line: None, workers=1)

    pool_3 = get_bottlenecks(paths, layered, cache, **quiet)
    assert pool_3.values.shape == (6, 6) and calls == [("pool_3",)]
    both = get_bottlenecks(paths, layered, cache, layers=("mixed_8", "pool_3"), **quiet)
    assert calls[1:] == [("mixed_8",)]  # only the missing layer went through the backbone
    assert both.computed == 6 and both.values.shape == (6, 5 + 6)
    np.testing.assert_array_equal(both.values[:, 5:], pool_3.values)
    images = np.stack([store.backbone_input(store.read_image(p, keep_gray=True), layered.sidecar) for p in paths])
    np.testing.assert_allclose(both.values[:, :5], run_backbone(layered, images, layers=("mixed_8",)), atol=1e-6)
    again = get_bottlenecks(paths, layered, cache, layers=("pool_3", "mixed_8", "mixed_6"), **quiet)
    assert calls[2:] == [("mixed_6",)] and again.computed == 6
    assert get_bottlenecks(paths, layered, cache, layers=("mixed_6", "pool_3"), **quiet).computed == 0
    assert len(calls) == 3
    for layer, size in (("pool_3", 6), ("mixed_8", 5), ("mixed_6", 4)):
        index, values = load_store(store_folder(cache, layered, layer=layer), log=lambda line: None)
        assert len(index) == 6 and values.shape == (6, size)


def test_a_layer_the_backbone_lacks_stops_before_any_work(layered, tiny_backbone, tmp_path):
    paths = write_images(tmp_path / "images", 1)
    with pytest.raises(ValueError, match="^bottleneck_layers: the backbone has no layer 'mixed_7'; choose from"):
        get_bottlenecks(paths, layered, tmp_path / "cache", layers=("mixed_7",), log=lambda line: None)
    older = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)  # a sidecar without `layers`
    with pytest.raises(ValueError, match="rebuild it with `mini_retrain backbone`"):
        get_bottlenecks(paths, older, tmp_path / "cache", layers=("mixed_8",), log=lambda line: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("shard-*"))


def test_pool_3_is_unchanged_bit_for_bit_on_the_real_network(real_backbone, tmp_path):
    """The default path (pool_3 alone, through the cache) and pool_3 fetched beside other layers in one forward pass
    give exactly the numbers run_backbone gives by itself."""
    from tests.conftest import DEMO_DATA

    from mini_retrain.pipeline.backbone import backbone_input
    from mini_retrain.pipeline.images import read_image

    paths = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))[:3]
    images = np.stack([backbone_input(read_image(p, keep_gray=True), real_backbone.sidecar) for p in paths])
    expected = run_backbone(real_backbone, images)  # (3, 2048): pool_3 as it always was
    alone = get_bottlenecks(paths, real_backbone, tmp_path / "a", log=lambda line: None)
    np.testing.assert_array_equal(alone.values, expected)
    together = get_bottlenecks(paths, real_backbone, tmp_path / "b", layers=("mixed_6", "pool_3", "mixed_8"),
                               log=lambda line: None)
    np.testing.assert_array_equal(together.values[:, 768:768 + 2048], expected)
    np.testing.assert_array_equal(get_bottlenecks(paths, real_backbone, tmp_path / "b",
                                                  log=lambda line: None).values, expected)
