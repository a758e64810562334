"""Bottlenecks: each image's pooled backbone layers (pool_3: 2048 numbers), computed once and cached on disk.

retrain.py spends nearly all its time here, so it caches: an image's bottleneck never changes while the image and the
network stay the same. Our cache is keyed the same way, but by content rather than by name, one store per layer:

    bottleneck_dir/<weights>-<precision>-<layer>-<preprocessing>[-fast]/shard-*.npz
        each shard: keys (n,) SHA-1 of the image file, bottlenecks (n, size of the layer) float32

* The folder name says what made the numbers: the network's weights (the sidecar's `weights_sha1`, else the ONNX
  file's hash), their precision (`precision` in the sidecar, fp32 when absent: an int8 backbone gives other numbers),
  the layer (`pool_3`, `mixed_8`, ...: `--bottleneck_layers`), the preprocessing version and --fast_decode. Another
  network, precision, layer or resize gives another folder, so stale numbers are never mixed in; adding outputs to
  the backbone file (which changes its hash but not its numbers) keeps every cache. `pool_3,mixed_8` reuses what
  `pool_3` alone computed, and one forward pass computes every layer still missing.
* The key is the SHA-1 of the image file's bytes: an edited image gets a new key and is recomputed; a moved or
  renamed image is found again; identical files share one entry (and are reported as duplicates by the caller).
* Each batch is written as its own shard, to a temporary file renamed into place (atomic). A run killed half-way
  keeps every finished batch; the next run computes only what is missing. A shard that does not load (damaged
  disk, hand-edited file) is set aside with a warning and its images are recomputed.
* When a run has added shards, they are merged into one, so that loading 100k cached bottlenecks is one file read.

Decoding large X-rays can cost as much as the network, so images are decoded by a small thread pool (Pillow releases
the GIL) while the backbone runs on the previous batch. With a Dask scheduler (--dask_scheduler), the workers of the
cluster compute the batches instead (pipeline/cluster.py); the cache, the keys and the lines printed are the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mini_retrain.paths import write_file_atomically
from mini_retrain.pipeline.backbone import DEFAULT_LAYER, Backbone, backbone_input, layer_sizes, run_backbone, split_layers
from mini_retrain.pipeline.images import BadImageError, file_sha1, read_image

PREPROCESSING_VERSION = "p1"  # bump when images.py changes what pixels reach the network (or the graph its numbers)
BATCH_SIZE = 32  # images per network run (benchmarks/benchmark.py measures the pipeline at this batch size)
DECODE_WORKERS = 2  # threads that decode (and hash) the next images while the network runs


class Bottlenecks(NamedTuple):
    """The result for a list of image paths: rows for the usable images, and what happened to the others."""

    values: np.ndarray  # (n_kept, D) float32: the layers asked for, side by side (D = the sum of their sizes)
    kept: list[int]  # indices into the requested paths, one per row of `values`
    keys: list[str]  # SHA-1 of each kept image file (equal keys = identical files)
    bad: list[tuple[str, str]]  # (path, reason) of each skipped image
    computed: int  # how many were run through the backbone now (the rest came from the cache)


def store_folder(bottleneck_dir: str | Path, backbone: Backbone, fast_decode: bool = False,
                 layer: str | None = None) -> Path:
    """bottleneck_dir/<weights>-<precision>-<layer>-<preprocessing version>[-fast], the store of one layer
    (default: pool_3, the sidecar's bottleneck_output). --fast_decode's slightly different pixels give slightly
    different bottlenecks, so they are kept apart from the exact ones."""
    sidecar = backbone.sidecar
    weights = sidecar.get("weights_sha1") or sidecar.get("onnx_sha256") or file_sha1(backbone.path)
    precision = sidecar.get("precision", "fp32")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", layer or DEFAULT_LAYER)  # a layer name as a folder name
    return Path(bottleneck_dir) / f"{weights[:16]}-{precision}-{name}-{PREPROCESSING_VERSION}{'-fast' if fast_decode else ''}"


def load_store(folder: Path, log: Callable[[str], None] = print,
               shards: list[Path] | None = None) -> tuple[dict[str, int], np.ndarray]:
    """Read every shard (or the given ones): ({key: row}, (n, D) float32). Damaged shards are renamed *.corrupt and
    skipped. A key found in two shards (two runs that computed the same image at once) keeps its first row."""
    index: dict[str, int] = {}
    parts: list[np.ndarray] = []
    rows = 0
    for shard in sorted(folder.glob("shard-*.npz")) if shards is None else shards:
        try:
            with np.load(shard, allow_pickle=False) as arrays:
                keys, values = arrays["keys"], arrays["bottlenecks"]
            if values.ndim != 2 or len(keys) != len(values) or not np.isfinite(values).all():
                raise ValueError("inconsistent arrays")
        except FileNotFoundError:
            continue  # another run sharing this cache merged it away meanwhile; its rows are in the merged shard
        except Exception as error:
            # A damaged zip raises many types (BadZipFile; NotImplementedError for a garbled compression method;
            # RuntimeError for a garbled "encrypted" flag; ...). All mean the same: do not trust this file.
            reason = " ".join(str(error).split()) or type(error).__name__
            log(f"WARNING: bottleneck cache file {shard} is damaged ({reason}); its images will be recomputed")
            try:
                os.replace(shard, shard.with_suffix(".corrupt"))  # kept for a look, never read again
            except OSError:
                pass  # a read-only cache: the shard is skipped again next time
            continue
        for offset, key in enumerate(keys.tolist()):
            index.setdefault(key, rows + offset)
        parts.append(values.astype(np.float32, copy=False))
        rows += len(values)
    if not parts:
        return {}, np.zeros((0, 0), np.float32)
    return index, np.concatenate(parts) if len(parts) > 1 else parts[0]


def write_shard(folder: Path, keys: list[str], values: np.ndarray) -> Path:
    """Write one shard atomically (temporary file in the same folder, then rename), straight to the file: no copy
    of the values in memory (a merged store of 10k images is 80 MB)."""
    name = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.npz"
    return write_file_atomically(folder / name, lambda file: np.savez(
        file, keys=np.array(keys, dtype="<U40"), bottlenecks=np.asarray(values, np.float32)))


def compact_store(folder: Path, log: Callable[[str], None] = print) -> None:
    """Merge the small shards a run wrote into one; rewrite the big one only once the rest outgrow it.

    The largest shard is the store built by earlier runs (100k images: 800 MB). Rewriting it to add one batch of 32
    would cost seconds and twice its size in memory, so only the other shards are merged, unless together they are
    larger than it: then everything is merged. So a run leaves at most two shards, and each bottleneck is rewritten
    only when the store has doubled since it was last written (O(log n) times in all).
    The merged shard is written before the old ones are removed, so a crash loses nothing.
    """
    sizes: dict[Path, int] = {}
    for shard in folder.glob("shard-*.npz"):
        try:
            sizes[shard] = shard.stat().st_size
        except FileNotFoundError:
            pass  # another run sharing this cache merged it away meanwhile
    shards = sorted(sizes, key=sizes.__getitem__)  # smallest first
    largest, rest = shards[-1:], shards[:-1]
    if sum(sizes[shard] for shard in rest) > sum(sizes[shard] for shard in largest):
        rest = shards
    if len(rest) < 2:
        return
    index, values = load_store(folder, log, rest)
    keys = sorted(index, key=index.get)  # in row order: values already holds one row per key, in this order
    merged = write_shard(folder, keys, values if len(keys) == len(values) else values[[index[k] for k in keys]])
    for shard in rest:
        if shard != merged:
            shard.unlink(missing_ok=True)


def _content_key(path: Path) -> str:
    """The cache key: SHA-1 of the file's bytes. Only regular files are read: a pipe named like an image would block
    the hash forever, and a link to a device such as /dev/zero would never end."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = True  # missing, broken link, no permission: file_sha1 names the problem
    if not regular:
        raise BadImageError(path, "not a regular file", "pass an image file")
    return file_sha1(path)


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress_line(done: int, total: int, started: float, stream=None, title: str = "Creating bottlenecks") -> None:
    """0/total first, then a line per finished batch (already cached when printed); on a terminal, one line redrawn."""
    stream = stream or sys.stderr  # looked up now, so a redirected sys.stderr receives it
    line = f"{title}: {done}/{total}"
    if done:
        rate = done / max(time.perf_counter() - started, 1e-9)
        line += f" ({rate:.1f} images/s, about {(total - done) / rate:.0f} s left)"
    if stream.isatty():
        print(f"\r{line}", end="\n" if done == total else "", file=stream, flush=True)
    else:  # a log file or a pipe: every line is kept, so a killed run's log shows how far it got
        print(line, file=stream, flush=True)


def _compute_here(paths: list[Path], to_compute: list[int], batch_size: int, backbone: Backbone, fast_decode: bool,
                  workers: int, layers: tuple[str, ...] | None = None
                  ) -> Iterator[tuple[int, list[int], list[BadImageError | None], np.ndarray]]:
    """paths[to_compute] on this machine, batch by batch: `workers` threads decode the next batch while the backbone
    runs on this one. Yields (batch number, the batch's indices into paths, each image's BadImageError or None,
    (n_good, D) float32 for the others)."""

    def decode(i: int) -> np.ndarray | BadImageError:
        try:
            image = read_image(paths[i], fast=fast_decode, keep_gray=True)
            return backbone_input(image, backbone.sidecar, fast=fast_decode)
        except BadImageError as error:
            return error

    batches = list(_batches(to_compute, batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # pool.map decodes ahead (all queued at once would hold every image in memory, so go batch by batch,
        # submitting the next batch before running the network on this one).
        pending = pool.map(decode, batches[0])
        for number, batch in enumerate(batches):
            decoded = list(pending)
            if number + 1 < len(batches):
                pending = pool.map(decode, batches[number + 1])
            errors = [x if isinstance(x, BadImageError) else None for x in decoded]
            good = [x for x in decoded if not isinstance(x, BadImageError)]
            values = (run_backbone(backbone, np.stack(good), layers=layers) if good
                      else np.zeros((0, 0), np.float32))  # (n_good, D)
            yield number, batch, errors, values


def get_bottlenecks(
    paths: list[Path],
    backbone: Backbone,
    bottleneck_dir: str | Path,
    on_bad_image: str = "skip",
    batch_size: int = BATCH_SIZE,
    workers: int = DECODE_WORKERS,
    log: Callable[[str], None] = print,
    fast_decode: bool = False,
    layers: tuple[str, ...] | None = None,
    dask_scheduler: str | None = None,
    device: str = "auto",
) -> Bottlenecks:
    """Bottlenecks for `paths`, from the cache where possible, else computed (and cached) batch by batch.

    layers: the pooled backbone layers, side by side in this order (default: the bottleneck, pool_3). Each layer has
    its own store; an image missing from some of them goes through the backbone once, for all its missing layers.
    on_bad_image: "skip" prints one line per unusable file and leaves it out; "error" raises BadImageError.
    fast_decode: JPEG draft and Image.reduce before the resize (images.read_image / resize_for_backbone, fast=True).
    dask_scheduler: the address of a Dask scheduler whose workers compute the missing bottlenecks, one task per batch,
    on `device` (pipeline/cluster.py); the cache, the progress line and the skip lines are the same as here.
    """
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', not {on_bad_image!r}")
    layers = tuple(layers or (DEFAULT_LAYER,))
    sizes = layer_sizes(backbone.sidecar, layers, "bottleneck_layers")  # checks the names before any work
    folders = {layer: store_folder(bottleneck_dir, backbone, fast_decode, layer) for layer in layers}
    stores = {layer: load_store(folders[layer], log) for layer in layers}  # layer -> ({key: row}, (n, size))
    bad: list[tuple[str, str]] = []

    def skip(path: Path, error: BadImageError) -> None:
        if on_bad_image == "error":
            raise error
        log(f"Skipping {path}: {error.reason} ({error.fix})")
        bad.append((str(path), error.reason))

    def key_of(path: Path) -> str | BadImageError:
        try:
            return _content_key(path)
        except BadImageError as error:
            return error

    # Hashing every file is most of a run that finds everything cached. File reads and hashlib release the GIL, so
    # `workers` threads hash side by side. If a bad file stops the run (--on_bad_image error), the rest are cancelled.
    keys: list[str | None] = []
    hashers = ThreadPoolExecutor(max_workers=workers)
    try:
        for path, key in zip(paths, hashers.map(key_of, paths)):
            if isinstance(key, BadImageError):
                skip(path, key)
                key = None
            keys.append(key)
    finally:
        hashers.shutdown(cancel_futures=True)

    def cached(layer: str, key: str) -> bool:
        return key in stores[layer][0]

    missing = [i for i, key in enumerate(keys) if key is not None and not all(cached(layer, key) for layer in layers)]
    # Identical files need computing only once.
    first_of_key: dict[str, int] = {}
    to_compute = [i for i in missing if first_of_key.setdefault(keys[i], i) == i]
    needed = tuple(layer for layer in layers if any(not cached(layer, keys[i]) for i in to_compute))  # one forward

    new_keys: dict[str, list[str]] = {layer: [] for layer in needed}
    new_values: dict[str, list[np.ndarray]] = {layer: [] for layer in needed}
    failed: dict[str, BadImageError] = {}  # key -> why it could not be decoded
    if to_compute:
        started = time.perf_counter()
        done = 0
        progress_line(done, len(to_compute), started)
        if dask_scheduler:  # the workers of a Dask cluster compute them (pipeline/cluster.py: dask is imported here)
            from mini_retrain.pipeline.cluster import compute_on_workers

            results = compute_on_workers(dask_scheduler, paths, keys, to_compute, batch_size, backbone, device,
                                         fast_decode, log, layers=needed)
        else:
            results = _compute_here(paths, to_compute, batch_size, backbone, fast_decode, workers, needed)
        told_of: dict[int, list[tuple[int, BadImageError]]] = {}  # finished batches whose bad images are not told yet
        told = 0  # batches finish in any order on a cluster; their skip lines are told in the order of the paths
        with contextlib.closing(results):  # on Ctrl-C or an error: stop the decoding threads, cancel the tasks
            for number, batch, errors, values in results:  # values: (n_good, D) of the needed layers side by side
                good = [i for i, error in zip(batch, errors) if error is None]
                for layer, layer_values in split_layers(values, backbone.sidecar, needed).items():
                    rows = [row for row, i in enumerate(good) if not cached(layer, keys[i])]
                    if rows:
                        batch_keys = [keys[good[row]] for row in rows]
                        block = np.ascontiguousarray(layer_values[rows])  # (rows, size of the layer)
                        write_shard(folders[layer], batch_keys, block)
                        new_keys[layer].extend(batch_keys)
                        new_values[layer].append(block)
                told_of[number] = [(i, error) for i, error in zip(batch, errors) if error is not None]
                while told in told_of:
                    for i, error in told_of.pop(told):
                        skip(paths[i], error)
                        failed[keys[i]] = error
                        keys[i] = None
                    told += 1
                done += len(batch)
                progress_line(done, len(to_compute), started)
        for layer in needed:
            if new_keys[layer]:
                compact_store(folders[layer], log)

    for i, key in enumerate(keys):
        if key in failed:  # an identical copy of a file that failed to decode
            skip(paths[i], failed[key])
            keys[i] = None

    # Assemble rows in the order of `paths`, layer by layer, straight from the two sources (no third copy of all).
    kept = [i for i, key in enumerate(keys) if key is not None]
    values = np.empty((len(kept), sum(sizes)), np.float32)  # (n_kept, D)
    start = 0
    for layer, size in zip(layers, sizes):
        index, table = stores[layer]
        new_index = {key: row for row, key in enumerate(new_keys.get(layer, []))}
        new_table = np.concatenate(new_values[layer]) if new_index else np.zeros((0, size), np.float32)
        from_new = [(row, new_index[keys[i]]) for row, i in enumerate(kept) if keys[i] in new_index]
        from_cache = [(row, index[keys[i]]) for row, i in enumerate(kept) if keys[i] not in new_index]
        for rows, source_table in ((from_new, new_table), (from_cache, table)):
            if rows:
                destination, source = zip(*rows)
                values[list(destination), start:start + size] = source_table[list(source)]
        start += size
    computed = len({key for layer in needed for key in new_keys[layer]})
    return Bottlenecks(values, kept, [keys[i] for i in kept], bad, computed)
