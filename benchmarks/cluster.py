"""Bottlenecks per second on this machine, and on a Dask LocalCluster of 1, 2, ... worker processes (issue 17).

    python benchmarks/cluster.py --image_dir DIR [--count N] [--workers 1,2] [--output results.json]

Each row creates the bottlenecks of the images under DIR (the first N by path) into a fresh cache with bottlenecks.get_bottlenecks, the
product's own function: first here (decode threads + the network on every core), then with --dask_scheduler
pointing at a distributed.LocalCluster on 127.0.0.1 with N worker processes of 1 thread each, as README's "Beyond
one machine" starts them by hand. The workers load the backbone before the clock starts (a one-off 1-2 s per worker
process on a real cluster), so the rows compare steady throughput. Needs mini_retrain[cluster].
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from mini_retrain.pipeline.backbone import load_backbone
from mini_retrain.pipeline.bottlenecks import get_bottlenecks
from mini_retrain.pipeline.images import IMAGE_EXTENSIONS


def load_on_worker(path: str, size: int, mtime_ns: int) -> str:
    """Run on each worker before the clock starts: the backbone is loaded and kept, as for the first task."""
    from mini_retrain.pipeline.cluster import _backbone_of_this_process

    return _backbone_of_this_process(path, "cpu", size, mtime_ns).provider


def timed_run(paths: list[Path], backbone, folder: Path, address: str | None) -> dict:
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the progress lines
        result = get_bottlenecks(paths, backbone, folder, log=lambda line: None, dask_scheduler=address, device="cpu")
    seconds = time.perf_counter() - started
    return {"images": result.computed, "seconds": round(seconds, 2), "images_per_s": round(result.computed / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", type=Path, required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--count", type=int, default=None, help="use the first COUNT images (by path) only")
    parser.add_argument("--workers", default="1,2", help="comma-separated numbers of worker processes")
    parser.add_argument("--output", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    paths = sorted(p for p in args.image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:args.count]
    backbone = load_backbone(device="cpu", verbose=False)
    status = backbone.path.stat()
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    report = {"machine": f"{model}, {os.cpu_count()} cores", "load_average_before": os.getloadavg(),
              "images": len(paths), "rows": []}
    with tempfile.TemporaryDirectory() as scratch:
        row = {"where": "this machine (2 decode threads + onnxruntime on every core)",
               **timed_run(paths, backbone, Path(scratch) / "local", None)}
        print(row, flush=True)
        report["rows"].append(row)
        for workers in [int(n) for n in args.workers.split(",")]:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None, silence_logs=40) as cluster, \
                    Client(cluster.scheduler_address, set_as_default=False) as client:
                client.run(load_on_worker, str(backbone.path), status.st_size, status.st_mtime_ns)
                row = {"where": f"LocalCluster, {workers} worker process(es) x 1 thread",
                       **timed_run(paths, backbone, Path(scratch) / f"cluster-{workers}", cluster.scheduler_address)}
            print(row, flush=True)
            report["rows"].append(row)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
