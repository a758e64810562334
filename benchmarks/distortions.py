"""Do distorted copies help, how many, which distortions, and what do they cost? (issue 18)

    python benchmarks/distortions.py --image_dir DIR [--setting NAME:SETTINGS ...] [--copies 3] [--seeds 5]
                                     [--every_step_steps 5] [--timing_only] [--output results.json]

For each distortion setting (distortions.parse_distortions syntax; default: retrain.py's four), the script makes (or
finds in the cache) --copies distorted copies of every film, then runs 5-fold cross-validation (crossval.py: each
fold trains on the films of the other folds and their copies, and predicts its own films undistorted) with the first
N = 0, 1, ..., --copies copies, once per seed 0 .. --seeds - 1 (the seed changes the folds, the initial weights and
the batches; the copies are those of --random_seed 0, as `crossval` makes them). Per row it reports the mean over
seeds of the pooled accuracy and ROC AUC, the 95% interval of the pooled accuracy (Wilson, seed 0), and the paired
difference from the films alone (N = 0) with its 95% interval:

    d_i = (mean over seeds of: film i right with the setting) - (the same without copies),   i = 1 .. n
    difference = mean(d),  interval = mean(d) +- 1.96 sd(d) / sqrt(n)

(the same folds for both: the seed draws the folds first). Cost: the wall time of making the copies, and of
--every_step_steps steps of retrain.py's way (--distort_every_step: a fresh distortion of a batch of 100 at every
step), extrapolated to 4000 steps. Both measured in this run, on this machine's load (record `lscpu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from mini_retrain.commands.crossval import cross_validate
from mini_retrain.commands.retrain import _distorted_bottlenecks
from mini_retrain.evaluation.metrics import wilson_interval
from mini_retrain.paths import cache_dir
from mini_retrain.pipeline.dataset import load_dataset
from mini_retrain.pipeline.distorted_copies import distorted_copies_of
from mini_retrain.pipeline.distortions import parse_distortions
from mini_retrain.settings import RetrainSettings

RETRAIN_PY = "retrain_py:flip_left_right,random_crop=10,random_scale=10,random_brightness=10"


def crossval_runs(dataset, copies, seeds: int) -> dict:
    """Cross-validate once per seed; per-film correctness (seeds, n), pooled accuracy and AUC per seed."""
    correct, accuracies, aucs = [], [], []
    for seed in range(seeds):
        result = cross_validate(dataset, 5, np.random.default_rng(seed), log=lambda line: None, copies=copies)
        correct.append([row["predicted"] == row["true"] for row in result["predictions"]])
        accuracies.append(result["pooled"]["accuracy"]["estimate"])
        aucs.append(result["pooled"]["roc_auc"]["estimate"])
    return {"correct": np.array(correct, dtype=float), "accuracy": accuracies, "auc": aucs}


def summary(name: str, copies: int, runs: dict, base: dict) -> dict:
    n = runs["correct"].shape[1]
    successes = int(runs["correct"][0].sum())
    d = runs["correct"].mean(axis=0) - base["correct"].mean(axis=0)  # (n,) paired per film
    half = 1.96 * d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return {"setting": name, "copies": copies, "accuracy_mean": float(np.mean(runs["accuracy"])),
            "accuracy_per_seed": runs["accuracy"], "accuracy_ci_seed0": list(wilson_interval(successes, n)),
            "auc_mean": float(np.mean(runs["auc"])), "auc_per_seed": runs["auc"],
            "difference": float(d.mean()), "difference_ci": [float(d.mean() - half), float(d.mean() + half)]}


def line(row: dict) -> str:
    low, high = row["accuracy_ci_seed0"]
    dlow, dhigh = row["difference_ci"]
    return (f"{row['setting']:<44} N={row['copies']}  accuracy {100 * row['accuracy_mean']:5.1f}% "
            f"(seed 0 CI {100 * low:.1f}-{100 * high:.1f})  AUC {row['auc_mean']:.4f}  "
            f"vs films alone {100 * row['difference']:+.2f} points ({100 * dlow:+.2f} to {100 * dhigh:+.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", type=Path, required=True)
    parser.add_argument("--setting", nargs="+", default=[RETRAIN_PY], help="[NAME:]SETTINGS, as sweep --distortions")
    parser.add_argument("--copies", type=int, default=3, help="copies per film; rows for N = 1 .. this")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--every_step_steps", type=int, default=0, help="time this many per-step steps (0: skip)")
    parser.add_argument("--timing_only", action="store_true", help="make the copies and time; no cross-validation")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    settings = RetrainSettings(image_dir=args.image_dir, validation_percentage=0.0, testing_percentage=0.0,
                               device="cpu")
    dataset = load_dataset(settings, print)
    bottleneck_dir = cache_dir() / "bottlenecks"
    every = np.arange(len(dataset.files))
    record: dict = {"machine": {"processor": platform.processor(), "cpus": os.cpu_count(),
                                "load_average": os.getloadavg()}, "image_dir": str(args.image_dir),
                    "seeds": args.seeds, "rows": [], "timing": []}
    started = time.perf_counter()
    if not args.timing_only:
        base = crossval_runs(dataset, None, args.seeds)
        record["rows"].append(summary("none", 0, base, base))
        print(line(record["rows"][-1]), f"[{time.perf_counter() - started:.0f} s]", flush=True)

    for text in args.setting:
        name, distortions = parse_distortions(text)
        started, cpu_started = time.perf_counter(), time.process_time()
        lines: list[str] = []
        copies = distorted_copies_of(dataset, every, args.copies, 0, bottleneck_dir, distortions, log=lines.append)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        made = int(lines[-1].split(": ")[-1].split(" made now")[0])
        record["timing"].append({"setting": name, "copies_made": made, "wall_s": seconds, "cpu_s": cpu,
                                 "wall_s_per_copy": seconds / made if made else None,
                                 "cpu_s_per_copy": cpu / made if made else None})
        print(lines[-1], f"[{seconds:.0f} s, {cpu:.0f} CPU s]", flush=True)
        for n in range(1, args.copies + 1) if not args.timing_only else ():
            started = time.perf_counter()
            record["rows"].append(summary(name, n, crossval_runs(dataset, copies[:n], args.seeds), base))
            print(line(record["rows"][-1]), f"[{time.perf_counter() - started:.0f} s]", flush=True)
        if args.output:
            args.output.write_text(json.dumps(record, indent=2) + "\n")

    if args.every_step_steps:
        name, distortions = parse_distortions(args.setting[0])
        step_settings = dataclasses.replace(settings, **distortions._asdict(), distort_every_step=True)
        rows = np.flatnonzero(dataset.splits == "training")
        bottlenecks_for = _distorted_bottlenecks(step_settings, dataset.backbone, [dataset.files[r] for r in rows],
                                                 np.random.default_rng(0))
        batches = np.random.default_rng(0).integers(0, len(rows), size=(args.every_step_steps, 100))
        started, cpu_started = time.perf_counter(), time.process_time()
        for batch in batches:
            bottlenecks_for(batch)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        record["timing"].append({"setting": name, "every_step_steps": args.every_step_steps, "wall_s": seconds,
                                 "cpu_s": cpu, "wall_s_per_image": seconds / batches.size,
                                 "cpu_s_per_image": cpu / batches.size,
                                 "extrapolated_4000_steps_h": seconds / args.every_step_steps * 4000 / 3600})
        print(f"--distort_every_step: {args.every_step_steps} steps of 100 in {seconds:.0f} s "
              f"({seconds / batches.size:.3f} s per image, {cpu / batches.size:.3f} CPU s); 4000 steps would take about "
              f"{seconds / args.every_step_steps * 4000 / 3600:.1f} h", flush=True)
    record["machine"]["load_average_end"] = os.getloadavg()
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
