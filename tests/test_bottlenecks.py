"""Tests for the bottleneck store: shards, merging, loading (no network needed: the rows are random numbers)."""

import numpy as np

from mini_retrain.pipeline.bottlenecks import compact_store, load_store, write_shard
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
