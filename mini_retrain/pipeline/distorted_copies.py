"""Distorted copies: N distorted versions of each training film, made once and cached like its bottleneck.

retrain.py distorts every training image afresh at every step, so with a distortion on, the backbone runs on every
image of every batch: 4000 steps x 100 images, hours on a laptop. Here each training film gets `--distorted_copies`
N copies instead, each one fixed random distortion, run through the backbone once and cached:

    for each training film f, k = SHA-1 of its file (its content key, as in bottlenecks.py):
        for copy c = 1 .. N:
            rng   = Generator(SeedSequence([random_seed, k read as a number, c]))   its own draw
            x     = distort(pixels of f, rng, distortions)                          distortions.py
            value = backbone(x)                                                     (D,), cached under
            key   = SHA-1 of "d1|k|<the distortion settings>|copy=c|seed=random_seed|layers=<layers>"

    bottleneck_dir/<weights>-<precision>-distorted-<preprocessing>/shard-*.npz   bottlenecks.py's shards: keys (n,),
                                                                                 bottlenecks (n, D)

* A copy's draw depends on the seed, the film's content and the copy number only: not on the order of the files, on
  the other films or on the settings. The same seed gives the same numbers, and two settings make their copies
  from the same random numbers (distortions.py), so they differ only in what the settings change.
* Its key holds everything that changes it. A second run finds every copy; a changed setting (or seed, or layer)
  gives every copy a new key, so all of them are made again; raising N from 1 to 2 makes only copy 2 of each film.
  The backbone and the preprocessing are in the folder name, as for the bottlenecks.
* Made by the bottlenecks' pipeline: batches of 32, decoded and distorted by a thread pool while the backbone runs
  on the previous batch, the progress line with the time left, each batch written as its own shard (atomic), so an
  interrupted run keeps what it finished.

Validation and test films get no copies: the commands ask only for the rows they train on. How training draws from
the films and their copies: core/train.py and docs/algorithm.md, section 11.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mini_retrain.core.checks import check_positive
from mini_retrain.pipeline.backbone import Backbone, run_backbone
from mini_retrain.pipeline.bottlenecks import compact_store, load_store, progress_line, store_folder, write_shard
from mini_retrain.pipeline.distortions import Distortions, check_distortions, describe, distort, read_for_distortion
from mini_retrain.settings import bottleneck_folder

DISTORTION_VERSION = "d1"  # bump when distortions.py changes what a setting does to a film


class DistortedCopies(NamedTuple):
    values: np.ndarray  # (copies, n, D) float32: values[c - 1, i] is copy c of film i
    computed: int  # copies run through the backbone now
    reused: int  # copies found in the cache


def copy_rng(random_seed: int, content_key: str, copy: int) -> np.random.Generator:
    """The random generator of copy `copy` of the film whose SHA-1 is `content_key`."""
    return np.random.default_rng([int(random_seed), int(content_key, 16), int(copy)])


def copy_key(content_key: str, distortions: Distortions, copy: int, random_seed: int, layers: str) -> str:
    """The cache key of one copy: SHA-1 of everything that changes it (40 hex digits, like a film's key)."""
    text = f"{DISTORTION_VERSION}|{content_key}|{describe(distortions)}|copy={copy}|seed={random_seed}|layers={layers}"
    return hashlib.sha1(text.encode()).hexdigest()


def get_distorted_copies(
    paths: list[Path],
    content_keys: list[str],
    backbone: Backbone,
    bottleneck_dir: str | Path,
    distortions: Distortions,
    copies: int,
    random_seed: int = 0,
    fast_decode: bool = False,
    layers: tuple[str, ...] | None = None,
    batch_size: int = 32,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> DistortedCopies:
    """Copies 1 .. `copies` of each film in `paths` (content_keys: their SHA-1, as get_bottlenecks returns them),
    from the cache where possible, else made (and cached) batch by batch: values (copies, n, D).

    layers: the backbone layers of the bottleneck (run_backbone's layers; None = the sidecar's bottleneck output).
    """
    check_distortions(distortions)
    check_positive(copies, "distorted_copies", integer=True)
    if len(paths) != len(content_keys):
        raise ValueError(f"paths ({len(paths)}) and content_keys ({len(content_keys)}) must match")
    size = backbone.sidecar["input_size"][0]
    mean, std = backbone.sidecar["input_mean"], backbone.sidecar["input_std"]
    layer_names = ",".join(layers or (backbone.sidecar["bottleneck_output"],))
    folder = store_folder(bottleneck_dir, backbone, fast_decode, layer="distorted")  # every layer's copies
    index, cached = load_store(folder, log)

    keys = {(i, c): copy_key(content_keys[i], distortions, c, random_seed, layer_names)
            for i in range(len(paths)) for c in range(1, copies + 1)}  # (film, copy) -> key
    first_of_key: dict[str, tuple[int, int]] = {}  # identical files share their copies: make each key once
    to_make = [pair for pair, key in keys.items() if key not in index and first_of_key.setdefault(key, pair) == pair]

    def inputs_of(group: tuple[int, list[int]]) -> list[np.ndarray]:
        """One film, decoded once, distorted once per copy: [(3, size, size) float32, ...]."""
        film, numbers = group
        pixels = read_for_distortion(paths[film], distortions, size, fast_decode).astype(np.float32)
        return [distort(pixels, copy_rng(random_seed, content_keys[film], c), distortions, size, mean, std)
                for c in numbers]

    def groups_of(batch: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
        return [(film, [c for _, c in pairs]) for film, pairs in itertools.groupby(batch, key=lambda pair: pair[0])]

    new_index: dict[str, int] = {}
    new_values: list[np.ndarray] = []
    if to_make:
        started = time.perf_counter()
        progress_line(0, len(to_make), started, title="Creating distorted copies")
        batches = [to_make[start:start + batch_size] for start in range(0, len(to_make), batch_size)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = pool.map(inputs_of, groups_of(batches[0]))
            for number, batch in enumerate(batches):
                inputs = [x for film_inputs in pending for x in film_inputs]  # (batch,) of (3, size, size)
                if number + 1 < len(batches):  # decode and distort the next batch while the backbone runs
                    pending = pool.map(inputs_of, groups_of(batches[number + 1]))
                values = run_backbone(backbone, np.stack(inputs), layers=layers)  # (batch, D)
                batch_keys = [keys[pair] for pair in batch]
                write_shard(folder, batch_keys, values)
                new_index.update((key, len(new_index)) for key in batch_keys)
                new_values.append(values)
                progress_line(sum(len(b) for b in batches[:number + 1]), len(to_make), started,
                              title="Creating distorted copies")
        compact_store(folder, log)

    # Assemble (copies, n, D) from the two sources: what was made now, what the cache had.
    new_table = np.concatenate(new_values) if new_values else np.zeros((0, 0), np.float32)  # (n_new, D)
    width = (new_table if len(new_table) else cached).shape[1] if keys else 0
    values = np.empty((copies, len(paths), width), np.float32)  # (copies, n, D)
    for (film, c), key in keys.items():
        values[c - 1, film] = new_table[new_index[key]] if key in new_index else cached[index[key]]
    return DistortedCopies(values, len(new_index), len(keys) - len(new_index))


def distorted_copies_of(dataset, rows: np.ndarray, settings, distortions: Distortions,
                        log: Callable[[str], None] = print, layers: tuple[str, ...] | None = None) -> np.ndarray:
    """The copies of the films in `rows` of a pipeline.dataset.Dataset, (copies, len(rows), D) for `layers` (default:
    the dataset's), with one log line saying how many were made now and how many came from the cache.

    settings: a RetrainSettings (distorted_copies, random_seed, fast_decode and the bottleneck folder are read)."""
    files = [dataset.image_dir / dataset.files[row] for row in rows]
    folder = bottleneck_folder(settings)
    result = get_distorted_copies(files, [dataset.keys[row] for row in rows], dataset.backbone, folder,
                                  distortions, settings.distorted_copies, settings.random_seed, settings.fast_decode,
                                  layers=layers or dataset.layers, log=log)
    log(f"{result.values.shape[0] * result.values.shape[1]} distorted copies ready ({settings.distorted_copies} of "
        f"each of {len(rows)} training films, {describe(distortions)}): {result.computed} made now, "
        f"{result.reused} from the cache in {folder}")
    return result.values
