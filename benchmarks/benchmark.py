"""How close does mini_retrain run to the hardware? One run, the same images for every row (issue #5).

    python benchmarks/benchmark.py [--count N] [--rows a,b,e] [--output results.json]

Rows (see benchmarks/README.md for how to read them):

    (a) the whole pipeline from image files: get_bottlenecks into a fresh cache, per kind of image, with its time
        split into network / cache store / the rest (waiting for decode); decode+resize measured alone; and a
        second run on the same cache (everything found: the cost of hashing the files)
    (b) the backbone alone: onnxruntime on tensors already in memory, batch 1, 16 and 32
    (c) the FLOP limit: a measured float32 matrix product (sgemm) / the network's multiply-adds
            images/s limit = sgemm FLOP/s / (2 * multiply-adds per image)
    (d) PyTorch running the original TorchScript (default_1.pt) on the same tensors, 2 threads (when torch imports)
    (e) the NumPy training loop (train.train_final_layer), and the same loop written in PyTorch
    (f) loading 100k cached bottlenecks (bottlenecks.load_store on one 100k x 2048 shard), and what merging one new
        batch into that store costs (compact_store, which every run that computed something calls)
    (g) --fast_decode (JPEG draft + Image.reduce, fast=True): bottleneck difference from the exact path, and speedup
    peak RSS of the pipeline, measured in child processes on a full batch and more, and extrapolated to 10k
        images with the growth per image measured on thousands of tiny images (network replaced by random numbers)

Every timing is the best of a few repeats (the least disturbed by other processes); the JSON keeps every repeat.
torch is optional: without it, rows (d) and the PyTorch half of (e) are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from PIL import Image

import mini_retrain
from mini_retrain.pipeline import bottlenecks as bottleneck_store
from mini_retrain.pipeline.backbone import Backbone, backbone_input, load_backbone, run_backbone, session_options
from mini_retrain.build.backbone_build import ensure_backbone, sidecar_path
from mini_retrain.paths import cache_dir
from mini_retrain.pipeline.images import read_image
from mini_retrain.core.train import train_final_layer
from mini_retrain.settings import RetrainSettings

TRAINING = RetrainSettings(image_dir=Path("."))  # retrain's defaults: learning rate, batch sizes, eval interval
DEMO_FOLDER = Path(mini_retrain.__file__).parent / "demo_data" / "pneumonia-demo"
MULTIPLY_ADDS_ASSUMED = 5.7e9  # Inception v3 at 299x299, per image (the figure; we also count it from the graph)
TARGETS = {
    "pipeline_vs_forward": 0.9,  # pipeline on JPEG X-rays >= 0.9 x raw forward
    "onnxruntime_vs_torch": 2.0,  # >= 2 x PyTorch eager
    "training_seconds": 0.3,  # 4000 training steps
    "store_load_seconds": 2.0,  # loading 100k cached bottlenecks
    "rss_10k_bytes": 2 * 1024**3,  # peak RSS for 10k images
}


# ----------------------------------------------------------------------------------------------------------------------
# Measuring


def best_of(function: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Run `function` `repeats` times: {"best": s, "median": s, "all": [s, ...]}. The best is the least disturbed."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return {"best": min(seconds), "median": statistics.median(seconds), "all": seconds}


@contextlib.contextmanager
def timed_calls(module: Any, names: list[str]) -> Iterator[dict[str, float]]:
    """Replace module.<name> by a wrapper that adds up its wall time in the yielded dict; restore on exit.

    get_bottlenecks looks run_backbone, write_shard, ... up in its module at call time, so this measures how long
    the pipeline spends in each without touching the product code.
    """
    totals = {name: 0.0 for name in names}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started

        return timed

    for name, original in originals.items():
        setattr(module, name, wrap(name, original))
    try:
        yield totals
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (get_bottlenecks' progress lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process, in bytes.

    On Linux this is VmHWM from /proc/self/status: resource.getrusage's ru_maxrss is not usable in a child process,
    because Linux keeps the parent's high-water mark across fork + exec (a child started by a 2 GB parent reports at
    least 2 GB). Elsewhere ru_maxrss (kilobytes on Linux, bytes on macOS).
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def no_log(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Images: the 16 demo X-rays, and synthetic large films like the public TB sets


def xray_like(height: int, width: int, seed: int, white: int) -> np.ndarray:
    """A smooth chest-film-like picture (bright torso, darker lungs, ribs, soft shading) with fine grain noise.

    Not pure noise, so PNG compresses it about as well as a real film. Values 0..white: uint8 if white <= 255, else
    uint16 (white = 4095 for 12-bit data). The shapes are drawn at 1/8 size and enlarged (smooth and fast).
    """
    rng = np.random.default_rng(seed)
    small_h, small_w = max(height // 8, 16), max(width // 8, 16)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    y, x = y / small_h, x / small_w
    torso = np.exp(-((((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.6) ** 2) ** 2))
    lungs = sum(np.exp(-((((x - cx) / 0.15) ** 2 + ((y - 0.45) / 0.28) ** 2) ** 2)) for cx in (0.32, 0.68))
    ribs = 0.08 * np.sin(2 * np.pi * (9 * y + 1.5 * np.abs(x - 0.5))) * lungs
    shading = np.asarray(Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), "F")
                         .resize((small_w, small_h), Image.Resampling.BICUBIC))
    picture = (0.15 + 0.7 * torso - 0.35 * lungs + ribs + 0.05 * shading).astype(np.float32)
    picture = np.asarray(Image.fromarray(picture, "F").resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 0.008, picture.shape).astype(np.float32)
    return np.clip((picture + grain) * white, 0, white).astype(np.uint16 if white > 255 else np.uint8)


def distinct_copy(payload: bytes, number: int, kind: str) -> bytes:
    """The same picture in a file with different bytes (so a content-keyed cache treats it as a new image).

    JPEG: a COM (comment) segment right after the SOI marker.  PNG: a tEXt chunk right before IEND.
    Decoders ignore both, so decoding costs exactly what the original costs.
    """
    text = f"benchmark copy {number}".encode()
    if kind == "jpeg":
        return payload[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + payload[2:]
    chunk_data = b"Comment\x00" + text
    chunk = len(chunk_data).to_bytes(4, "big") + b"tEXt" + chunk_data + zlib.crc32(b"tEXt" + chunk_data).to_bytes(4, "big")
    iend = payload.rindex(b"IEND") - 4
    return payload[:iend] + chunk + payload[iend:]


def make_images(folder: Path, count: int, demo_copies: int) -> dict[str, dict[str, Any]]:
    """Write the benchmark's image sets into `folder`: {kind: {"paths": [...], "description": str}}.

    Two different pictures per synthetic kind, then byte-distinct copies up to `count` (encoding a 20-megapixel
    16-bit PNG takes seconds; decoding a copy costs the same as decoding an original).
    """
    demo = sorted(DEMO_FOLDER.glob("*/*.jpeg"))
    if not demo:
        raise SystemExit(f"{DEMO_FOLDER}: no demo X-rays found; is mini_retrain installed from its source tree?")
    sets: dict[str, dict[str, Any]] = {}
    demo_paths = []
    for number in range(demo_copies):
        for original in demo:
            target = folder / "demo" / f"{number}-{original.parent.name}-{original.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            payload = original.read_bytes()
            target.write_bytes(payload if number == 0 else distinct_copy(payload, number, "jpeg"))
            demo_paths.append(target)
    sizes = [Image.open(path).size for path in demo]
    sets["demo JPEG X-rays"] = {
        "paths": demo_paths,
        "description": f"{len(demo)} demo chest X-rays (8-bit gray JPEG, {min(sizes)}..{max(sizes)} px) "
                       f"x {demo_copies} byte-distinct copies",
    }
    kinds = [  # name, (height, width), white level, file format, save options
        ("Shenzhen-like PNG 8-bit", (3000, 3000), 255, "png", {"compress_level": 6}),
        ("Montgomery-like PNG 16-bit", (4892, 4020), 4095, "png", {"compress_level": 6}),
        ("large JPEG 8-bit", (3000, 3000), 255, "jpeg", {"quality": 90}),
    ]
    for number, (name, (height, width), white, file_format, options) in enumerate(kinds):
        originals = []
        for seed in range(min(2, count)):
            pixels = xray_like(height, width, seed=100 * number + seed, white=white)
            path = folder / file_format / f"{number}-{seed}.{'jpg' if file_format == 'jpeg' else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format=file_format.upper(), **options)
            originals.append(path)
        paths = list(originals)
        for copy in range(len(originals), count):
            original = originals[copy % len(originals)]
            path = original.with_name(f"{original.stem}-copy{copy}{original.suffix}")
            path.write_bytes(distinct_copy(original.read_bytes(), copy, file_format))
            paths.append(path)
        bits = "12-bit data in 16-bit" if white > 255 else "8-bit gray"
        mean_size = np.mean([path.stat().st_size for path in paths]) / 1e6
        sets[name] = {"paths": paths,
                      "description": f"{count} x {width}x{height} {bits} {file_format.upper()} ({mean_size:.1f} MB each)"}
    return sets


# ----------------------------------------------------------------------------------------------------------------------
# (b) the backbone alone, (c) the FLOP limit


def graph_multiply_adds(onnx_path: Path) -> float | None:
    """Multiply-adds of one image through the graph's Conv nodes (sum of Cout * Cin/group * kh * kw * Hout * Wout)."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    model = onnx.load(str(onnx_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch of 1
    model = shape_inference.infer_shapes(model)
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in list(model.graph.value_info) + list(model.graph.output)}
    weights = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out_channels, in_per_group, kernel_h, kernel_w = weights[node.input[1]]
            _, _, out_h, out_w = shapes[node.output[0]]
            total += out_channels * in_per_group * kernel_h * kernel_w * out_h * out_w
    return float(total)


def forward_rates(backbone: Backbone, tensors: np.ndarray, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    """onnxruntime forward on tensors already in memory: per batch size, seconds per image and images/s."""
    results = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(tensors, (size,) + tensors.shape[1:]))  # repeat images to fill it
        run_backbone(backbone, batch)  # warm-up: onnxruntime plans memory on the first run of a shape
        cpu_started = cpu_seconds()
        timing = best_of(lambda: run_backbone(backbone, batch), repeats if size > 1 else 4 * repeats)
        cpu = (cpu_seconds() - cpu_started) / len(timing["all"]) / size
        results[size] = {"seconds_per_image": timing["best"] / size, "images_per_second": size / timing["best"],
                         "median_seconds_per_image": timing["median"] / size, "cpu_seconds_per_image": cpu,
                         "timing": timing}
    return results


SGEMM_CHILD = r"""
import contextlib, json, os, sys, time, numpy as np
n, repeats, with_torch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "torch"
cores = os.cpu_count() or 1
result = {"env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")}}
try:
    from threadpoolctl import threadpool_info, threadpool_limits
    result["threadpoolctl"] = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                               for i in threadpool_info()]
except ImportError:
    threadpool_limits = None
    result["threadpoolctl"] = None
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
b = np.random.default_rng(1).random((n, n), dtype=np.float32)
c = np.empty_like(a)

def gflops(multiply):
    multiply()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter(); multiply(); seconds.append(time.perf_counter() - started)
    return 2 * n**3 / min(seconds) / 1e9

result["numpy_gflops"] = gflops(lambda: np.matmul(a, b, out=c))
if threadpool_limits is not None:  # one core's worth: not disturbed by another thread being descheduled
    with threadpool_limits(limits=1, user_api="blas"):
        result["numpy_gflops_1_thread"] = gflops(lambda: np.matmul(a, b, out=c))
if with_torch:
    with contextlib.suppress(ImportError):
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tc = ta @ tb
        torch.set_num_threads(cores)
        result["torch_gflops"] = gflops(lambda: torch.mm(ta, tb, out=tc))
        torch.set_num_threads(1)
        result["torch_gflops_1_thread"] = gflops(lambda: torch.mm(ta, tb, out=tc))
print(json.dumps(result))
"""


ARENA_CHILD = r"""
import json, sys, time, numpy as np, onnxruntime
from mini_retrain.pipeline.backbone import load_backbone, session_options
arena, batch, repeats = sys.argv[1] == "on", int(sys.argv[2]), int(sys.argv[3])
backbone = load_backbone(log=lambda line: None)
options = session_options()  # the product's options, with only the arena changed
options.enable_cpu_mem_arena = arena
session = onnxruntime.InferenceSession(str(backbone.path), sess_options=options, providers=["CPUExecutionProvider"])
images = np.random.default_rng(0).standard_normal((batch, 3, 299, 299)).astype(np.float32)
feed, outputs = {backbone.sidecar["input_name"]: images}, [backbone.sidecar["bottleneck_output"]]
session.run(outputs, feed)
seconds = []
for _ in range(repeats):
    started = time.perf_counter(); session.run(outputs, feed); seconds.append(time.perf_counter() - started)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds_per_image": min(seconds) / batch, "peak_rss_mib": peak / 1024}))
"""


def measure_arena(batch: int, repeats: int) -> dict:
    """onnxruntime's CPU memory arena on (the product) and off: forward speed and peak RSS, each in its own process."""
    results = {}
    for state in ("on", "off"):
        command = [sys.executable, "-c", ARENA_CHILD, state, str(batch), str(repeats)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            return {"error": finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else "failed"}
        results[state] = json.loads(finished.stdout)
    return results


def measure_sgemm(size: int, repeats: int, unset_openblas: bool, with_torch: bool) -> dict:
    """float32 n x n matrix product in a child process; unset_openblas removes OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
    (a core type forced for safety can select a slower kernel than OpenBLAS would pick for this CPU)."""
    environment = dict(os.environ)
    if unset_openblas:
        environment.pop("OPENBLAS_CORETYPE", None)
        environment.pop("OPENBLAS_L2_SIZE", None)
    command = [sys.executable, "-c", SGEMM_CHILD, str(size), str(repeats), "torch" if with_torch else "numpy"]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    if finished.returncode != 0:
        return {"error": finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else "failed"}
    result = json.loads(finished.stdout)
    if "numpy_gflops_1_thread" not in result:  # no threadpoolctl: one thread by OpenBLAS's environment variable
        command[-1] = "numpy"
        one = subprocess.run(command, env=environment | {"OPENBLAS_NUM_THREADS": "1"}, capture_output=True, text=True)
        if one.returncode == 0:
            result["numpy_gflops_1_thread"] = json.loads(one.stdout)["numpy_gflops"]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# (a) the pipeline from files


def decode_one(path: Path, sidecar: dict, fast: bool = False) -> np.ndarray:
    """What get_bottlenecks' decode threads do for one file: read, resize, scale -> (3, 299, 299) float32."""
    return backbone_input(read_image(path, fast=fast, keep_gray=True), sidecar, fast=fast)


def decode_rates(paths: list[Path], sidecar: dict, workers: int, fast: bool = False) -> dict:
    """Decode+resize alone: one thread (ms per image, = CPU cost), and `workers` threads (images/s)."""
    decode_one(paths[0], sidecar, fast)  # warm the page cache and Pillow's plugins
    serial = best_of(lambda: [decode_one(path, sidecar, fast) for path in paths], 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        threaded = best_of(lambda: list(pool.map(lambda path: decode_one(path, sidecar, fast), paths)), 2)
    return {"seconds_per_image_1_thread": serial["best"] / len(paths),
            f"images_per_second_{workers}_threads": len(paths) / threaded["best"],
            "timing_1_thread": serial, "timing_threads": threaded}


def pipeline_rate(paths: list[Path], backbone: Backbone, scratch: Path, **options: Any) -> dict:
    """get_bottlenecks on `paths` into a fresh, empty cache: images/s and where the wall time went.

    Then once more on the same cache ("cached"): every bottleneck is found, so that run is the file hashing
    (the cache key is the SHA-1 of each file's bytes) plus reading the cache.
    """
    names = ["run_backbone", "write_shard", "compact_store", "load_store", "file_sha1"]
    with tempfile.TemporaryDirectory(dir=scratch) as bottleneck_dir:
        with timed_calls(bottleneck_store, names) as spent, quiet_stderr():
            started, cpu_started = time.perf_counter(), cpu_seconds()
            result = bottleneck_store.get_bottlenecks(paths, backbone, bottleneck_dir, log=no_log, **options)
            wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        if result.computed != len(paths):
            raise RuntimeError(f"pipeline computed {result.computed} of {len(paths)} images (bad: {result.bad[:3]})")
        with timed_calls(bottleneck_store, ["file_sha1"]) as cached_spent, quiet_stderr():
            cached = best_of(lambda: bottleneck_store.get_bottlenecks(paths, backbone, bottleneck_dir, log=no_log,
                                                                      **options), 1)["best"]
    store = spent["write_shard"] + spent["compact_store"] + spent["load_store"]
    network = spent["run_backbone"]
    return {"images": len(paths), "seconds": wall, "images_per_second": len(paths) / wall,
            "cpu_seconds_per_image": cpu / len(paths),
            "network_seconds": network, "store_seconds": store, "sha1_seconds": spent["file_sha1"],
            "other_seconds": wall - network - store - spent["file_sha1"],
            "cached_rerun_seconds": cached, "cached_rerun_images_per_second": len(paths) / cached,
            "cached_rerun_sha1_seconds": cached_spent["file_sha1"]}


def distinct_copies(paths: list[Path], total: int) -> list[Path]:
    """`paths` plus byte-distinct copies of them (written beside them) up to `total` files."""
    result = list(paths)
    for number in range(len(paths), total):
        original = paths[number % len(paths)]
        kind = "jpeg" if original.suffix.lower() in (".jpg", ".jpeg") else "png"
        copy = original.with_name(f"{original.stem}-rss{number}{original.suffix}")
        copy.write_bytes(distinct_copy(original.read_bytes(), 1000 + number, kind))
        result.append(copy)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory, in child processes (so that this process's own big arrays do not count)


def child(spec_path: str) -> None:
    """Child mode: do what the spec says ("pipeline" or "compact") and print the peak RSS as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    report: dict[str, Any] = {"peak_rss_after_imports_bytes": peak_rss_bytes()}
    if spec["task"] == "compact":
        started = time.perf_counter()
        bottleneck_store.compact_store(Path(spec["folder"]))
        report.update(seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes())
        print(json.dumps(report))
        return
    onnx_path = ensure_backbone()
    if spec["stub_network"]:
        # Bookkeeping only: the files are tiny and the network is replaced by random numbers, so what grows with the
        # number of images (keys, bottlenecks, shards, the final merge) is all that is measured.
        sidecar = json.loads(sidecar_path(onnx_path).read_text())
        backbone = Backbone(None, onnx_path, sidecar, "none")
        rng = np.random.default_rng(0)
        bottleneck_store.run_backbone = lambda _, images, **options: rng.random((len(images), 2048), dtype=np.float32)
    else:
        backbone = load_backbone(onnx_path, device="cpu", log=no_log)
        # As in the middle of a long run: onnxruntime keeps what it allocated for a full batch (its arena, and the
        # memory plan it makes on the second run of a shape), so run a full batch twice before measuring.
        size = backbone.sidecar["input_size"][0]
        zeros = np.zeros((spec["batch_size"], 3, size, size), np.float32)
        run_backbone(backbone, zeros)
        run_backbone(backbone, zeros)
        del zeros
    paths = [Path(line) for line in Path(spec["paths_file"]).read_text().splitlines()]
    report["peak_rss_before_pipeline_bytes"] = peak_rss_bytes()
    with quiet_stderr():
        result = bottleneck_store.get_bottlenecks(paths, backbone, spec["bottleneck_dir"], log=no_log)
    report.update(images=len(paths), computed=result.computed, peak_rss_bytes=peak_rss_bytes(),
                  ru_maxrss_raw=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps(report))


def run_child(spec: dict[str, Any], scratch: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        finished = subprocess.run([sys.executable, __file__, "--child", str(spec_path)],
                                  capture_output=True, text=True)
    if finished.returncode != 0:
        return {"error": (finished.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure_rss(paths: list[Path], scratch: Path, stub_network: bool, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        paths_file = Path(folder) / "paths.txt"
        paths_file.write_text("\n".join(str(path) for path in paths))
        return run_child({"task": "pipeline", "paths_file": str(paths_file), "stub_network": stub_network,
                          "bottleneck_dir": str(Path(folder) / "cache"), "batch_size": batch_size}, scratch)


def tiny_images(folder: Path, count: int) -> list[Path]:
    """`count` distinct 16x16 gray PNGs (the pixel values spell the image's number)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        pixels = np.full((16, 16), 128, np.uint8)
        pixels.flat[:8] = np.frombuffer(number.to_bytes(8, "little"), np.uint8)
        path = folder / f"{number:06d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# (e) training: the same loop in PyTorch


def torch_training_loop(torch, train_x, train_y, validation_x, validation_y, steps: int, batch: int,
                        learning_rate: float = 0.01, eval_step_interval: int = 10, seed: int = 0) -> None:
    """retrain.py's loop written as a PyTorch user would: class-balanced batches, autograd, plain SGD, the same
    evaluations (train accuracy and cross-entropy on the batch, accuracy on a fresh validation batch) every 10 steps."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    vx, vy = torch.from_numpy(validation_x), torch.from_numpy(validation_y)
    classes = int(y.max()) + 1

    def grouping(labels):  # (indices sorted by class, where each class starts, how many it has), made once
        order = torch.argsort(labels, stable=True)
        count = torch.bincount(labels, minlength=classes)
        return order, torch.cumsum(count, 0) - count, count

    train_groups, validation_groups = grouping(y), grouping(vy)
    weights = (torch.randn(x.shape[1], classes, generator=generator) * 0.001).requires_grad_()
    biases = torch.zeros(classes, requires_grad=True)

    def sample(groups, size):  # a class uniformly, then one of its images uniformly, with replacement
        order, start, count = groups
        drawn = torch.randint(classes, (size,), generator=generator)
        offsets = (torch.rand(size, generator=generator) * count[drawn]).long()
        return order[start[drawn] + offsets]

    for step in range(steps):
        chosen = sample(train_groups, batch)
        logits = x[chosen] @ weights + biases
        loss = torch.nn.functional.cross_entropy(logits, y[chosen])
        loss.backward()
        with torch.no_grad():
            weights -= learning_rate * weights.grad
            biases -= learning_rate * biases.grad
            weights.grad = None
            biases.grad = None
            if step % eval_step_interval == 0 or step + 1 == steps:
                logits = x[chosen] @ weights + biases
                float((logits.argmax(1) == y[chosen]).float().mean())
                float(torch.nn.functional.cross_entropy(logits, y[chosen]))
                picked = sample(validation_groups, batch)
                float(((vx[picked] @ weights + biases).argmax(1) == vy[picked]).float().mean())


SHENZHEN_TRAINING_ROWS = 530  # 80% of the Shenzhen set's 662 X-rays


def training_floor(bottlenecks: np.ndarray, steps: int, rng: np.random.Generator) -> None:
    """Only the memory-bound work of `steps` training steps: gather 100 random rows, x @ W, x.T @ dL/dz.

    No softmax, no update, no sampling logic: every training loop over these rows does at least this much, so its
    time is a floor for (e) on this machine.
    """
    weights = np.zeros((bottlenecks.shape[1], 2), np.float32)
    d_logits = np.ones((100, 2), np.float32)
    batches = rng.integers(0, len(bottlenecks), (steps, 100))
    for batch in batches:
        x = bottlenecks[batch]  # (100, 2048): 800 KB from the cache or memory
        x @ weights  # (100, 2048) @ (2048, 2)
        x.T @ d_logits  # (2048, 100) @ (100, 2)


def synthetic_bottlenecks(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 2048) float32 >= 0 like pool_3 (an average of ReLUs), two classes that differ a little, labels (rows,)."""
    labels = (rng.random(rows) < 0.3).astype(np.int64)
    values = rng.gamma(0.5, 0.8, (rows, 2048)).astype(np.float32)
    values[:, :64] += 0.3 * labels[:, None]
    return values, labels


# ----------------------------------------------------------------------------------------------------------------------
# The run


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version(), "numpy": np.__version__, "pillow": Image.__version__,
                "onnxruntime": onnxruntime.__version__}
    for name in ("torch", "threadpoolctl"):  # from the installed metadata: importing torch here would start OpenMP
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    blas = None
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_info

        blas = [{k: info.get(k) for k in ("internal_api", "architecture", "num_threads")} for info in threadpool_info()]
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": model,
            "cores": os.cpu_count(), "platform": platform.platform(), "versions": versions, "blas_here": blas,
            "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}


ROWS = ("a", "b", "c", "d", "e", "f", "g", "rss")  # in the order of the table; (a) and (b) are measured together
DEMO_KIND = "demo JPEG X-rays"
PIPELINE_BATCH = bottleneck_store.BATCH_SIZE  # the batch the product runs the network on
DECODE_WORKERS = bottleneck_store.DECODE_WORKERS  # its decode threads


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "load_average": {"start": load_average()}, "notes": []}
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:4.0f} s, load {load_average():.1f}] {text}", flush=True)

    say(f"mini_retrain benchmark on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
        f"load average {report['load_average']['start']:.2f}")
    if report["load_average"]["start"] > 0.5 * (os.cpu_count() or 1):
        report["notes"].append("other processes were using the CPU at the start: the numbers are pessimistic")
        say("WARNING: other processes are using the CPU; timings will be pessimistic (best-of repeats help)")
    scratch = Path(tempfile.mkdtemp(prefix="mini_retrain_benchmark_"))
    try:
        return measure_rows(arguments, report, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_rows(arguments, report: dict[str, Any], scratch: Path, say: Callable[[str], None]) -> dict:
    """Measure the rows asked for (--rows), one function each, in an order that keeps torch (d) last."""
    rows, started, inputs = set(arguments.rows), time.perf_counter(), {}

    def shared() -> dict[str, Any]:  # the images, the backbone and the demo tensors, made once for the rows needing them
        if not inputs:
            say("Making images ...")
            inputs["sets"] = make_images(scratch / "images", arguments.count, arguments.demo_copies)
            report["images"] = {kind: entry["description"] for kind, entry in inputs["sets"].items()}
            inputs["backbone"] = load_backbone(device="cpu", log=no_log)
            demo_paths = inputs["sets"][DEMO_KIND]["paths"][:16]  # the 16 originals
            inputs["demo_tensors"] = np.stack([decode_one(path, inputs["backbone"].sidecar)
                                               for path in demo_paths])  # (16, 3, 299, 299)
        return inputs

    if rows & {"a", "b"}:
        measure_pipeline_and_forward(arguments, report, shared(), scratch, say)
    if "g" in rows:
        measure_fast_decode(report, shared(), say)
    if "e" in rows:
        measure_training(arguments, report, say)
    if "f" in rows:
        measure_store(arguments, report, scratch, say)
    if rows & {"b", "c", "d"}:  # (b) and (d) are also given as a share of the FLOP limit
        measure_flop_limit(arguments, report, ensure_backbone(log=no_log), say)
    if "rss" in rows:
        measure_memory(arguments, report, shared()["sets"], scratch, say)
    if "d" in rows or "e" in rows:  # PyTorch last: importing torch starts OpenMP threads that disturb the rows above
        measure_torch(arguments, report, shared() if "d" in rows else None, say)
    report["load_average"]["end"] = load_average()
    report["seconds"] = time.perf_counter() - started
    report["rows_measured"] = [row for row in ROWS if row in rows]
    report["rows"] = summary_rows(report)
    return report


def measure_pipeline_and_forward(arguments, report: dict, inputs: dict, scratch: Path, say) -> None:
    """Rows (a) and (b): the backbone alone and the pipeline on the demo X-rays, interleaved (other processes come and
    go, and the target is a ratio of the two, so each round measures both and the best round of each is kept); then
    the 1-thread forward, the memory arena on and off, and the pipeline on the large images."""
    repeats, sets, backbone, tensors = arguments.repeats, inputs["sets"], inputs["backbone"], inputs["demo_tensors"]
    sidecar = backbone.sidecar
    say("(b) onnxruntime forward on preloaded tensors, interleaved with (a) the pipeline on the demo X-rays ...")
    sizes = tuple(sorted({1, 16, 32, PIPELINE_BATCH}))
    rounds = [(forward_rates(backbone, tensors, sizes, repeats), pipeline_rate(sets[DEMO_KIND]["paths"], backbone,
                                                                               scratch)) for _ in range(repeats)]
    report["pipeline_batch_size"] = PIPELINE_BATCH
    report["forward_onnxruntime"] = {size: min((measured[size] for measured, _ in rounds),
                                               key=lambda m: m["seconds_per_image"]) for size in sizes}
    report["forward_rounds"] = [measured for measured, _ in rounds]
    # One core's worth, as a per-core efficiency that other processes on the machine disturb less.
    options = session_options()
    options.intra_op_num_threads = 1
    one_thread = Backbone(onnxruntime.InferenceSession(str(backbone.path), sess_options=options,
                                                       providers=["CPUExecutionProvider"]),
                          backbone.path, sidecar, "CPUExecutionProvider")
    report["forward_onnxruntime_1_thread"] = forward_rates(one_thread, tensors, (16,), repeats)[16]
    del one_thread
    say("(b) onnxruntime with its memory arena on and off (child processes) ...")
    report["arena"] = measure_arena(PIPELINE_BATCH, repeats)
    pipeline: dict[str, Any] = {DEMO_KIND: {
        "pipeline": max((measured for _, measured in rounds), key=lambda m: m["images_per_second"]),
        "pipeline_rounds": [measured for _, measured in rounds],
        "decode": decode_rates(sets[DEMO_KIND]["paths"][:16], sidecar, workers=DECODE_WORKERS),
    }}
    for kind, entry in sets.items():
        if kind == DEMO_KIND:
            continue
        say(f"(a) pipeline: {kind} ({len(entry['paths'])} files) ...")
        pipeline[kind] = {
            "pipeline": pipeline_rate(entry["paths"], backbone, scratch),
            "pipeline_fast_decode": pipeline_rate(entry["paths"], backbone, scratch, fast_decode=True),
            "decode": decode_rates(entry["paths"][: max(4, min(16, len(entry["paths"])))], sidecar,
                                   workers=DECODE_WORKERS),
        }
    report["pipeline"] = pipeline


def measure_fast_decode(report: dict, inputs: dict, say) -> None:
    """Row (g): --fast_decode (JPEG draft, Image.reduce) against the exact path: bottleneck difference and speed."""
    say("(g) fast decode (JPEG draft + reduce) vs exact ...")
    backbone, draft = inputs["backbone"], {}
    sidecar = backbone.sidecar
    for kind, entry in inputs["sets"].items():
        paths = entry["paths"][:16]
        exact = run_backbone(backbone, np.stack([decode_one(path, sidecar) for path in paths]))
        fast = run_backbone(backbone, np.stack([decode_one(path, sidecar, fast=True) for path in paths]))
        difference = np.abs(fast - exact)
        cosine = (fast * exact).sum(1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(exact, axis=1))
        draft[kind] = {
            "max_abs_difference": float(difference.max()), "mean_abs_difference": float(difference.mean()),
            "mean_abs_bottleneck": float(np.abs(exact).mean()), "min_cosine": float(cosine.min()),
            "decode_exact": decode_rates(paths, sidecar, workers=DECODE_WORKERS),
            "decode_fast": decode_rates(paths, sidecar, workers=DECODE_WORKERS, fast=True),
        }
        draft[kind]["decode_speedup"] = (draft[kind]["decode_exact"]["seconds_per_image_1_thread"]
                                         / draft[kind]["decode_fast"]["seconds_per_image_1_thread"])
    report["draft"] = draft


def training_data(arguments, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The synthetic training and validation bottlenecks of row (e) (the same numbers from the same generator)."""
    train_x, train_y = synthetic_bottlenecks(arguments.train_rows, rng)
    validation_x, validation_y = synthetic_bottlenecks(max(arguments.train_rows // 10, 100), rng)
    return train_x, train_y, validation_x, validation_y


def numpy_training(arguments, train_x, train_y, validation_x, validation_y) -> None:
    """The product's training loop with retrain's settings (RetrainSettings' defaults) but --steps."""
    train_final_layer(train_x, train_y, validation_x, validation_y, 2, np.random.default_rng(1),
                      how_many_training_steps=arguments.steps, learning_rate=TRAINING.learning_rate,
                      train_batch_size=TRAINING.train_batch_size, validation_batch_size=TRAINING.validation_batch_size,
                      eval_step_interval=TRAINING.eval_step_interval, class_balancing=TRAINING.class_balancing,
                      log=no_log)


def measure_training(arguments, report: dict, say) -> None:
    """Row (e), NumPy half: the training loop on 5000 rows and on the Shenzhen set's size, and the floor of each."""
    say("(e) NumPy training loop ...")
    repeats, rng = arguments.repeats, np.random.default_rng(0)
    train_x, train_y, validation_x, validation_y = training_data(arguments, rng)
    report["training_numpy"] = best_of(lambda: numpy_training(arguments, train_x, train_y, validation_x, validation_y),
                                       repeats)
    report["training_numpy"].update(rows=arguments.train_rows, steps=arguments.steps)
    report["training_floor"] = best_of(lambda: training_floor(train_x, arguments.steps, rng), repeats)
    # The same loop at the size of the Shenzhen set's training split (80% of 662 X-rays): its rows fit in cache.
    small_x, small_y = synthetic_bottlenecks(SHENZHEN_TRAINING_ROWS, rng)
    report["training_numpy_shenzhen"] = best_of(
        lambda: numpy_training(arguments, small_x, small_y, small_x[:66], small_y[:66]), repeats)
    report["training_floor_shenzhen"] = best_of(lambda: training_floor(small_x, arguments.steps, rng), repeats)


def measure_store(arguments, report: dict, scratch: Path, say) -> None:
    """Row (f): loading 100k cached bottlenecks, and what merging one new batch into that store costs."""
    say(f"(f) loading {arguments.store_rows} cached bottlenecks ...")
    store_folder = scratch / "store"
    store_folder.mkdir()
    keys = [f"{number:040x}" for number in range(arguments.store_rows)]
    values = np.random.default_rng(2).random((arguments.store_rows, 2048), dtype=np.float32)
    shard = bottleneck_store.write_shard(store_folder, keys, values)
    del values
    loaded = {}

    def load():
        loaded["index"], loaded["values"] = bottleneck_store.load_store(store_folder, log=no_log)

    report["store_load"] = best_of(load, 2)
    report["store_load"].update(rows=arguments.store_rows, shard_bytes=shard.stat().st_size,
                                loaded_rows=int(len(loaded["values"])))
    loaded.clear()
    # What the next run that adds one batch pays: get_bottlenecks merges all shards into one after computing.
    say(f"(f) merging a new 32-row shard into the {arguments.store_rows}-row store (compact_store, child process) ...")
    bottleneck_store.write_shard(store_folder, [f"{'f' * 32}{number:08x}" for number in range(32)],
                                 np.ones((32, 2048), np.float32))
    report["store_compact"] = run_child({"task": "compact", "folder": str(store_folder)}, scratch)
    shutil.rmtree(store_folder)


def measure_flop_limit(arguments, report: dict, onnx_path: Path, say) -> None:
    """Row (c): a measured float32 matrix product against the network's multiply-adds."""
    say("(c) sgemm in a child process (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset) ...")
    have_torch = importlib.util.find_spec("torch") is not None  # not imported here: see measure_torch
    sgemm = {"unset": measure_sgemm(arguments.sgemm_size, 4, unset_openblas=True, with_torch=have_torch)}
    if any(report["machine"]["openblas_env"].values()):
        sgemm["as_set"] = measure_sgemm(arguments.sgemm_size, 4, unset_openblas=False, with_torch=False)
    report["flops"] = {"sgemm": sgemm, "multiply_adds_counted": graph_multiply_adds(onnx_path),
                       "multiply_adds_assumed": MULTIPLY_ADDS_ASSUMED}


def measure_memory(arguments, report: dict, sets: dict, scratch: Path, say) -> None:
    """Row rss: peak memory of the pipeline in child processes, and its growth per image on thousands of tiny ones."""
    say("Peak RSS (child processes) ...")
    # One full batch and then as many files as there are decode workers: the network runs on the full batch while the
    # workers decode the next one, so onnxruntime's memory for a whole batch and the decoders' peak both count.
    files = PIPELINE_BATCH + DECODE_WORKERS
    memory = {kind: measure_rss(distinct_copies(entry["paths"], max(len(entry["paths"]), files)), scratch,
                                stub_network=False, batch_size=PIPELINE_BATCH)
              for kind, entry in sets.items()}
    small, large = arguments.rss_images // 5, arguments.rss_images
    tiny = tiny_images(scratch / "tiny", large)
    memory["bookkeeping"] = {str(n): measure_rss(tiny[:n], scratch, stub_network=True, batch_size=0)
                             for n in (small, large)}
    report["memory"] = memory


def measure_torch(arguments, report: dict, inputs: dict | None, say: Callable[[str], None]) -> None:
    """Row (d) (when `inputs` are given: the network) and the PyTorch half of (e).

    PyTorch parallelises each operator with OpenMP; when other processes also want the 2 cores, every operator waits
    at a barrier for a descheduled thread, and 2-thread timings collapse (seen here: 4 s per image at batch 1).
    So (d) is also measured on 1 thread, and the training loop (thousands of tiny operators) runs on 1 thread,
    PyTorch's fastest setting for it.
    """
    if importlib.util.find_spec("torch") is None:
        report["torch"] = {"skipped": "torch not importable"}
        return
    if arguments.no_torch:
        report["torch"] = {"skipped": "--no-torch"}
        return
    import torch

    result: dict[str, Any] = {}
    weights = cache_dir() / "default_1.pt"
    if inputs is None:
        result["skipped_network"] = "row d not asked for (--rows)"
    elif not weights.exists():
        result["skipped_network"] = f"{weights} not found (it is fetched when the backbone is first built)"
    else:
        say("(d) PyTorch eager, original TorchScript ...")
        tensors = inputs["demo_tensors"]
        model = torch.jit.load(str(weights), map_location="cpu").eval()

        def rate(network, size: int, threads: int) -> dict:
            torch.set_num_threads(threads)
            batch = torch.from_numpy(np.ascontiguousarray(np.resize(tensors, (size,) + tensors.shape[1:])))
            for _ in range(2):  # the TorchScript executor profiles and optimises during the first runs
                network(batch)
            timing = best_of(lambda: network(batch), arguments.repeats)
            return {"seconds_per_image": timing["best"] / size, "images_per_second": size / timing["best"],
                    "threads": threads, "timing": timing}

        with torch.inference_mode():
            result["forward"] = {size: rate(model, size, 2) for size in (1, 16)}
            result["forward_1_thread_16"] = rate(model, 16, 1)
            torch.set_num_threads(2)
            output = model(torch.from_numpy(tensors)).numpy()
            reference = run_backbone(inputs["backbone"], tensors)
            result["max_abs_difference_vs_onnxruntime"] = float(np.abs(output - reference).max())
            say("(d) PyTorch, frozen + optimize_for_inference (best effort, for information) ...")
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(model))
            result["forward_frozen_16"] = rate(frozen, 16, 2)
    if "e" in arguments.rows:
        say("(e) PyTorch training loop (1 thread) ...")
        torch.set_num_threads(1)
        result["training"] = best_of(lambda: torch_training_loop(torch, *training_data(arguments, np.random.default_rng(0)),
                                                                 arguments.steps,
                                                                 TRAINING.train_batch_size), arguments.repeats)
        result["training"]["threads"] = 1
    report["torch"] = result


# ----------------------------------------------------------------------------------------------------------------------
# The table: one function per row


def table_row(row, what, per_second=None, ms=None, ratio=None, ratio_of="", target=None, verdict=None) -> dict:
    """One printed row: row, what, images/s, ms/image, ratio, target, verdict."""
    return {"row": row, "what": what, "images_per_second": per_second, "ms_per_image": ms, "ratio": ratio,
            "ratio_of": ratio_of, "target": target, "verdict": verdict}


def flop_limits(report: dict) -> tuple[float, float]:
    """Images/s if every multiply-add ran at sgemm speed: on all threads, and on one (nan where not measured)."""
    flops = report.get("flops")
    if not flops:
        return float("nan"), float("nan")
    multiply_adds = flops["multiply_adds_counted"] or flops["multiply_adds_assumed"]
    unset = flops["sgemm"]["unset"]
    return tuple((unset.get(key) or float("nan")) * 1e9 / (2 * multiply_adds)
                 for key in ("numpy_gflops", "numpy_gflops_1_thread"))


def pipeline_rows(report: dict) -> list[dict]:
    """(a) the pipeline per kind of image, as a share of the raw forward and of what 2 cores allow."""
    rows, forward = [], report["forward_onnxruntime"]
    # The pipeline is compared with the best raw forward of batch 16 and 32 (strict: a slower batch size chosen by
    # the pipeline counts against it); the row also gives the ratio to its own batch size (decode overhead alone).
    raw = max(forward[16]["images_per_second"], forward[32]["images_per_second"])
    own_batch = report["pipeline_batch_size"]
    for kind, entry in report["pipeline"].items():
        measured = entry["pipeline"]
        ratio = measured["images_per_second"] / raw
        is_target = kind == DEMO_KIND
        network = measured["network_seconds"] / measured["seconds"]
        store = measured["store_seconds"] / measured["seconds"]
        own = measured["images_per_second"] / forward[own_batch]["images_per_second"]
        # What 2 cores allow: decoding and the network each use both cores, so at best their times add up:
        # decode+resize on 2 threads + the raw forward at the pipeline's batch size, per image.
        bound = 1 / entry["decode"]["images_per_second_2_threads"] + forward[own_batch]["seconds_per_image"]
        rows.append(table_row(
            "a", f"pipeline, {kind} (network {network:.0%}, cache {store:.0%}, decode wait+sha1 "
                 f"{1 - network - store:.0%}; {own:.2f} x raw forward at its batch size {own_batch}; "
                 f"{bound * measured['images_per_second']:.0%} of the 2-core bound, {1000 * bound:.1f} ms/image = "
                 f"decode on 2 threads + network)",
            measured["images_per_second"], 1000 / measured["images_per_second"], ratio, "x raw forward",
            ">= 0.9x" if is_target else None,
            ("PASS" if ratio >= TARGETS["pipeline_vs_forward"] else "MISS") if is_target else None))
        if "pipeline_fast_decode" in entry:
            fast = entry["pipeline_fast_decode"]
            rows.append(table_row("a", f"  with --fast_decode: {kind}", fast["images_per_second"],
                                  1000 / fast["images_per_second"], fast["images_per_second"] / raw, "x raw forward"))
        rows.append(table_row(
            "a", f"  second run, all cached: {kind} (SHA-1 of the files, on 2 threads: "
                 f"{1000 * measured['cached_rerun_sha1_seconds'] / measured['images']:.1f} ms of thread time per file)",
            measured["cached_rerun_images_per_second"], 1000 / measured["cached_rerun_images_per_second"]))
        decode = entry["decode"]
        rows.append(table_row(
            "a", f"  decode+resize alone, {kind} (1 thread; 2 threads: {decode['images_per_second_2_threads']:.1f}/s)",
            1 / decode["seconds_per_image_1_thread"], 1000 * decode["seconds_per_image_1_thread"],
            decode["seconds_per_image_1_thread"] * raw, "x forward time"))
    return rows


def forward_rows(report: dict) -> list[dict]:
    """(b) the backbone alone per batch size and on 1 thread, as a share of the FLOP limit; the memory arena."""
    forward, one = report["forward_onnxruntime"], report["forward_onnxruntime_1_thread"]
    limit, limit_1 = flop_limits(report)
    rows = [table_row("b", f"onnxruntime forward, batch {size}", forward[size]["images_per_second"],
                      1000 * forward[size]["seconds_per_image"], forward[size]["images_per_second"] / limit,
                      "x FLOP limit") for size in sorted(forward)]
    rows.append(table_row("b", "  onnxruntime forward, 1 thread, batch 16", one["images_per_second"],
                          1000 * one["seconds_per_image"], one["images_per_second"] / limit_1, "x 1-thread FLOP limit"))
    arena = report.get("arena", {"error": "not measured"})
    if "error" in arena:
        rows.append(table_row("b", f"  memory arena on/off: failed ({arena['error']})"))
    else:
        on, off = arena["on"], arena["off"]
        rows.append(table_row(
            "b", f"  memory arena off, batch {report['pipeline_batch_size']} (the product keeps it on): peak RSS "
                 f"{off['peak_rss_mib']:.0f} MiB instead of {on['peak_rss_mib']:.0f}", 1 / off["seconds_per_image"],
            1000 * off["seconds_per_image"], off["seconds_per_image"] / on["seconds_per_image"], "x time with arena"))
    return rows


def flop_limit_rows(report: dict) -> list[dict]:
    """(c) the FLOP limit from numpy's (and torch's) sgemm, on all threads and on one."""
    flops = report["flops"]
    multiply_adds = flops["multiply_adds_counted"] or flops["multiply_adds_assumed"]
    unset = flops["sgemm"]["unset"]
    limit, limit_1 = flop_limits(report)
    kernel = ",".join(str(info.get("architecture")) for info in (unset.get("threadpoolctl") or [])) or "unknown"
    rows = [table_row("c", f"FLOP limit: numpy sgemm {unset.get('numpy_gflops', float('nan')):.0f} GFLOP/s "
                           f"(OpenBLAS kernel {kernel}) / (2 x {multiply_adds / 1e9:.2f} G mult-adds)",
                      limit, 1000 / limit, 1.0)]
    if "numpy_gflops_1_thread" in unset:
        rows.append(table_row("c", f"  same on 1 thread: {unset['numpy_gflops_1_thread']:.0f} GFLOP/s", limit_1,
                              1000 / limit_1, limit_1 / limit, "x 2-thread limit"))
        cores = report["machine"]["cores"] or 1
        rows.append(table_row("c", f"  {cores} x the 1-thread limit (every core free for us)", cores * limit_1,
                              1000 / (cores * limit_1), cores * limit_1 / limit, "x 2-thread limit"))
    for key, label in (("torch_gflops", "torch (MKL) sgemm"), ("torch_gflops_1_thread", "torch (MKL) sgemm, 1 thread")):
        if key in unset:
            torch_limit = unset[key] * 1e9 / (2 * multiply_adds)
            rows.append(table_row("c", f"  {label}: {unset[key]:.0f} GFLOP/s", torch_limit, 1000 / torch_limit,
                                  torch_limit / limit, "x numpy limit"))
    if "as_set" in flops["sgemm"] and "numpy_gflops" in flops["sgemm"]["as_set"]:
        as_set = flops["sgemm"]["as_set"]
        kernel = ",".join(str(info.get("architecture")) for info in (as_set.get("threadpoolctl") or []))
        rows.append(table_row("c", f"  sgemm with OPENBLAS_CORETYPE as set here: {as_set['numpy_gflops']:.0f} GFLOP/s "
                                   f"({kernel})", ratio=as_set["numpy_gflops"] / unset["numpy_gflops"],
                              ratio_of="x unset"))
    return rows


def torch_rows(report: dict) -> list[dict]:
    """(d) PyTorch running the original TorchScript, against onnxruntime on the same tensors."""
    torch_report = report["torch"]
    if "forward" not in torch_report:
        return [table_row("d", f"PyTorch: skipped ({torch_report.get('skipped') or torch_report.get('skipped_network')})")]
    forward, one = report["forward_onnxruntime"], report["forward_onnxruntime_1_thread"]
    compared = [(torch_report["forward"][1], forward[1], "PyTorch eager (TorchScript), 2 threads, batch 1"),
                (torch_report["forward"][16], forward[16], "PyTorch eager (TorchScript), 2 threads, batch 16"),
                (torch_report["forward_1_thread_16"], one, "PyTorch eager, 1 thread, batch 16 (vs onnxruntime "
                                                           "on 1 thread)")]
    rows = []
    for measured, ours, label in compared:
        speedup = ours["images_per_second"] / measured["images_per_second"]
        rows.append(table_row("d", label, measured["images_per_second"], 1000 * measured["seconds_per_image"], speedup,
                              "onnxruntime speedup", ">= 2x",
                              "PASS" if speedup >= TARGETS["onnxruntime_vs_torch"] else "MISS"))
    frozen = torch_report["forward_frozen_16"]
    rows.append(table_row("d", "  PyTorch frozen + optimize_for_inference, 2 threads, batch 16 (info)",
                          frozen["images_per_second"], 1000 * frozen["seconds_per_image"],
                          forward[16]["images_per_second"] / frozen["images_per_second"], "onnxruntime speedup"))
    return rows


def training_rows(report: dict) -> list[dict]:
    """(e) the NumPy training loop against the 0.3 s target, its floor, and the same loop in PyTorch."""
    seconds, steps = report["training_numpy"]["best"], report["training_numpy"]["steps"]
    target = TARGETS["training_seconds"]
    per_4000 = seconds * 4000 / steps  # the target is for 4000 steps
    rows = [table_row("e", f"NumPy training, {steps} steps x batch 100, {report['training_numpy']['rows']} rows: "
                           f"{seconds:.3f} s", ratio=per_4000 / target, ratio_of="x target time",
                      target="<= 0.3 s / 4000 steps", verdict="PASS" if per_4000 <= target else "MISS")]
    floor = report["training_floor"]["best"]
    rows.append(table_row("e", f"  floor: only the gather of 100 rows and the two matrix products, {steps} times: "
                               f"{floor:.3f} s", ratio=floor * 4000 / steps / target, ratio_of="x target time"))
    small = report["training_numpy_shenzhen"]["best"]
    rows.append(table_row("e", f"NumPy training, {steps} steps x batch 100, {SHENZHEN_TRAINING_ROWS} rows (Shenzhen's "
                               f"training split): {small:.3f} s", ratio=small * 4000 / steps / target,
                          ratio_of="x target time", target="<= 0.3 s / 4000 steps",
                          verdict="PASS" if small * 4000 / steps <= target else "MISS"))
    small_floor = report["training_floor_shenzhen"]["best"]
    rows.append(table_row("e", f"  floor at {SHENZHEN_TRAINING_ROWS} rows: {small_floor:.3f} s",
                          ratio=small_floor * 4000 / steps / target, ratio_of="x target time"))
    if "training" in report.get("torch", {}):
        torch_seconds = report["torch"]["training"]["best"]
        rows.append(table_row("e", f"  PyTorch training, same loop, 1 thread: {torch_seconds:.3f} s",
                              ratio=torch_seconds / seconds, ratio_of="x NumPy time"))
    return rows


def store_rows(report: dict) -> list[dict]:
    """(f) loading 100k cached bottlenecks, and merging a new batch into them."""
    store = report["store_load"]
    per_100k = store["best"] * 100_000 / store["rows"]  # the target is for 100k rows
    rows = [table_row("f", f"load {store['rows']} cached bottlenecks ({store['shard_bytes'] / 1e6:.0f} MB shard): "
                           f"{store['best']:.2f} s", store["rows"] / store["best"], None,
                      per_100k / TARGETS["store_load_seconds"], "x target time", "<= 2 s / 100k",
                      "PASS" if per_100k <= TARGETS["store_load_seconds"] else "MISS")]
    compact = report["store_compact"]
    if "seconds" in compact:
        rows.append(table_row("f", f"  a run then adds 32 images: its compact_store takes {compact['seconds']:.2f} s, "
                                   f"peak RSS {compact['peak_rss_bytes'] / 2**20:.0f} MiB"))
    return rows


def fast_decode_rows(report: dict) -> list[dict]:
    """(g) --fast_decode: how far its bottlenecks are from the exact ones, and how much faster it decodes."""
    return [table_row("g", f"--fast_decode, {kind}: max |diff| {measured['max_abs_difference']:.3f}, mean "
                           f"{measured['mean_abs_difference']:.4f} (mean |bottleneck| "
                           f"{measured['mean_abs_bottleneck']:.3f}), min cosine {measured['min_cosine']:.4f}",
                      1 / measured["decode_fast"]["seconds_per_image_1_thread"],
                      1000 * measured["decode_fast"]["seconds_per_image_1_thread"], measured["decode_speedup"],
                      "x decode speedup") for kind, measured in report["draft"].items()]


def memory_rows(report: dict) -> list[dict]:
    """rss: peak memory of the pipeline per kind of image, and the estimate for 10k images."""
    memory = report["memory"]
    real = {kind: m["peak_rss_bytes"] for kind, m in memory.items() if kind != "bookkeeping" and "peak_rss_bytes" in m}
    rows = [table_row("rss", f"peak RSS, pipeline on {memory[kind]['images']} files, {kind}: {peak / 2**20:.0f} MiB "
                             f"({memory[kind]['peak_rss_before_pipeline_bytes'] / 2**20:.0f} MiB before it)")
            for kind, peak in real.items()]
    book = memory["bookkeeping"]
    sizes = sorted(int(n) for n in book if "peak_rss_bytes" in book[n])
    if len(sizes) == 2 and real:
        small, large = (book[str(n)] for n in sizes)
        per_image = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (sizes[1] - sizes[0])
        estimate = max(real.values()) + 10_000 * max(per_image, 0.0)
        rows.append(table_row(
            "rss", f"peak RSS for 10k images (estimate: worst peak above + 10k x {per_image / 1024:.0f} KiB/image, "
                   f"the growth measured on {sizes[0]}..{sizes[1]} tiny images): {estimate / 2**20:.0f} MiB",
            ratio=estimate / TARGETS["rss_10k_bytes"], ratio_of="x target", target="< 2 GB",
            verdict="PASS" if estimate < TARGETS["rss_10k_bytes"] else "MISS"))
    return rows


# Each row of the table: the function that prints it, and the report entry its measurement leaves.
ROW_FUNCTIONS = {"a": (pipeline_rows, "pipeline"), "b": (forward_rows, "forward_onnxruntime"),
                 "c": (flop_limit_rows, "flops"), "d": (torch_rows, "torch"), "e": (training_rows, "training_numpy"),
                 "f": (store_rows, "store_load"), "g": (fast_decode_rows, "draft"), "rss": (memory_rows, "memory")}


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table, row after row, for the rows that were measured (see --rows)."""
    return [line for row in report.get("rows_measured", ROWS) for function, key in [ROW_FUNCTIONS[row]]
            if key in report for line in function(report)]


def format_table(rows: list[dict[str, Any]]) -> str:
    def number(value, digits):
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| row | what | images/s | ms/image | ratio | target | verdict |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f} {row['ratio_of']}".strip()
        lines.append(f"| {row['row']} | {row['what']} | {number(row['images_per_second'], 1)} | "
                     f"{number(row['ms_per_image'], 1)} | {ratio} | {row['target'] or ''} | {row['verdict'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4, help="synthetic images of each large kind (default 4)")
    parser.add_argument("--demo-copies", type=int, default=10,
                        help="byte-distinct copies of the 16 demo X-rays for the pipeline row (default 10 = 160 files)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing; the best is reported")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    parser.add_argument("--train-rows", type=int, default=5000, help="training bottlenecks (default 5000)")
    parser.add_argument("--store-rows", type=int, default=100_000, help="cached bottlenecks to load (default 100k)")
    parser.add_argument("--rss-images", type=int, default=10_000,
                        help="tiny images for the memory growth per image (default 10000, at least 1000)")
    parser.add_argument("--sgemm-size", type=int, default=2048, help="n of the n x n sgemm (default 2048)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows even when torch imports")
    parser.add_argument("--rows", type=lambda text: text.split(","), default=list(ROWS),
                        help=f"comma-separated rows to measure, of {','.join(ROWS)} (default: all; a and b are "
                        "measured together)")
    parser.add_argument("--output", type=Path, help="write every measurement as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        child(arguments.child)
        return 0
    unknown = [row for row in arguments.rows if row not in ROWS]
    if unknown:
        parser.error(f"--rows: no row {', '.join(unknown)}; the rows are {','.join(ROWS)}")
    if arguments.count < 1 or arguments.demo_copies < 1 or arguments.repeats < 1 or arguments.rss_images < 1000:
        parser.error("--count, --demo-copies and --repeats must be >= 1, --rss-images >= 1000 (a smaller slope is noise)")
    report = run(arguments)
    print()
    print(format_table(report["rows"]))
    print(f"\n{report['seconds']:.0f} s; load average {report['load_average']['start']:.2f} at the start, "
          f"{report['load_average']['end']:.2f} at the end")
    for note in report["notes"]:
        print(f"NOTE: {note}")
    if arguments.output:
        arguments.output.write_text(json.dumps(report, indent=1, default=str))
        print(f"Wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
