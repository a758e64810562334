"""The int8 backbone against the float32 one, measured in one run (issue 16, parts 1 and 3).

    python benchmarks/int8.py [--rows options,forward,pipeline,cosine,crossval] [--output results.json]

Rows (benchmarks/README.md, "int8", says how to read them):

    options   the quantisation choices, one at a time from the chosen set (build/quantize.OPTIONS): QDQ or
              QOperator, per-channel or per-tensor weights, 7-bit weights (reduce_range) or 8, uint8 or int8
              weights, symmetric activations, MinMax / Entropy / Percentile calibration, the calibration set, which
              convolutions stay float. Each: cosine of every pooled layer to float32 on held-out X-rays (films the
              calibration never saw) and the forward time, interleaved with float32 on the same batches
    forward   the product's int8 file vs the float32 file on the same images, interleaved A B A B ..., batch 1,
              16 and 32; median and spread of the per-image time and of the ratio
    pipeline  get_bottlenecks (files -> cached bottlenecks, the product's path) at both precisions, fresh caches,
              interleaved
    cosine    pool_3 and every `<block>/avg` at int8 vs float32: the bundled X-rays, kermany-train-400,
              adult-tb-100, the two bundled photos
    crossval  `mini_retrain crossval` on kermany-train-400 at both precisions: pooled AUC and accuracy with their
              intervals, and the paired difference of the AUCs (bootstrap over images, same folds)

Speed on a shared machine is noisy: every ratio comes from the two precisions run alternately in one process, several
rounds, and the JSON keeps every round, the load average and the CPU (lscpu model and flags).
Data: --data (default ../shared/data beside the checkout) for kermany-train-400 and adult-tb-100; rows that need a
missing folder say "skipped".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mini_retrain" / "demo_data"


# ----------------------------------------------------------------------------------------------------------------------
# Machine and images


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "").strip(), "flags": " ".join(flags),
            "vector": " ".join(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f)}


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"cpu": lscpu(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "date": datetime.date.today().isoformat()}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def images_of(folder: Path, every: int = 1) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return files[::every]


def decode(paths: list[Path], sidecar: dict[str, Any]) -> np.ndarray:
    """(n, 3, 299, 299) float32, each file prepared exactly as for bottlenecks."""
    from mini_retrain.pipeline.backbone import backbone_input
    from mini_retrain.pipeline.images import read_image

    return np.stack([backbone_input(read_image(p, keep_gray=True), sidecar) for p in paths])


def session(path_or_bytes):
    import onnxruntime

    from mini_retrain.pipeline.backbone import session_options

    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return onnxruntime.InferenceSession(source, sess_options=session_options(), providers=["CPUExecutionProvider"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) cosine similarity of matching rows."""
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def layer_outputs(sidecar: dict[str, Any]) -> dict[str, str]:
    return {layer: entry["output"] for layer, entry in sidecar["layers"].items()}


def run_layers(sess, x: np.ndarray, outputs: dict[str, str], batch: int = 16) -> dict[str, np.ndarray]:
    names = list(outputs.values())
    parts = [sess.run(names, {"images": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {layer: np.concatenate([p[k] for p in parts]) for k, layer in enumerate(outputs)}


def summary(values) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(values)), 4), "min": round(float(values.min()), 4),
            "max": round(float(values.max()), 4)}


def interleaved(runs: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Seconds of each callable, called in turn A B A B ... for `rounds` rounds (one warm-up call each first)."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


# ----------------------------------------------------------------------------------------------------------------------
# options


def calibration_set(name: str, sidecar: dict[str, Any]) -> list[np.ndarray]:
    """The calibration sets tried: the product's (16 films + mirrored), the 16 films alone, and 16 x 4
    (as is, mirrored, the central 90% crop, and its mirror)."""
    from mini_retrain.pipeline.calibration import CALIBRATION_BATCH, calibration_batches, calibration_files
    from mini_retrain.pipeline.backbone import backbone_input
    from mini_retrain.pipeline.images import read_image

    if name == "16 films + mirrored (32)":
        return calibration_batches(sidecar)
    if name == "16 films":
        return calibration_batches(sidecar, mirrored=False)
    inputs = []
    for path in calibration_files():
        image = read_image(path, keep_gray=True)
        width, height = image.size
        crop = image.crop((width // 20, height // 20, width - width // 20, height - height // 20))
        for version in (image, crop):
            x = backbone_input(version, sidecar)
            inputs += [x, np.ascontiguousarray(x[:, :, ::-1])]
    stacked = np.stack(inputs)
    return [stacked[i:i + CALIBRATION_BATCH] for i in range(0, len(stacked), CALIBRATION_BATCH)]


OPTION_VARIANTS: list[tuple[str, dict[str, Any], str]] = [
    # (label, changes to build/quantize.OPTIONS, calibration set)
    ("chosen (build/quantize.OPTIONS)", {}, "16 films + mirrored (32)"),
    ("QOperator format", {"format": "QOperator"}, "16 films + mirrored (32)"),
    ("per-tensor weights", {"per_channel": False}, "16 films + mirrored (32)"),
    ("8-bit weights (reduce_range off)", {"reduce_range": False}, "16 films + mirrored (32)"),
    ("uint8 weights (u8u8)", {"weights": "uint8", "reduce_range": False}, "16 films + mirrored (32)"),
    ("int8 symmetric activations", {"activations": "int8"}, "16 films + mirrored (32)"),
    ("Entropy calibration", {"calibration": "Entropy"}, "16 films + mirrored (32)"),
    ("Percentile calibration (99.999)", {"calibration": "Percentile"}, "16 films + mirrored (32)"),
    ("calibration: 16 films", {}, "16 films"),
    ("calibration: 16 x 4 (mirror, 90% crop)", {}, "16 x 4"),
    ("first convolution quantised too", {"float_nodes": []}, "16 films + mirrored (32)"),
    ("last block (mixed_10) float too", {"float_nodes": ["conv/conv", "mixed_10."]}, "16 films + mirrored (32)"),
]


def _float_nodes(names: list[str], float_path: Path) -> list[str]:
    """Node names; one ending in "." stands for every convolution whose name starts with it (a whole block)."""
    import onnx

    convolutions = [n.name for n in onnx.load(str(float_path)).graph.node if n.op_type == "Conv"]
    return [c for name in names for c in ([name] if not name.endswith(".") else
                                          [c for c in convolutions if c.startswith(name)])]


def row_options(float_path: Path, data: Path, every: int, rounds: int, only: list[str] | None,
                log) -> dict[str, Any]:
    """Each variant: cosine per pooled layer on held-out films, and its forward time interleaved with float32."""
    from mini_retrain.build.quantize import OPTIONS, quantize_graph
    from mini_retrain.pipeline.backbone import read_sidecar

    sidecar = read_sidecar(float_path)
    folder = data / "kermany-train-400"
    if not folder.is_dir():
        return {"skipped": f"{folder} missing"}
    paths = images_of(folder, every)
    x = decode(paths, sidecar)  # (n, 3, 299, 299)
    outputs = layer_outputs(sidecar)
    fp32 = session(float_path)
    reference = run_layers(fp32, x, outputs)
    batch = x[:16]
    ranges_folder = Path(tempfile.mkdtemp(prefix="int8_ranges_"))
    results = []
    try:
        for label, changes, calibration in OPTION_VARIANTS:
            if only and label not in only:
                continue
            options = {**OPTIONS, **changes}
            options["float_nodes"] = _float_nodes(options["float_nodes"], float_path)
            ranges = ranges_folder / f"{options['calibration']}-{calibration}.json".replace(" ", "_")
            started = time.perf_counter()
            payload = quantize_graph(float_path, calibration_set(calibration, sidecar), sidecar["input_name"],
                                     options, ranges=ranges)
            build_seconds = time.perf_counter() - started
            int8 = session(payload)
            values = run_layers(int8, x, outputs)
            seconds = interleaved({"fp32": lambda: fp32.run(["pool_3"], {"images": batch}),
                                   "int8": lambda: int8.run(["pool_3"], {"images": batch})}, rounds)
            ratios = np.array(seconds["fp32"]) / np.array(seconds["int8"])
            row = {"variant": label, "changes": changes, "calibration_set": calibration,
                   "build_seconds": round(build_seconds, 1), "file_mb": round(len(payload) / 1e6, 1),
                   "cosine": {layer: summary(cosines(reference[layer], values[layer])) for layer in outputs},
                   "int8_ms_per_image": [round(1000 * s / len(batch), 1) for s in seconds["int8"]],
                   "fp32_ms_per_image": [round(1000 * s / len(batch), 1) for s in seconds["fp32"]],
                   "speedup": summary(ratios), "load_average": load_average()}
            results.append(row)
            pool = row["cosine"]["pool_3"]
            log(f"options: {label:42s} pool_3 cosine median {pool['median']:.4f} min {pool['min']:.4f}; "
                f"{row['speedup']['median']:.2f} x float32 ({row['speedup']['min']:.2f}-{row['speedup']['max']:.2f})")
            del int8, payload
    finally:
        shutil.rmtree(ranges_folder, ignore_errors=True)
    return {"held_out_images": len(paths), "folder": str(folder), "every": every, "batch": len(batch),
            "rounds": rounds, "variants": results}


# ----------------------------------------------------------------------------------------------------------------------
# forward, pipeline


def product_backbones(float_path: Path):
    """The product's two backbones, as load_backbone opens them (same session settings)."""
    from mini_retrain.pipeline.backbone import load_backbone

    return {precision: load_backbone(float_path, device="cpu", log=lambda line: None, precision=precision)
            for precision in ("fp32", "int8")}


def row_forward(backbones, rounds: int, log) -> dict[str, Any]:
    """run_backbone on the same tensors, fp32 and int8 alternately, at batch 1, 16 and 32."""
    from mini_retrain.pipeline.backbone import run_backbone

    x = decode(images_of(DEMO / "pneumonia-demo"), backbones["fp32"].sidecar)  # (16, 3, 299, 299)
    results = {}
    for batch in (1, 16, 32):
        inputs = np.concatenate([x, x[:, :, :, ::-1]])[:batch] if batch > len(x) else x[:batch]
        inputs = np.ascontiguousarray(inputs)
        seconds = interleaved({p: (lambda b=b: run_backbone(b, inputs)) for p, b in backbones.items()},
                              rounds if batch > 1 else 4 * rounds)
        ms = {p: np.array(v) * 1000 / batch for p, v in seconds.items()}
        ratios = ms["fp32"] / ms["int8"]
        results[f"batch {batch}"] = {"fp32_ms_per_image": summary(ms["fp32"]), "int8_ms_per_image": summary(ms["int8"]),
                                     "speedup": summary(ratios), "rounds": len(ratios),
                                     "every_round_ms": {p: [round(t, 1) for t in v] for p, v in ms.items()}}
        log(f"forward batch {batch:2d}: fp32 {np.median(ms['fp32']):.1f} ms/image, int8 {np.median(ms['int8']):.1f}; "
            f"{np.median(ratios):.2f} x ({ratios.min():.2f}-{ratios.max():.2f}) over {len(ratios)} rounds")
    return results


def row_pipeline(backbones, copies: int, rounds: int, log) -> dict[str, Any]:
    """get_bottlenecks from image files into a fresh cache, fp32 and int8 alternately: byte-distinct copies of the
    16 demo X-rays (a JPEG comment added), so the content-keyed cache sees new files."""
    from mini_retrain.pipeline.bottlenecks import get_bottlenecks

    with tempfile.TemporaryDirectory(prefix="int8_pipeline_") as scratch:
        folder = Path(scratch)
        files = []
        for source in images_of(DEMO / "pneumonia-demo"):
            data = source.read_bytes()
            for k in range(copies):
                comment = f"copy {k}".encode()
                target = folder / "images" / f"{source.stem}_{k}.jpeg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:])
                files.append(target)
        counter = iter(range(10 ** 6))

        def run(backbone) -> None:
            cache = folder / f"cache-{next(counter)}"
            result = get_bottlenecks(files, backbone, cache, log=lambda line: None)
            assert result.computed == len(files)
            shutil.rmtree(cache)

        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # the progress lines
            seconds = interleaved({p: (lambda b=b: run(b)) for p, b in backbones.items()}, rounds)
    rate = {p: len(files) / np.array(v) for p, v in seconds.items()}
    ratios = rate["int8"] / rate["fp32"]
    log(f"pipeline, {len(files)} demo JPEGs: fp32 {np.median(rate['fp32']):.1f} images/s, int8 "
        f"{np.median(rate['int8']):.1f}; {np.median(ratios):.2f} x ({ratios.min():.2f}-{ratios.max():.2f})")
    return {"files": len(files), "fp32_images_per_s": summary(rate["fp32"]),
            "int8_images_per_s": summary(rate["int8"]), "speedup": summary(ratios), "rounds": rounds}


# ----------------------------------------------------------------------------------------------------------------------
# cosine, crossval


def row_cosine(backbones, data: Path, log) -> dict[str, Any]:
    """Per pooled layer: cosine of int8 to float32 bottlenecks, on each set of images."""
    sidecar = backbones["fp32"].sidecar
    outputs = layer_outputs(sidecar)
    sets = {"bundled X-rays (the calibration films)": images_of(DEMO / "pneumonia-demo"),
            "kermany-train-400": images_of(data / "kermany-train-400"),
            "adult-tb-100": images_of(data / "adult-tb-100"),
            "bundled photos (cat, coffee)": images_of(DEMO / "photos")}
    results = {}
    for name, paths in sets.items():
        if not paths:
            results[name] = {"skipped": "no images"}
            continue
        values = {}
        for precision, backbone in backbones.items():
            parts = []
            for start in range(0, len(paths), 32):
                x = decode(paths[start:start + 32], sidecar)
                parts.append(run_layers(backbone.session, x, outputs))
            values[precision] = {layer: np.concatenate([part[layer] for part in parts]) for layer in outputs}
        results[name] = {"images": len(paths), "cosine": {
            layer: {**summary(c := cosines(values["fp32"][layer], values["int8"][layer])), "mean": round(float(c.mean()), 4)}
            for layer in outputs}}
        pool = results[name]["cosine"]["pool_3"]
        log(f"cosine, {name} ({len(paths)}): pool_3 mean {pool['mean']:.4f}, min {pool['min']:.4f}; worst layer "
            + min(((layer, r["min"]) for layer, r in results[name]["cosine"].items()), key=lambda t: t[1]).__repr__())
    return results


def _bootstrap_auc_difference(scores_a, scores_b, positive, resamples: int = 2000, seed: int = 0):
    """AUC(b) - AUC(a) on the same images, with a 95% percentile interval from resampling the images."""
    from mini_retrain.evaluation.metrics import roc_auc

    rng = np.random.default_rng(seed)
    n = len(positive)
    differences = []
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        if positive[rows].all() or not positive[rows].any():
            continue
        differences.append(roc_auc(scores_b[rows], positive[rows]) - roc_auc(scores_a[rows], positive[rows]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"estimate": round(roc_auc(scores_b, positive) - roc_auc(scores_a, positive), 4),
            "ci": [round(float(low), 4), round(float(high), 4)], "resamples": len(differences)}


def row_crossval(float_path: Path, data: Path, seeds: int, log) -> dict[str, Any]:
    """`mini_retrain crossval` (5 folds) on kermany-train-400 at both precisions, same seeds, so the same folds."""
    from mini_retrain.commands.crossval import crossval
    from mini_retrain.settings import RetrainSettings

    folder = data / "kermany-train-400"
    if not folder.is_dir():
        return {"skipped": f"{folder} missing"}
    results: dict[str, Any] = {"folder": str(folder), "folds": 5, "seeds": []}
    with tempfile.TemporaryDirectory(prefix="int8_crossval_") as scratch:
        for seed in range(seeds):
            runs = {}
            for precision in ("fp32", "int8"):
                settings = RetrainSettings(image_dir=folder, bottleneck_dir=Path(scratch) / "bottlenecks",
                                           backbone=float_path, device="cpu", precision=precision, random_seed=seed)
                runs[precision] = crossval(settings, 5, Path(scratch) / f"{precision}.json", log=lambda line: None)
            pooled = {p: r["pooled"] for p, r in runs.items()}
            positive_label = pooled["fp32"]["positive_label"]
            column = runs["fp32"]["pooled"]["class_names"].index(positive_label)
            files = [row["file"] for row in runs["fp32"]["predictions"]]
            assert files == [row["file"] for row in runs["int8"]["predictions"]]
            truth = np.array([row["true"] == positive_label for row in runs["fp32"]["predictions"]])
            scores = {p: np.array([row["probabilities"][column] for row in r["predictions"]]) for p, r in runs.items()}
            row = {"seed": seed, **{p: {"roc_auc": pooled[p]["roc_auc"], "accuracy": pooled[p]["accuracy"]}
                                    for p in runs},
                   "auc_int8_minus_fp32": _bootstrap_auc_difference(scores["fp32"], scores["int8"], truth),
                   "same_prediction": round(float(np.mean(
                       [a["predicted"] == b["predicted"] for a, b in zip(runs["fp32"]["predictions"],
                                                                          runs["int8"]["predictions"])])), 4)}
            results["seeds"].append(row)
            log(f"crossval seed {seed}: AUC fp32 {row['fp32']['roc_auc']['estimate']:.4f} "
                f"{row['fp32']['roc_auc']['ci']}, int8 {row['int8']['roc_auc']['estimate']:.4f} "
                f"{row['int8']['roc_auc']['ci']}; difference {row['auc_int8_minus_fp32']['estimate']:+.4f} "
                f"{row['auc_int8_minus_fp32']['ci']}; accuracy fp32 {row['fp32']['accuracy']['estimate']:.3f}, "
                f"int8 {row['int8']['accuracy']['estimate']:.3f}; same prediction {row['same_prediction']:.3f}")
    differences = [row["auc_int8_minus_fp32"]["estimate"] for row in results["seeds"]]
    results["mean_auc_difference"] = round(float(np.mean(differences)), 4)
    return results


# ----------------------------------------------------------------------------------------------------------------------


ROWS = ("options", "forward", "pipeline", "cosine", "crossval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--data", type=Path, default=ROOT.parent.parent / "shared" / "data")
    parser.add_argument("--every", type=int, default=5, help="options row: every k-th kermany film (default 80 films)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per timing")
    parser.add_argument("--variants", default=None, help="options row: only these labels (comma-separated)")
    parser.add_argument("--copies", type=int, default=4, help="pipeline row: copies of each demo X-ray (4 = 64 files)")
    parser.add_argument("--seeds", type=int, default=3, help="crossval row: seeds (each: 5 folds at both precisions)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from mini_retrain.build.backbone_build import ensure_backbone

    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s, load {load_average():5.1f}] {line}", flush=True)

    report: dict[str, Any] = {"machine": machine(), "load_average_start": load_average(), "rows": {}}
    log(f"CPU {report['machine']['cpu'].get('model')}; vector flags: {report['machine']['cpu'].get('vector')}")
    float_path = ensure_backbone()
    rows = args.rows.split(",")
    backbones = product_backbones(float_path) if set(rows) & {"forward", "pipeline", "cosine"} else None
    if backbones:
        report["int8_file"] = {"path": str(backbones["int8"].path), "sha256": backbones["int8"].sidecar["onnx_sha256"],
                               "quantization": backbones["int8"].sidecar["quantization"]}
    for row in rows:
        if row == "options":
            only = args.variants.split(",") if args.variants else None
            report["rows"]["options"] = row_options(float_path, args.data, args.every, args.rounds, only, log)
        elif row == "forward":
            report["rows"]["forward"] = row_forward(backbones, args.rounds, log)
        elif row == "pipeline":
            report["rows"]["pipeline"] = row_pipeline(backbones, args.copies, max(2, args.rounds // 2), log)
        elif row == "cosine":
            report["rows"]["cosine"] = row_cosine(backbones, args.data, log)
        elif row == "crossval":
            report["rows"]["crossval"] = row_crossval(float_path, args.data, args.seeds, log)
        else:
            raise SystemExit(f"--rows: unknown row {row!r}; choose from {', '.join(ROWS)}")
        if args.output:
            args.output.write_text(json.dumps(report, indent=2) + "\n")
    report["load_average_end"] = load_average()
    report["seconds"] = round(time.perf_counter() - started)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
