"""Where a whole `retrain` holds its memory: the peak resident memory of each step of a real run (issue 16, part 4).

Runs `mini_retrain.commands.retrain.retrain` in this process, exactly as `mini_retrain retrain` does, while a watcher
process reads its VmRSS from /proc/<pid>/status every few milliseconds. The product's own functions are wrapped (only wrapped,
never changed) so each sample is attributed to the step that was running:

    load_backbone | get_bottlenecks (compact_store inside it) | train | fit_ood_model | build_retrained_model |
    write_retrained_graph | the rest

    python benchmarks/memory.py --image_dir DIR [--bottleneck_dir DIR] [--precision fp32] [--stub_network]
                                [--output FILE.json]

--stub_network replaces the network's output by random numbers (the session is loaded but never run), so a cold run
on 10k small files measures how the bottleneck store grows with the number of images in minutes instead of hours;
what the network itself adds (onnxruntime's arena, a constant) is the difference between a real and a stubbed run
on the same few hundred images. Projected peak of a real cold run on N files = stubbed peak on N + that difference.

The process's VmHWM (what `/usr/bin/time -v` reports as "Maximum resident set size") is printed at the end; it
matches the largest sample to within the sampling interval. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _watch(pid: int, step, peaks, running, interval: float) -> None:
    """In a child process: poll the parent's VmRSS (a thread would stall while C++ code holds the GIL)."""
    seen: dict[str, int] = {}
    while running.value:
        try:
            rss = _status_kb("VmRSS", str(pid))
        except OSError:
            break
        name = step.value.decode()
        seen[name] = max(seen.get(name, 0), rss)
        time.sleep(interval)
    peaks.update(seen)


class Sampler:
    """A watcher process that keeps, per step name, the largest VmRSS seen while that step was the innermost one
    running in this process."""

    def __init__(self, interval: float = 0.002):
        import multiprocessing
        import os

        context = multiprocessing.get_context("fork")
        self.manager_peaks = context.Manager().dict()
        self.step = context.Array("c", 64)
        self.running = context.Value("b", 1)
        self.stack = ["start"]
        self._set("start")
        self.process = context.Process(target=_watch, daemon=True,
                                       args=(os.getpid(), self.step, self.manager_peaks, self.running, interval))
        self.process.start()

    def _set(self, name: str) -> None:
        self.step.value = name.encode()[:63]

    def wrap(self, module, name: str, label: str | None = None) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            self.stack.append(label or name)
            self._set(self.stack[-1])
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                self._set(self.stack[-1])

        setattr(module, name, wrapped)

    def stop(self) -> dict:
        self.running.value = 0
        self.process.join()
        return dict(self.manager_peaks)


def lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"model": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", type=Path, required=True)
    parser.add_argument("--bottleneck_dir", type=Path, default=None, help="default: a fresh temporary folder (cold)")
    parser.add_argument("--precision", default=None, help="fp32 or int8 (when this version has --precision)")
    parser.add_argument("--stub_network", action="store_true", help="random numbers instead of running the network")
    parser.add_argument("--output", type=Path, default=None, help="write the peaks as JSON here")
    args = parser.parse_args()

    sampler = Sampler()
    import mini_retrain.commands.retrain as retrain_module
    import mini_retrain.core.train as train_module
    import mini_retrain.evaluation.ood as ood_module
    import mini_retrain.pipeline.bottlenecks as bottlenecks_module
    import mini_retrain.pipeline.dataset as dataset_module
    import mini_retrain.pipeline.export as export_module
    from mini_retrain.settings import RetrainSettings

    sampler.wrap(dataset_module, "load_backbone")
    sampler.wrap(dataset_module, "get_bottlenecks")
    sampler.wrap(bottlenecks_module, "compact_store")
    sampler.wrap(bottlenecks_module, "load_store")
    sampler.wrap(retrain_module, "train_final_layer", "train")
    sampler.wrap(ood_module, "fit_ood_model")
    sampler.wrap(export_module, "build_retrained_model")
    sampler.wrap(export_module, "write_retrained_graph")
    del train_module
    if args.stub_network:
        import numpy as np

        rng = np.random.default_rng(0)

        from mini_retrain.pipeline.backbone import layer_sizes

        def stub(backbone, images, spatial=False, layers=None):
            width = sum(layer_sizes(backbone.sidecar, tuple(layers or ("pool_3",))))  # the layers side by side
            return np.abs(rng.normal(size=(len(images), width))).astype(np.float32)

        bottlenecks_module.run_backbone = stub

    with tempfile.TemporaryDirectory() as scratch:
        bottleneck_dir = args.bottleneck_dir or Path(scratch) / "bottlenecks"
        extra = {"precision": args.precision} if args.precision else {}
        settings = RetrainSettings(image_dir=args.image_dir, bottleneck_dir=bottleneck_dir,
                                   output_graph=Path(scratch) / "g.onnx", output_labels=Path(scratch) / "l.txt",
                                   **extra)
        started = time.perf_counter()
        retrain_module.retrain(settings, log=lambda line: None)
        seconds = time.perf_counter() - started
    peaks = sampler.stop()
    result = {"image_dir": str(args.image_dir), "bottleneck_dir": str(args.bottleneck_dir or "fresh (cold)"),
              "stub_network": args.stub_network, "precision": args.precision or "fp32", "seconds": round(seconds, 1),
              "peak_rss_mb_by_step": {k: round(v / 1024) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])},
              "vm_hwm_mb": round(_status_kb("VmHWM") / 1024), "python": sys.version.split()[0],
              "platform": platform.platform(), "cpu": lscpu()}
    for step, mb in result["peak_rss_mb_by_step"].items():
        print(f"{step:>24}  {mb:6d} MB")
    print(f"{'VmHWM':>24}  {result['vm_hwm_mb']:6d} MB   ({seconds:.1f} s)")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
