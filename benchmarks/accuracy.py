"""What each step of the recipe buys, measured (issue 13, part 3). docs/accuracy.md is written from its output.

    python benchmarks/accuracy.py --kermany DIR [--demo DIR] [--seeds 10] [--output results/accuracy.json]

--kermany: kermany-train-400 (200 normal + 200 pneumonia films of Kermany's training split, 224x224 copies, 267
children); --demo: pneumonia-demo (the 16 films of Kermany's "val" split, full size). Bottlenecks come from the
product's cache (pipeline.dataset.load_dataset), each layer is trained by core.train.train_layer with retrain.py's
defaults (4000 steps, learning rate 0.01, batches of 100, class first) and recalibrated by
core.recalibrate.fit_recalibration with its defaults. No number is chosen by looking at scored films: every setting
is the product's default, fixed before the run; l2 is varied only afterwards, to show how much it matters.

    A  pool_3, 5-fold cross-validation grouped by child (all of a child's films in one fold), once per seed; and
       4-fold on the 16 demo films
    B  a simulated site: the held-out fold of A is the "site"; 20 + 20 of its films (whole children, so a child is
       never both fitted and scored) recalibrate the fold's model, the rest of the fold is scored before and after
    C  kermany-train-400 -> pneumonia-demo: trained on all 400, scored on the 16 demo films; recalibrated
       leave-one-out (fit on 15, score the 16th), as 8 + 8 films are too few to set any aside
    D  pneumonia-demo -> kermany-train-400: trained on the 16 demo films, recalibrated on 20 + 20 of the 400 (whole
       children), scored on the rest

Intervals: 95% percentile bootstrap over children (the unit that is independent), 1000 resamples; inside each the
figure is averaged over the seeds, so the interval is for the procedure (folds, training and calibration draws
averaged), not for one lucky draw. The per-seed range is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

import mini_retrain
from mini_retrain.commands.crossval import assign_folds
from mini_retrain.core.recalibrate import L2, fit_recalibration, recalibrated_logits
from mini_retrain.core.softmax_layer import compute_logits, softmax
from mini_retrain.core.train import train_layer
from mini_retrain.evaluation.metrics import calibration, roc_auc
from mini_retrain.pipeline.dataset import load_dataset
from mini_retrain.settings import RetrainSettings

CALIBRATION_PER_CLASS = 20  # the 20 + 20 films of the new site
FOLDS = 5
BOOTSTRAP = 1000
POSITIVE = 1  # "pneumonia" (labels are sorted: normal, pneumonia)


def child_of(file: str) -> str:
    """The child a Kermany film belongs to: person1004_bacteria_2935.jpeg -> person1004; IM-0115-0001.jpeg -> IM-0115;
    NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427. Anything else is its own child."""
    name = Path(file).name
    match = re.match(r"(person\d+)_", name) or re.match(r"((?:NORMAL2-)?IM-\d+)-", name)
    return match.group(1) if match else name


def load(image_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(bottlenecks (n, D), classes (n,), child of each (n,), labels) of every film, from the bottleneck cache.

    TODO(issue 13 part 1): take the bottleneck layers (pool_3, mixed_8, ...) once --bottleneck_layers exists."""
    settings = RetrainSettings(image_dir=image_dir, validation_percentage=0.0, testing_percentage=0.0)
    dataset = load_dataset(settings, log=lambda line: print(line, file=sys.stderr))
    children = np.array([f"{dataset.labels[c]}/{child_of(f)}" for f, c in zip(dataset.files, dataset.class_indices)])
    return dataset.bottlenecks, dataset.class_indices, children, dataset.labels


def figures(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """accuracy, sensitivity, specificity, ROC AUC, ECE and mean cross-entropy (nll) of two-class logits (n, 2)."""
    probabilities = softmax(logits)  # (n, 2)
    predicted = probabilities.argmax(axis=1)  # (n,)
    log_probabilities = logits - np.logaddexp(logits[:, 0], logits[:, 1])[:, None]  # (n, 2) log softmax
    return {"accuracy": float(np.mean(predicted == y)),
            "sensitivity": float(np.mean(predicted[y == POSITIVE] == POSITIVE)),
            "specificity": float(np.mean(predicted[y != POSITIVE] != POSITIVE)),
            "auc": roc_auc(probabilities[:, POSITIVE], y == POSITIVE),
            "ece": calibration(probabilities, y)[0],
            "nll": float(-np.mean(log_probabilities[np.arange(len(y)), y]))}


def calibration_films(candidates: np.ndarray, y: np.ndarray, children: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (n,): whole children among `candidates`, drawn in random order per class until the class has
    CALIBRATION_PER_CLASS films (a child with several films can take it a little past)."""
    chosen = np.zeros(len(y), bool)
    for c in (0, 1):
        pool = candidates & (y == c)
        for child in rng.permutation(np.unique(children[pool])):
            if np.sum(chosen & (y == c)) >= CALIBRATION_PER_CLASS:
                break
            chosen |= pool & (children == child)
    return chosen


def recalibrate(logits: np.ndarray, y: np.ndarray, fit_rows: np.ndarray, l2: float = L2) -> tuple[np.ndarray, dict]:
    """The logits of every row after a fit on `fit_rows` (mask), and the fitted numbers."""
    fitted = fit_recalibration(logits[fit_rows], y[fit_rows], l2=l2)
    return recalibrated_logits(logits, fitted.scale, fitted.bias), {
        "scale": float(fitted.scale[0]), "bias": float(fitted.bias[1]), "steps": fitted.steps}


def seed_figures(run: dict, rows: np.ndarray) -> dict[str, float]:
    """One seed's figures on its scored films among `rows` (indices, repeats allowed), before, after and the gains.

    run: "before" and (optionally) "after" logits (n, 2), "scored" (n,) mask, "y" (n,)."""
    kept = rows[run["scored"][rows]]
    out = {}
    for stage in ("before", "after"):
        if stage in run:
            out.update({f"{stage}_{k}": v for k, v in figures(run[stage][kept], run["y"][kept]).items()})
    out.update({"gain_" + k.removeprefix("before_"): out["after_" + k.removeprefix("before_")] - out[k]
                for k in list(out) if k.startswith("before_") and "after_" + k.removeprefix("before_") in out})
    return out


def bootstrap(children: np.ndarray, runs: list[dict], rng: np.random.Generator) -> dict:
    """Each figure (and after - before gain) averaged over the seeds' runs: estimate, 95% interval over children
    resampled with replacement, and the range over seeds."""
    names, inverse = np.unique(children, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]  # the films of each child

    def mean_over_seeds(rows: np.ndarray) -> dict[str, float]:
        per_seed = [seed_figures(run, rows) for run in runs]
        return {key: float(np.mean([s[key] for s in per_seed])) for key in per_seed[0]}

    every = np.arange(len(children))
    per_seed = [seed_figures(run, every) for run in runs]
    resampled = [mean_over_seeds(np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))]))
                 for _ in range(BOOTSTRAP)]
    return {key: {"estimate": float(np.mean([s[key] for s in per_seed])),
                  "ci": [float(np.nanpercentile([r[key] for r in resampled], q)) for q in (2.5, 97.5)],
                  "seed_range": [float(min(s[key] for s in per_seed)), float(max(s[key] for s in per_seed))]}
            for key in per_seed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kermany", type=Path, required=True, help="kermany-train-400 (normal/, pneumonia/)")
    parser.add_argument("--demo", type=Path, default=None, help="pneumonia-demo (normal/, pneumonia/)")
    parser.add_argument("--seeds", type=int, default=10, help="repetitions (folds, training and calibration draws)")
    parser.add_argument("--output", type=Path, default=None, help="every figure as JSON")
    args = parser.parse_args()
    started = time.time()
    x, y, children, labels = load(args.kermany)
    assert labels == ["normal", "pneumonia"], labels
    result: dict = {"date": datetime.date.today().isoformat(), "mini_retrain": mini_retrain.__version__,
                    "machine": platform.platform(), "seeds": args.seeds,
                    "calibration_per_class": CALIBRATION_PER_CLASS, "folds": FOLDS, "l2": L2,
                    "kermany": {"films": int(len(y)), "children": int(len(np.unique(children)))}}
    l2_variants = (0.01, L2, 1.0)

    # A and B: cross-validation by child; each held-out fold is also a simulated site.
    runs_a, runs_b = [], {l2: [] for l2 in l2_variants}
    fits_b = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        fold_of = assign_folds([f"{c}_nohash_{i}" for i, c in enumerate(children)], y, FOLDS, rng, labels)
        logits = np.zeros((len(y), 2))  # (n, 2) out-of-fold logits
        after = {l2: np.zeros((len(y), 2)) for l2 in l2_variants}
        scored = np.zeros(len(y), bool)
        for k in range(FOLDS):
            site = fold_of == k
            layer = train_layer(x[~site], y[~site], 2, rng)
            logits[site] = compute_logits(x[site], layer.weights, layer.biases)
            fit_rows = calibration_films(site, y, children, rng)
            for l2 in l2_variants:
                recalibrated, fit = recalibrate(logits, y, fit_rows, l2)
                after[l2][site] = recalibrated[site]
                if l2 == L2:
                    fits_b.append(fit | {"seed": seed, "fold": k, "fitted_on": int(fit_rows.sum())})
            scored |= site & ~fit_rows
        runs_a.append({"before": logits, "scored": np.ones(len(y), bool), "y": y})
        for l2 in l2_variants:
            runs_b[l2].append({"before": logits, "after": after[l2], "scored": scored, "y": y})
        print(f"seed {seed}: A/B done ({time.time() - started:.0f} s)", file=sys.stderr)
    rng = np.random.default_rng(1000)
    result["A_crossval_pool_3"] = bootstrap(children, runs_a, rng)
    result["B_site_within_kermany"] = {str(l2): bootstrap(children, runs_b[l2], rng) for l2 in l2_variants}
    result["B_fits"] = fits_b
    result["B_scored_films_per_seed"] = float(np.mean([run["scored"].sum() for run in runs_b[L2]]))

    if args.demo is not None:
        x_demo, y_demo, children_demo, labels_demo = load(args.demo)
        assert labels_demo == labels, labels_demo
        # A on the second set: pool_3, 4-fold cross-validation by child of the 16 demo films (15 children).
        runs_a_demo = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            fold_of = assign_folds([f"{c}_nohash_{i}" for i, c in enumerate(children_demo)], y_demo, 4, rng, labels)
            logits = np.zeros((len(y_demo), 2))
            for k in range(4):
                held_out = fold_of == k
                layer = train_layer(x_demo[~held_out], y_demo[~held_out], 2, rng)
                logits[held_out] = compute_logits(x_demo[held_out], layer.weights, layer.biases)
            runs_a_demo.append({"before": logits, "scored": np.ones(len(y_demo), bool), "y": y_demo})
        result["A_crossval_pool_3_demo"] = bootstrap(children_demo, runs_a_demo, np.random.default_rng(3000))
        # C: trained on all of kermany-train-400, scored on the demo films, recalibrated leave-one-out.
        runs_c = []
        for seed in range(args.seeds):
            layer = train_layer(x, y, 2, np.random.default_rng(seed))
            logits = compute_logits(x_demo, layer.weights, layer.biases).astype(np.float64)  # (16, 2)
            after = np.zeros_like(logits)
            for i in range(len(y_demo)):
                rest = np.arange(len(y_demo)) != i  # 15 films: 7 + 8, each class >= 5
                after[i] = recalibrate(logits, y_demo, rest)[0][i]
            in_sample = recalibrate(logits, y_demo, np.ones(len(y_demo), bool))
            runs_c.append({"before": logits, "after": after, "scored": np.ones(len(y_demo), bool), "y": y_demo,
                           "in_sample": figures(in_sample[0], y_demo), "fit_all_16": in_sample[1]})
        result["C_kermany_to_demo"] = {
            "per_seed": [{"before": figures(r["before"], y_demo), "after_leave_one_out": figures(r["after"], y_demo),
                          "after_in_sample": r["in_sample"], "fit_all_16": r["fit_all_16"],
                          "correct_before": int(np.sum(r["before"].argmax(1) == y_demo)),
                          "correct_after": int(np.sum(r["after"].argmax(1) == y_demo))} for r in runs_c]}
        # D: trained on the 16 demo films, recalibrated on 20 + 20 of kermany-train-400, scored on the rest.
        runs_d = {l2: [] for l2 in l2_variants}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            layer = train_layer(x_demo, y_demo, 2, rng)
            logits = compute_logits(x, layer.weights, layer.biases).astype(np.float64)  # (400, 2)
            fit_rows = calibration_films(np.ones(len(y), bool), y, children, rng)
            for l2 in l2_variants:
                runs_d[l2].append({"before": logits, "after": recalibrate(logits, y, fit_rows, l2)[0],
                                   "scored": ~fit_rows, "y": y})
        rng = np.random.default_rng(2000)
        result["D_demo_to_kermany"] = {str(l2): bootstrap(children, runs_d[l2], rng) for l2 in l2_variants}
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
