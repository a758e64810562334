"""Bottlenecks computed by a Dask cluster (--dask_scheduler, pipeline/cluster.py) against a local run of the same files.

The cluster is a distributed.LocalCluster of 2 worker processes (1 thread each) on 127.0.0.1, started once for this
module and stopped at its end (one test starts its own scheduler and worker with the `dask` command, to kill the
scheduler). Tasks are batches of 1 or 2 images, so that a few small X-rays make many tasks.
Nothing here can hang CI: a watchdog ends the test process (and so its worker processes) past WATCHDOG_S.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.pipeline.backbone import load_backbone
from mini_retrain.pipeline.bottlenecks import get_bottlenecks, store_folder
from tests.conftest import DEMO_DATA, read_shards

distributed = pytest.importorskip("distributed")  # mini_retrain[cluster], part of the test extra

WATCHDOG_S = 900  # the whole module, cluster start and stop included; it takes well under a minute on 2 idle cores
PROGRESS = re.compile(r"^Creating bottlenecks: (\d+)/(\d+)")


@pytest.fixture(scope="module", autouse=True)
def watchdog():
    """Past WATCHDOG_S, print every thread's stack and end the test process: a hang fails CI instead of stalling it.
    The worker processes end with it (each watches its parent)."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes with 1 thread each, on loopback only; stopped (and its processes ended) after the module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def client(cluster):
    """A client of the test's own, to look at the workers (mini_retrain opens and closes its own)."""
    with distributed.Client(cluster.scheduler_address, set_as_default=False, timeout=30) as test_client:
        yield test_client


def small_xrays(folder: Path, count: int, first: int = 0) -> list[Path]:
    """`count` small grey PNGs made from the demo X-rays; image i has pixel i changed, so each is a different file
    (and those of a call with another `first` differ from these)."""
    sources = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + count):
        with Image.open(sources[i % len(sources)]) as source:
            pixels = np.asarray(source.convert("L").resize((160, 160))).copy()  # (160, 160) uint8
        pixels.reshape(-1)[i] ^= 0x80
        paths.append(folder / f"xray_{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def with_bad_files(folder: Path, good: list[Path]) -> list[Path]:
    """The good files with bad ones among them: one that cannot be hashed (a broken link: found on this machine) and
    four that cannot be decoded (found by the workers), two of them identical."""
    text, empty, cut, cut_copy, broken = (folder / name for name in
                                          ("text.png", "empty.png", "cut.jpeg", "cut_copy.jpeg", "broken.png"))
    text.write_text("not an image")
    empty.write_bytes(b"")
    jpeg = io.BytesIO()
    with Image.open(good[0]) as image:
        image.save(jpeg, "JPEG")
    cut.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    cut_copy.write_bytes(cut.read_bytes())
    broken.symlink_to(folder / "missing.png")
    return [good[0], text, good[1], broken, cut, good[2], empty, good[3], cut_copy] + good[4:]


def progress_lines(stderr: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in map(PROGRESS.match, stderr.splitlines()) if m]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_backbone, cluster, client):
    """The same 13 files (9 X-rays, 4 bad) run locally and on the cluster, in batches of 2: each run's Bottlenecks,
    the lines it logged and what it printed to stderr, its cache folder, and how often each worker loaded a backbone."""
    folder = tmp_path_factory.mktemp("cluster")
    paths = with_bad_files(folder, small_xrays(folder / "images", 9))
    results = {}
    for name, address in (("local", None), ("cluster", cluster.scheduler_address)):
        lines: list[str] = []
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            result = get_bottlenecks(paths, real_backbone, folder / name, batch_size=2, log=lines.append,
                                     dask_scheduler=address, device="cpu")
        results[name] = (result, lines, stderr.getvalue(), store_folder(folder / name, real_backbone))
    from mini_retrain.pipeline import cluster as cluster_module

    loads = client.run(lambda: cluster_module._backbone_of_this_process.cache_info().misses)
    return results, loads, paths


def test_the_workers_compute_the_bottlenecks_of_a_local_run(runs, real_backbone):
    """Same rows, keys and cache (max abs difference <= 1e-5), the same progress lines; each worker that ran tasks
    loaded the backbone once; a second run finds everything in the cache."""
    results, loads, paths = runs
    (local, _, local_stderr, local_store), (remote, remote_lines, remote_stderr, remote_store) = \
        results["local"], results["cluster"]
    assert remote.computed == local.computed == 9
    assert remote.kept == local.kept and remote.keys == local.keys
    assert np.abs(remote.values - local.values).max() <= 1e-5
    local_rows, remote_rows = read_shards(local_store), read_shards(remote_store)
    assert sorted(remote_rows) == sorted(local_rows) and len(remote_rows) == 9
    assert max(np.abs(remote_rows[key] - local_rows[key]).max() for key in local_rows) <= 1e-5
    assert len(list(remote_store.glob("shard-*.npz"))) == len(list(local_store.glob("shard-*.npz")))
    assert any(line.startswith("Computing bottlenecks on 2 Dask worker(s) (2 thread(s)) at tcp://127.0.0.1:")
               for line in remote_lines)
    # The same progress line: 0/12 first, 12/12 last, a line per batch (batches may finish in another order).
    local_progress, remote_progress = progress_lines(local_stderr), progress_lines(remote_stderr)
    assert remote_progress[0] == local_progress[0] == (0, 12) and remote_progress[-1] == local_progress[-1] == (12, 12)
    assert len(remote_progress) == len(local_progress) == 7
    assert sorted(loads.values()) in ([1, 1], [0, 1])  # loaded once per worker process, kept for its later tasks
    cached = [paths[i] for i in remote.kept]
    again = get_bottlenecks(cached, real_backbone, remote_store.parent, log=lambda line: None,
                            dask_scheduler=closed_address())
    assert again.computed == 0 and again.keys == remote.keys  # all cached: no scheduler is even asked


def test_bad_images_give_the_lines_of_a_local_run(runs):
    """The same skip lines in the same order, whether the file failed here (hashing) or on a worker (decoding)."""
    results, _, paths = runs
    (local, local_lines, _, _), (remote, remote_lines, _, _) = results["local"], results["cluster"]
    skipped = [line for line in local_lines if line.startswith("Skipping ")]
    assert [line for line in remote_lines if line.startswith("Skipping ")] == skipped
    assert remote.bad == local.bad
    assert [Path(path).name for path, _ in local.bad] == ["broken.png", "text.png", "cut.jpeg", "empty.png",
                                                          "cut_copy.jpeg"]


def closed_address() -> str:
    """A loopback address where nothing listens (a port the system just gave out and took back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_ctrl_c_cancels_the_queued_tasks_and_keeps_what_is_written(tmp_path, tiny_backbone, cluster):
    """Ctrl-C (KeyboardInterrupt) at the progress line of the first finished task: the tasks still queued are
    cancelled, its shard stays, and the next run computes only the rest."""
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    paths = small_xrays(tmp_path / "images", 10)

    def interrupting_stderr(line: str) -> None:
        if (match := PROGRESS.match(line)) and int(match.group(1)) > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stderr(LineStream(interrupting_stderr)):
        get_bottlenecks(paths, backbone, tmp_path / "cache", batch_size=1, log=lambda line: None,
                        dask_scheduler=cluster.scheduler_address, device="cpu")
    deadline = time.monotonic() + 60
    while cluster.scheduler.tasks and time.monotonic() < deadline:  # cancelled tasks leave the scheduler
        time.sleep(0.05)
    assert not cluster.scheduler.tasks
    written = read_shards(store_folder(tmp_path / "cache", backbone))
    assert len(written) == 1  # the first task's image
    with contextlib.redirect_stderr(io.StringIO()):
        rest = get_bottlenecks(paths, backbone, tmp_path / "cache", batch_size=1, log=lambda line: None,
                               dask_scheduler=cluster.scheduler_address, device="cpu")
    assert rest.computed == 10 - len(written) and len(rest.kept) == 10


class LineStream(io.StringIO):
    """A stand-in for sys.stderr that hands each complete line to `on_line`."""

    def __init__(self, on_line):
        super().__init__()
        self.on_line = on_line

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.on_line(line)
        return super().write(text)


def test_an_unreachable_scheduler_is_one_error_before_any_work(tmp_path, tiny_backbone, monkeypatch, capsys):
    """Refused at once; from the flag and from $MINI_RETRAIN_DASK_SCHEDULER: exit code 2, one line naming the address
    and the fix; the backbone is not loaded and no bottleneck is computed."""
    from mini_retrain.pipeline.cluster import CONNECT_TIMEOUT_S, check_scheduler

    small_xrays(tmp_path / "images" / "a", 2)
    small_xrays(tmp_path / "images" / "b", 2, first=2)
    address = closed_address()
    argv = ["retrain", "--image_dir", str(tmp_path / "images"), "--backbone", str(tiny_backbone),
            "--bottleneck_dir", str(tmp_path / "cache"), "--output_graph", str(tmp_path / "graph.onnx"),
            "--output_labels", str(tmp_path / "labels.txt")]
    started = time.monotonic()
    with pytest.raises(ValueError, match="cannot reach a Dask scheduler there"):
        check_scheduler(address)
    assert time.monotonic() - started < CONNECT_TIMEOUT_S  # refused at once, not after the client's retries
    for flag, variable in ((["--dask_scheduler", address], None), ([], address)):
        if variable:
            monkeypatch.setenv("MINI_RETRAIN_DASK_SCHEDULER", variable)
        assert main(argv + flag) == 2
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"mini_retrain: error: --dask_scheduler {address}: cannot reach a Dask scheduler "
                                    "there (Connection refused); start one with `dask scheduler`, or check the address"]
        assert "Backbone" not in out and "Creating bottlenecks" not in err
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("shard-*"))
    assert main(argv + ["--dask_scheduler", "no-port-here"]) == 2
    assert "--dask_scheduler 'no-port-here' is not an address like tcp://HOST:8786" in capsys.readouterr().err


def test_dask_is_not_imported_without_the_flag(tmp_path, tiny_backbone):
    """A whole retrain without --dask_scheduler, in a fresh interpreter: neither dask nor distributed is imported."""
    small_xrays(tmp_path / "images" / "a", 3)
    small_xrays(tmp_path / "images" / "b", 3, first=3)
    code = f"""
import sys
from mini_retrain.cli import main
code = main(["retrain", "--image_dir", {str(tmp_path / "images")!r}, "--backbone", {str(tiny_backbone)!r},
             "--bottleneck_dir", {str(tmp_path / "cache")!r}, "--output_graph", {str(tmp_path / "graph.onnx")!r},
             "--output_labels", {str(tmp_path / "labels.txt")!r}, "--how_many_training_steps", "3",
             "--testing_percentage", "0", "--validation_percentage", "0"])
dask = sorted(name for name in sys.modules if name.split(".")[0] in ("dask", "distributed"))
print("exit", code, "dask modules", dask)
"""
    env = {key: value for key, value in os.environ.items() if key != "MINI_RETRAIN_DASK_SCHEDULER"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.splitlines()[-1] == "exit 0 dask modules []", done.stdout + done.stderr
    assert "Creating bottlenecks: 6/6" in done.stderr  # it did compute them, here


def test_a_worker_that_cannot_see_the_backbone_is_one_error(tmp_path, tiny_backbone, cluster):
    """The workers open the backbone at this machine's path; one that cannot is named before any task runs."""
    loaded = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    elsewhere = tmp_path / "only_here" / "tiny.onnx"  # as if loaded from a folder the workers do not have
    backbone = loaded._replace(path=elsewhere, sidecar={**loaded.sidecar, "onnx_sha256": "0" * 64})
    paths = small_xrays(tmp_path / "images", 2)
    with pytest.raises(ValueError, match=rf"Dask worker tcp://127\.0\.0\.1:\d+ cannot see the backbone "
                                         rf"{re.escape(str(elsewhere))}: every worker must see"):
        with contextlib.redirect_stderr(io.StringIO()):
            get_bottlenecks(paths, backbone, tmp_path / "cache", log=lambda line: None,
                            dask_scheduler=cluster.scheduler_address)


def test_a_worker_that_sees_another_file_is_one_error(tmp_path, tiny_backbone, cluster):
    """Each worker hashes what it reads: a file that differs from the one hashed here stops the run."""
    from mini_retrain.pipeline.cluster import compute_on_workers

    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    paths = small_xrays(tmp_path / "images", 2)
    tasks = compute_on_workers(cluster.scheduler_address, paths, ["0" * 40, "1" * 40], [0, 1], 32, backbone, "cpu",
                               False, log=lambda line: None)
    folder = re.escape(str(paths[0].parent))
    with pytest.raises(ValueError, match=rf"sees another file at {folder}/xray_00[01]\.png \(SHA-1 "):  # either task
        next(tasks)


def test_the_layers_reach_the_workers_and_a_task_error_reaches_this_machine(tmp_path, tiny_backbone, cluster):
    """compute_on_workers(layers=...) runs the workers' backbone on those layers; a task that raises (here: a layer
    the tiny backbone lacks) raises the same error here, after its retries."""
    from mini_retrain.pipeline.cluster import compute_on_workers
    from mini_retrain.pipeline.images import file_sha1

    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    paths = small_xrays(tmp_path / "images", 2)
    keys = [file_sha1(path) for path in paths]
    for layers, width in ((("pool_3",), 4), (None, 4)):
        done = list(compute_on_workers(cluster.scheduler_address, paths, keys, [0, 1], 32, backbone, "cpu", False,
                                       log=lambda line: None, layers=layers))
        assert sorted(i for _, batch, _, _ in done for i in batch) == [0, 1]
        assert all(values.shape == (len(batch), width) for _, batch, _, values in done)
    with pytest.raises(ValueError, match="layers: the backbone has no layer 'mixed_7'"):
        list(compute_on_workers(cluster.scheduler_address, paths, keys, [0, 1], 32, backbone, "cpu", False,
                                log=lambda line: None, layers=("mixed_7",)))


def test_retrain_crossval_and_sweep_run_through_the_cluster(tmp_path, tiny_backbone, cluster, monkeypatch, capsys):
    """The flag reaches the bottlenecks from each command; crossval takes the address from the environment."""
    small_xrays(tmp_path / "images" / "a", 4)
    small_xrays(tmp_path / "images" / "b", 4, first=4)
    common = ["--image_dir", str(tmp_path / "images"), "--backbone", str(tiny_backbone), "--device", "cpu"]
    assert main(["retrain", *common, "--bottleneck_dir", str(tmp_path / "retrain"), "--dask_scheduler",
                 cluster.scheduler_address, "--output_graph", str(tmp_path / "graph.onnx"), "--output_labels",
                 str(tmp_path / "labels.txt"), "--how_many_training_steps", "3"]) == 0
    assert f"Computing bottlenecks on 2 Dask worker(s) (2 thread(s)) at {cluster.scheduler_address}: 2 task(s) of " \
           "up to 4 images" in capsys.readouterr().out  # 8 images, fewer than 32 per thread: 4 each
    assert main(["sweep", *common, "--bottleneck_dir", str(tmp_path / "sweep"), "--dask_scheduler",
                 cluster.scheduler_address, "--how_many_training_steps", "3", "--learning_rates", "0.1",
                 "--class_balancing", "on", "--validation_percentage", "50", "--testing_percentage", "0",
                 "--output_json", str(tmp_path / "sweep.json")]) == 0
    assert "Computing bottlenecks on 2 Dask worker(s) (2 thread(s))" in capsys.readouterr().out
    monkeypatch.setenv("MINI_RETRAIN_DASK_SCHEDULER", cluster.scheduler_address)
    assert main(["crossval", *common, "--bottleneck_dir", str(tmp_path / "crossval"), "--folds", "2",
                 "--how_many_training_steps", "3", "--output_json", str(tmp_path / "crossval.json")]) == 0
    assert "Computing bottlenecks on 2 Dask worker(s) (2 thread(s))" in capsys.readouterr().out


def test_a_worker_killed_mid_run_costs_only_its_tasks(tmp_path, tiny_backbone, cluster, client):
    """100 tasks of 1 image; one worker process is killed (SIGKILL) as soon as the first shard is written. Dask moves
    its tasks to the other worker (and the nanny starts a new process); the cache ends complete and right."""
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    count = 100
    paths = small_xrays(tmp_path / "images", count)
    with contextlib.redirect_stderr(io.StringIO()):
        local = get_bottlenecks(paths, backbone, tmp_path / "local", log=lambda line: None)
    store = store_folder(tmp_path / "cluster", backbone)
    pids = client.run(os.getpid)  # {worker address: process id}
    killed: list[int] = []  # shards written when the worker was killed

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 300
        while not list(store.glob("shard-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(sorted(pids.values())[0], signal.SIGKILL)
        killed.append(len(list(store.glob("shard-*.npz"))))

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    with contextlib.redirect_stderr(io.StringIO()):
        remote = get_bottlenecks(paths, backbone, tmp_path / "cluster", batch_size=1, log=lambda line: None,
                                 dask_scheduler=cluster.scheduler_address, device="cpu")
    killer.join(timeout=10)
    assert killed and 1 <= killed[0] < count  # it died mid-run
    assert remote.computed == count and remote.keys == local.keys
    assert np.abs(remote.values - local.values).max() <= 1e-5
    rows = read_shards(store)
    assert sorted(rows) == sorted(local.keys)


def test_each_worker_process_loads_the_backbone_once_on_one_thread(tiny_backbone):
    from mini_retrain.pipeline.cluster import _backbone_of_this_process

    status = tiny_backbone.stat()
    first = _backbone_of_this_process(str(tiny_backbone), "cpu", status.st_size, status.st_mtime_ns)
    assert _backbone_of_this_process(str(tiny_backbone), "cpu", status.st_size, status.st_mtime_ns) is first
    assert first.session.get_session_options().intra_op_num_threads == 1


def test_a_lost_scheduler_is_one_error_and_keeps_what_is_written(tmp_path, tiny_backbone):
    """A scheduler and a worker started as the README says (`dask scheduler`, `dask worker`), on loopback; the
    scheduler is killed after the first shard: one RuntimeError, the shards written stay."""
    backbone = load_backbone(tiny_backbone, device="cpu", log=lambda line: None)
    paths = small_xrays(tmp_path / "images", 200)
    address = closed_address()
    port = int(address.rsplit(":", 1)[1])
    dask = Path(sys.executable).with_name("dask")
    loopback = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]  # its HTTP server too, not 0.0.0.0:8787
    scheduler = subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), *loopback],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(dask), "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads",
                               "1", "--death-timeout", "60", *loopback], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    store = store_folder(tmp_path / "cache", backbone)

    def kill_the_scheduler() -> None:
        deadline = time.monotonic() + 300
        while not list(store.glob("shard-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.02)
        scheduler.kill()

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the scheduler listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.2)
        threading.Thread(target=kill_the_scheduler, daemon=True).start()
        with pytest.raises(RuntimeError, match=f"lost the Dask scheduler at {address} .*; the bottlenecks written are "
                                               "kept: run the same command again"):
            with contextlib.redirect_stderr(io.StringIO()):
                get_bottlenecks(paths, backbone, tmp_path / "cache", batch_size=1, log=lambda line: None,
                                dask_scheduler=address, device="cpu")
        assert 1 <= len(read_shards(store)) < len(paths)
    finally:
        for process in (scheduler, worker):
            process.terminate()
        for process in (scheduler, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
