"""A run that is killed, interrupted or finds its cache damaged loses nothing already computed, never reads half a file.

`python -m mini_retrain retrain` runs in a subprocess on 40 small X-rays, each with its own content hash (the cache is
keyed by the SHA-1 of the file). The bottlenecks a run must end up with are computed here independently, image by
image (read, resize, normalise, run the backbone), and every check below compares the cache with them.
"""

import contextlib
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_retrain.cli import main
from tests.conftest import DEMO_DATA, read_shards

XRAYS = DEMO_DATA / "pneumonia-demo"
PER_CLASS = 20
BATCH = 32  # get_bottlenecks' batch size: a killed run keeps every finished batch of 32
PROGRESS = re.compile(r"Creating bottlenecks: (\d+)/(\d+)")
INTERRUPTED = "mini_retrain: interrupted; everything already computed is kept, run the same command to resume"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 + 20 small PNGs made from the demo X-rays; pixel (0, i) of copy i is changed, so each file is different."""
    image_dir = tmp_path_factory.mktemp("interrupt") / "images"
    for label in ("normal", "pneumonia"):
        sources = []
        for path in sorted((XRAYS / label).glob("*.jpeg")):
            with Image.open(path) as source:
                sources.append(np.asarray(source.resize((320, 320))))  # (320, 320) uint8, grey
        (image_dir / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = sources[i % len(sources)].copy()
            pixels[0, i] ^= 0x80
            Image.fromarray(pixels).save(image_dir / label / f"{label}_{i:02d}.png")
    return image_dir


@pytest.fixture(scope="module")
def expected(images, real_backbone) -> dict[str, np.ndarray]:
    """SHA-1 of each file -> its bottleneck, computed here without the cache: read, resize, normalise, backbone."""
    from mini_retrain.pipeline.backbone import run_backbone
    from mini_retrain.pipeline.images import file_sha1, load_backbone_input

    paths = sorted(images.glob("*/*.png"))
    batches = [np.stack([load_backbone_input(path) for path in paths[i:i + 10]]) for i in range(0, len(paths), 10)]
    bottlenecks = np.concatenate([run_backbone(real_backbone, batch) for batch in batches])  # (40, 2048)
    return {file_sha1(path): bottleneck for path, bottleneck in zip(paths, bottlenecks)}


def store_of(bottleneck_dir: Path, backbone, layer: str = "pool_3") -> Path:
    from mini_retrain.pipeline.bottlenecks import store_folder

    return store_folder(bottleneck_dir, backbone, layer=layer)


def seed_population_store(bottleneck_dir: Path, images: Path, backbone) -> None:
    """retrain also needs every image's mixed_6 average (the population distance): put all 40 in its store, so that
    only the pool_3 store decides what is computed."""
    from mini_retrain.evaluation.population import POPULATION_LAYER
    from mini_retrain.pipeline.backbone import run_backbone
    from mini_retrain.pipeline.images import file_sha1, load_backbone_input

    paths = sorted(images.glob("*/*.png"))
    rows = np.concatenate([run_backbone(backbone, np.stack([load_backbone_input(p) for p in paths[i:i + 10]]),
                                        layers=(POPULATION_LAYER,)) for i in range(0, len(paths), 10)])
    store = store_of(bottleneck_dir, backbone, POPULATION_LAYER)
    store.mkdir(parents=True)
    np.savez(store / "shard-population.npz", keys=np.array([file_sha1(p) for p in paths], dtype="<U40"),
             bottlenecks=rows)


def write_seed_shard(path: Path, expected: dict[str, np.ndarray], keys: list[str]) -> None:
    """A shard as bottlenecks.py documents it (keys (n,) SHA-1 strings, bottlenecks (n, D) float32), made here."""
    np.savez(path, keys=np.array(keys, dtype="<U40"), bottlenecks=np.stack([expected[k] for k in keys]))


def assert_matches(rows: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(rows) == sorted(expected)
    for key, bottleneck in expected.items():
        np.testing.assert_allclose(rows[key], bottleneck, atol=1e-4, rtol=1e-4)


def retrain_argv(images: Path, tmp_path: Path, bottleneck_dir: Path, backbone_path: Path) -> list[str]:
    return ["retrain", "--image_dir", str(images), "--backbone", str(backbone_path), "--device", "cpu",
            "--bottleneck_dir", str(bottleneck_dir), "--output_graph", str(tmp_path / "graph.onnx"),
            "--output_labels", str(tmp_path / "labels.txt"), "--how_many_training_steps", "5",
            "--testing_percentage", "25", "--validation_percentage", "25"]


class Run:
    """`python -m mini_retrain ...` in a subprocess; its stdout and stderr, merged, read line by line."""

    def __init__(self, argv: list[str], cwd: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A shell's background job starts with SIGINT ignored, and Python keeps an ignored SIGINT ignored: give the
        # child the default handler, so Ctrl-C reaches it however the tests were started.
        self.process = subprocess.Popen([sys.executable, "-m", "mini_retrain", *argv], cwd=cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_progress(self, done_at_least: int, timeout: float = 60) -> tuple[int, int]:
        """Read until a progress line "Creating bottlenecks: done/total" with done >= done_at_least: (done, total)."""
        while True:
            line = self._queue.get(timeout=timeout)
            assert line is not None, "the run ended first:\n" + "\n".join(self.lines)
            self.lines.append(line)
            match = PROGRESS.search(line)
            if match and int(match.group(1)) >= done_at_least:
                return int(match.group(1)), int(match.group(2))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the end: (exit code, every line of output)."""
        self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return self.process.returncode, "\n".join(self.lines)


def test_killed_run_resumes_and_computes_only_what_is_missing(images, expected, real_backbone,
                                                              real_backbone_path, tmp_path):
    bottleneck_dir = tmp_path / "bottlenecks"
    argv = retrain_argv(images, tmp_path, bottleneck_dir, real_backbone_path)
    first = Run(argv, tmp_path)
    done, total = first.wait_for_progress(done_at_least=1)
    first.process.send_signal(signal.SIGKILL)  # no clean-up of any kind can run
    code, _ = first.finish()
    assert code == -signal.SIGKILL
    assert (done, total) == (BATCH, len(expected))

    store = store_of(bottleneck_dir, real_backbone)
    cached = read_shards(store)
    assert BATCH <= len(cached) < len(expected)  # killed during the second batch: the first one was kept
    assert_matches(cached, {key: expected[key] for key in cached})
    # A run killed while writing leaves a hidden temporary file; plant one, half a shard, that must never be read.
    shard = next(store.glob("shard-*.npz"))
    half = shard.read_bytes()[: shard.stat().st_size // 2]
    half_written = store / f".{shard.name}.x1y2z3.tmp"
    half_written.write_bytes(half)

    code, output = Run(argv, tmp_path).finish()
    assert code == 0 and "Traceback" not in output
    assert f"{len(expected)} bottlenecks ready ({len(expected) - len(cached)} computed now, {len(cached)} from the " \
           f"cache in {bottleneck_dir})" in output
    assert "WARNING: bottleneck cache file" not in output
    assert half_written.read_bytes() == half  # ignored: not read, not mistaken for a shard
    assert_matches(read_shards(store), expected)  # the same bottlenecks as a clean computation
    assert (tmp_path / "graph.onnx").is_file()


def test_ctrl_c_during_bottlenecks_exits_130_with_one_line(images, expected, real_backbone,
                                                           real_backbone_path, tmp_path):
    """The cache holds 32 of the 40 bottlenecks; Ctrl-C while the other 8 are being computed."""
    bottleneck_dir = tmp_path / "bottlenecks"
    seed_population_store(bottleneck_dir, images, real_backbone)
    store = store_of(bottleneck_dir, real_backbone)
    store.mkdir(parents=True)
    seed = store / "shard-seed.npz"
    write_seed_shard(seed, expected, sorted(expected)[:BATCH])
    seed_bytes = seed.read_bytes()

    run = Run(retrain_argv(images, tmp_path, bottleneck_dir, real_backbone_path), tmp_path)
    assert run.wait_for_progress(done_at_least=0) == (0, len(expected) - BATCH)
    run.process.send_signal(signal.SIGINT)
    code, output = run.finish()
    assert code == 130
    assert output.splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert f"Creating bottlenecks: {len(expected) - BATCH}/" not in output  # it was stopped during the work
    assert seed.read_bytes() == seed_bytes  # what was computed before is kept, untouched
    assert not list(store.glob(".*.tmp")) and not list(store.glob("*.tmp"))  # no half-written file left behind
    assert_matches(read_shards(store), {key: expected[key] for key in read_shards(store)})
    assert not (tmp_path / "graph.onnx").exists()


def test_damaged_shards_are_named_set_aside_and_only_their_images_recomputed(images, expected, real_backbone,
                                                                              real_backbone_path, tmp_path):
    """Four shards: 32 good rows, then 8 rows in three damaged shards: 64 bytes overwritten in the middle; the end cut
    off; one bit flipped in the zip directory (the "encrypted" flag, which made zipfile raise RuntimeError)."""
    bottleneck_dir = tmp_path / "bottlenecks"
    seed_population_store(bottleneck_dir, images, real_backbone)
    store = store_of(bottleneck_dir, real_backbone)
    store.mkdir(parents=True)
    keys = sorted(expected)
    write_seed_shard(store / "shard-a.npz", expected, keys[:BATCH])
    damaged = [store / "shard-b.npz", store / "shard-c.npz", store / "shard-d.npz"]
    for shard, rows in zip(damaged, (keys[BATCH:BATCH + 2], keys[BATCH + 2:BATCH + 5], keys[BATCH + 5:])):
        write_seed_shard(shard, expected, rows)
    data = bytearray(damaged[0].read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    damaged[0].write_bytes(bytes(data))
    damaged[1].write_bytes(damaged[1].read_bytes()[:-300])
    data = bytearray(damaged[2].read_bytes())
    data[data.index(b"PK\x01\x02") + 8] |= 1  # central directory entry, general purpose flags: bit 0 = encrypted
    damaged[2].write_bytes(bytes(data))

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(retrain_argv(images, tmp_path, bottleneck_dir, real_backbone_path))
    output = out.getvalue()
    assert code == 0 and "Traceback" not in output + err.getvalue()
    warnings = [line for line in output.splitlines() if line.startswith("WARNING: bottleneck cache file")]
    assert len(warnings) == len(damaged)
    for shard, warning in zip(damaged, warnings):
        assert warning.startswith(f"WARNING: bottleneck cache file {shard} is damaged (")
        assert warning.endswith("); its images will be recomputed")
        assert shard.with_suffix(".corrupt").is_file()  # set aside for a look, never read again
    assert f"{len(expected)} bottlenecks ready (8 computed now, {BATCH} from the cache" in output
    assert_matches(read_shards(store), expected)
