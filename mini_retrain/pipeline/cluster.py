"""Bottlenecks computed by the workers of a Dask cluster: `--dask_scheduler ADDRESS` (mini_retrain[cluster]).

Creating bottlenecks is the slow step, and every batch of images is independent of the others, so many machines can
share it. We use an existing engine, Dask's distributed scheduler, rather than one of our own. This is the only module
that imports dask, and only when --dask_scheduler is given; training the final layer stays on this machine.

    this machine (the client)                            each Dask worker process
    list, split and hash the images (the cache keys)
    check_scheduler: connect, or one error at once
    every worker can see the backbone and the first  ->  _look_at_files
      image at this machine's paths?
    one task per batch of 32 images not in the cache ->  bottlenecks_of_files: the backbone, loaded once per process
                                                           and kept; per image: SHA-1, read, resize, normalise; then
                                                           the batch through the network
    as each task finishes: check its keys, write its <-  (keys, BadImageErrors, (n_good, D) float32)
      shard, print the progress line (bottlenecks.py)

* Shared storage: the workers open the images and the backbone at the same paths as this machine (a network file
  system, or the same copy on every machine); nothing large travels through the scheduler, only paths out and
  bottlenecks (8 KB per image) back. Before any task, every worker is asked to look at the backbone and the first
  image; a worker that cannot see them is one error naming the worker, the file and the fix. Each worker also hashes
  every file it reads, so a worker that sees another file at the same path is an error, never a wrong bottleneck.
* The cache stays on this machine: the workers return bottlenecks and this process writes the usual shards (atomic,
  resumable, same keys, same folder), one per task as it finishes.
* A task is a batch of 32, as a local run's batches (fewer when there are fewer than 32 images per worker thread, so
  that every thread has work): seconds of work, so the scheduler's fraction of a millisecond per task does not
  count, a killed worker loses at most one batch per thread, and a shard holds up to 32 rows either way.
* Each worker runs onnxruntime on 1 thread: the parallelism is Dask's (`dask worker ADDRESS --nworkers N --nthreads
  1`: N processes, say one per core). A task that raises is retried (RETRIES); the tasks of a worker that dies are
  given to the others by the scheduler. Ctrl-C (or any error) cancels the tasks not yet finished; the shards written
  stay, and the same command resumes.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np

from mini_retrain import __version__
from mini_retrain.build.backbone_build import sidecar_path
from mini_retrain.pipeline.backbone import Backbone, backbone_input, load_backbone, run_backbone
from mini_retrain.pipeline.images import BadImageError, file_sha1, read_image

CONNECT_TIMEOUT_S = 5.0  # an unreachable scheduler is an error after at most this long, before any work
WORKER_WAIT_S = 60.0  # a scheduler without workers: how long to wait for the first one to join
RETRIES = 2  # a task that raises is run again up to twice (a dead worker's tasks are moved by Dask itself)
INSTALL = 'pip install "mini_retrain[cluster]"'


def check_scheduler(address: str) -> None:
    """Fail at once, with one clear ValueError, when no Dask scheduler answers at `address` (or Dask is missing)."""
    connect(address).close()


def connect(address: str):
    """A distributed.Client of the scheduler at `address` (e.g. tcp://10.0.0.5:8786), else a ValueError."""
    try:
        from distributed import Client
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port
    except ImportError:
        raise ValueError(f"--dask_scheduler needs Dask on this machine and on the workers: {INSTALL}") from None
    try:
        protocol, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as error:
        raise ValueError(f"--dask_scheduler {address!r} is not an address like tcp://HOST:8786 ({error})") from None
    if protocol in ("tcp", "tls"):
        # A plain TCP connection first: a refused or silent address is an error now (Client would retry for its
        # whole timeout, and then spend as long again closing itself).
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
            raise ValueError(f"--dask_scheduler {address}: cannot reach a Dask scheduler there ({reason}); start "
                             f"one with `dask scheduler`, or check the address") from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except OSError as error:
        raise ValueError(f"--dask_scheduler {address}: no Dask scheduler answers there ({error}); check the "
                         "address") from None


def compute_on_workers(
    address: str,
    paths: list[Path],
    keys: list[str | None],
    to_compute: list[int],
    batch_size: int,
    backbone: Backbone,
    device: str,
    fast_decode: bool,
    log: Callable[[str], None] = print,
    layers: tuple[str, ...] | None = None,
) -> Iterator[tuple[int, list[int], list[BadImageError | None], np.ndarray]]:
    """paths[to_compute] on the workers, a task per batch; yields (batch number, the batch's indices into paths, each
    image's BadImageError or None, (n_good, D) float32 for the others) as each task finishes, in any order.

    keys: this machine's SHA-1 of each file, which the workers must find too. layers: as run_backbone's (None: the
    bottleneck output). A batch holds batch_size images, or
    fewer when there are fewer than that per worker thread, so that every thread has work (16 images on 2 threads:
    2 tasks of 8). Closing the generator (Ctrl-C, an error) cancels the tasks not yet finished.
    """
    from distributed import KilledWorker, as_completed
    from distributed.comm import CommClosedError

    client = connect(address)
    expected = {i: keys[i] for i in to_compute}  # the caller may change `keys` while tasks run
    pending = {}  # task key -> (batch number, its indices, future): what is still running or queued
    try:
        workers, threads = _check_workers(client, address, backbone, paths[to_compute[0]])
        size = min(batch_size, -(-len(to_compute) // threads))  # ceil(n / threads)
        batches = [to_compute[start:start + size] for start in range(0, len(to_compute), size)]
        log(f"Computing bottlenecks on {workers} Dask worker(s) ({threads} thread(s)) at {address}: "
            f"{len(batches)} task(s) of up to {size} images")
        for number, batch in enumerate(batches):
            future = client.submit(bottlenecks_of_files, [str(paths[i]) for i in batch], str(backbone.path),
                                   backbone.sidecar, device, fast_decode, layers, retries=RETRIES, pure=False)
            pending[future.key] = (number, batch, future)
        for future in as_completed([future for _, _, future in pending.values()], loop=client.loop):
            number, batch, _ = pending.pop(future.key)
            try:
                worker, worker_keys, errors, values = future.result()
            except KilledWorker:
                raise RuntimeError(f"the batch starting with {paths[batch[0]]} killed every worker that ran it "
                                   "(out of memory?); see the workers' logs") from None
            except (CommClosedError, CancelledError) as error:  # the scheduler went away
                raise RuntimeError(f"lost the Dask scheduler at {address} ({type(error).__name__}); the bottlenecks "
                                   "written are kept: run the same command again") from None
            for i, worker_key, error in zip(batch, worker_keys, errors):
                if worker_key is None:
                    raise ValueError(f"Dask worker {worker} cannot read {paths[i]} ({error.reason}), which this "
                                     "machine read: every worker must see the images at the same paths (shared "
                                     "storage)")
                if worker_key != expected[i]:
                    raise ValueError(f"Dask worker {worker} sees another file at {paths[i]} (SHA-1 "
                                     f"{worker_key[:12]}..., here {expected[i][:12]}...): every worker must see the "
                                     "same images (shared storage)")
            yield number, batch, errors, values
    finally:
        try:
            client.cancel([future for _, _, future in pending.values()])
        finally:
            client.close()


def _check_workers(client, address: str, backbone: Backbone, first_image: Path) -> tuple[int, int]:
    """Wait for a worker, then ask every worker whether it sees the backbone and the first image: (workers, threads)."""
    import distributed

    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except distributed.TimeoutError:
        raise ValueError(f"--dask_scheduler {address}: no worker joined in {WORKER_WAIT_S:.0f} s; start some with "
                         f"`dask worker {address} --nworkers N --nthreads 1`") from None
    try:
        answers = client.run(_look_at_files, str(backbone.path), str(first_image))  # {worker address: answer}
    except (ImportError, AttributeError) as error:  # pickled functions are found by module name on the workers
        raise ValueError(f"the Dask workers cannot run mini_retrain ({error}); install the same mini_retrain on "
                         f"every worker: {INSTALL}") from None
    for worker, (version, problem) in sorted(answers.items()):
        if version != __version__:
            raise ValueError(f"Dask worker {worker} has mini_retrain {version}, this machine {__version__}; install "
                             "the same version everywhere")
        if problem:
            raise ValueError(f"Dask worker {worker} {problem}: every worker must see the backbone and the images at "
                             "this machine's paths (shared storage; the default backbone lives in $MINI_RETRAIN_HOME)")
    return len(answers), sum(client.nthreads().values())


def _look_at_files(backbone_path: str, first_image: str) -> tuple[str, str | None]:
    """Runs on each worker before any task: (its mini_retrain version, what it cannot see or None)."""
    for path, what in ((backbone_path, "the backbone"), (sidecar_path(Path(backbone_path)), "the backbone's sidecar"),
                       (first_image, "the first image")):
        if not os.path.isfile(path):
            return __version__, f"cannot see {what} {path}"
    return __version__, None


def bottlenecks_of_files(paths: list[str], backbone_path: str, sidecar: dict, device: str, fast_decode: bool,
                         layers: tuple[str, ...] | None = None
                         ) -> tuple[str, list[str | None], list[BadImageError | None], np.ndarray]:
    """One task, on a worker: the bottlenecks of one batch of image files.

    Returns (this worker, keys, errors, values): for each file its SHA-1 as read here (None when it cannot be read)
    and why it cannot be decoded (a BadImageError, or None); values (n_good, D) float32, one row per file without an
    error, in order: run_backbone's output for `layers` (None: the bottleneck output), in one forward pass.
    The backbone is loaded once per worker process and kept (_backbone_of_this_process); sidecar is the client's, so
    a worker with another file at backbone_path fails instead of computing other numbers.
    """
    from distributed import get_worker

    status = os.stat(backbone_path)
    backbone = _backbone_of_this_process(backbone_path, device, status.st_size, status.st_mtime_ns)
    worker = get_worker().address
    if backbone.sidecar != sidecar:
        raise ValueError(f"Dask worker {worker} has another backbone at {backbone_path} (its sidecar differs from the "
                         "client's): every worker must see the same backbone")
    keys: list[str | None] = []
    errors: list[BadImageError | None] = []
    inputs = []
    for path in paths:
        try:
            keys.append(file_sha1(path))
        except BadImageError as error:  # this worker cannot read it at all
            keys.append(None)
            errors.append(error)
            continue
        try:
            image = read_image(path, fast=fast_decode, keep_gray=True)
            inputs.append(backbone_input(image, backbone.sidecar, fast=fast_decode))  # (3, 299, 299)
            errors.append(None)
        except BadImageError as error:
            errors.append(error)
    if not inputs:
        return worker, keys, errors, np.zeros((0, 0), np.float32)
    return worker, keys, errors, run_backbone(backbone, np.stack(inputs), layers=layers)  # (n_good, D)


@functools.lru_cache(maxsize=2)
def _backbone_of_this_process(path: str, device: str, size: int, mtime_ns: int) -> Backbone:
    """The backbone, loaded once per worker process (a second or two) and kept for its later tasks: a per-process
    cache keyed by path and device, and by size and modification time, so a rebuilt file is loaded again."""
    return load_backbone(path, device, log=lambda line: None, threads=1)
