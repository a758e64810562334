"""label's throughput: the batched path (retrained_graph.predict_images) against one image at a time, in one run.

    python benchmarks/label_throughput.py --graph retrained_graph.onnx --image FOLDER [--rounds 2] [--output FILE]

"one at a time" is the loop `label` ran before the batched path: decode an image, run the graph on a batch of one,
next image. "batched" is what it runs now: 32 images per graph call while 2 threads decode the next 32. The rounds
alternate (one at a time, batched, one at a time, ...) on the same files, so a busy machine disturbs both alike; the
best round of each is reported, every round is in the JSON. The OS page cache holds the files after the first read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from mini_retrain.pipeline.retrained_graph import image_paths, load_retrained, model_input, predict_images


def one_at_a_time(model, paths: list[Path]) -> int:
    outputs = [model.metadata["final_tensor_name"], "ood_distance"]
    for path in paths:
        model.session.run(outputs, {model.metadata["input_name"]: model_input(model, path)[None]})  # (1, 3, H, W)
    return len(paths)


def batched(model, paths: list[Path]) -> int:
    return sum(1 for _ in predict_images(model, paths))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", type=Path, required=True)
    parser.add_argument("--image", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    arguments = parser.parse_args()
    model = load_retrained(arguments.graph, device="cpu")
    paths = image_paths(arguments.image)
    rounds: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
    for _ in range(arguments.rounds):
        for name, function in (("one_at_a_time", one_at_a_time), ("batched", batched)):
            started = time.perf_counter()
            count = function(model, paths)
            rounds[name].append(count / (time.perf_counter() - started))
            print(f"{name}: {rounds[name][-1]:.2f} images/s ({count} images)", flush=True)
    best = {name: max(rates) for name, rates in rounds.items()}
    report = {"images": len(paths), "best_images_per_s": best, "rounds_images_per_s": rounds,
              "speedup": best["batched"] / best["one_at_a_time"], "cpu": cpu_model(), "cores": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    print(f"batched {best['batched']:.2f} vs one at a time {best['one_at_a_time']:.2f} images/s "
          f"({report['speedup']:.2f} x) on {len(paths)} images, {report['cpu']}, load {report['load_average']:.1f}")
    if arguments.output:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
