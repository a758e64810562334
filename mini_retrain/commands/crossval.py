"""K-fold cross-validation: an accuracy estimate from EVERY image, not only the 10% the hash puts in testing.

With a few hundred X-rays, retrain.py's test split holds a few dozen images and its accuracy has a wide confidence
interval. Cross-validation uses each image once as a test image:

    1. cut the images into K folds                         stratified by class, patient groups kept whole
    2. for k in 1..K: train the final layer on the other K-1 folds, predict fold k   (train.py)
    3. pool the K held-out predictions: every image predicted exactly once, by a layer that never saw it
    4. report each fold's accuracy and the pooled metrics   (metrics.py)

The hash split of retrain.py is ignored: every usable image takes part. Only the final layer is retrained per fold;
the bottlenecks are computed (or read from the cache) once, so K x 4000 steps take seconds. With a distortion flag,
every film gets its cached distorted copies (each film is a training film in K - 1 folds), and fold k trains on the
copies of the other folds' films only: the held-out films are predicted from their undistorted bottlenecks.

Why keep patient groups (`_nohash_` names, or files with the same --group_pattern match) whole: two views of one
patient look alike, so one in training and one in the held-out fold would inflate the accuracy (the model recognises the patient, not the disease). Why stratify: with K folds of
a 10%-tuberculosis set, an unlucky fold with no tuberculosis at all would measure only specificity.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mini_retrain.paths import write_bytes_atomically
from mini_retrain.evaluation.metrics import evaluate, format_evaluation, wilson_interval
from mini_retrain.evaluation.population import POPULATION_LAYER
from mini_retrain.pipeline.dataset import Dataset, load_dataset, standardises
from mini_retrain.pipeline.distorted_copies import distorted_copies_of
from mini_retrain.pipeline.distortions import describe, distortions_of, distortions_requested
from mini_retrain.settings import RetrainSettings, bottleneck_folder, check_writable
from mini_retrain.core.softmax_layer import compute_logits, softmax
from mini_retrain.core.split import check_group_pattern, hash_key
from mini_retrain.core.train import train_layer


def assign_folds(files: list[str], class_indices: np.ndarray, folds: int, rng: np.random.Generator,
                 class_names: list[str] | None = None, group_pattern: str | None = None) -> np.ndarray:
    """Fold index (0 .. folds - 1) of every image, (n,) int64: stratified by class, patient groups kept whole.

    files: (n,) paths relative to image_dir; images with the same split.hash_key form one group (one patient: a
    `_nohash_` group, or the same --group_pattern match). class_indices: (n,) class of each image. class_names
    (optional) only make error messages readable.

    Whole groups are dealt out greedily, one class at a time ("largest first", as when packing bins):

        groups of class c, shuffled by rng, then sorted largest first (a stable sort: the shuffle orders equal sizes)
        each group -> the fold holding the fewest images of class c so far
                      (ties: the fold with the fewest images overall, then the lowest fold index)

    Giving a group of s images to the emptiest fold keeps  max - min <= s_max  (the largest group of the class) for
    every class: the fold that grows ends at most s above the old minimum, and the others do not move. With
    single-image groups every fold gets floor(n_c / K) or ceil(n_c / K) images of class c. The first K groups of a
    class go to K different folds, so every fold holds every class. The result depends on the seed and on the set of
    files, not on their order.
    """
    class_indices = np.asarray(class_indices)
    if class_indices.ndim != 1 or len(files) != class_indices.size:
        raise ValueError(f"files ({len(files)}) and class_indices {class_indices.shape} must give one class per file")
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 (each fold is held out once), got {folds!r}")
    folds = int(folds)
    name_of = (lambda c: repr(class_names[c])) if class_names is not None else (lambda c: str(c))

    # Groups: sorted unique hash keys, so the groups do not depend on the order of `files`.
    group_pattern = check_group_pattern(group_pattern)
    keys, group_of_image = np.unique([hash_key(f, group_pattern) for f in files], return_inverse=True)  # (g,), (n,)
    group_of_image = group_of_image.reshape(-1)
    group_size = np.bincount(group_of_image, minlength=keys.size)  # (g,)
    group_class = np.full(keys.size, -1, dtype=np.int64)  # (g,)
    group_class[group_of_image] = class_indices
    mixed = np.flatnonzero(group_class[group_of_image] != class_indices)
    if mixed.size:
        group = str(keys[group_of_image[mixed[0]]])
        raise ValueError(f"{files[mixed[0]]}: its patient group {group!r} holds images of different classes; "
                         "give one patient's images one class, or rename them")
    for c in np.unique(class_indices):
        group_count = int(np.sum(group_class == c))
        if group_count < folds:
            raise ValueError(f"folds {folds} is more than class {name_of(c)} has independent images "
                             f"({group_count} patient groups); use folds={group_count} or fewer")

    fold_of_group = np.empty(keys.size, dtype=np.int64)  # (g,)
    fold_total = np.zeros(folds, dtype=np.int64)  # (K,) images of any class per fold
    for c in np.unique(class_indices):
        shuffled = rng.permutation(np.flatnonzero(group_class == c))  # groups of class c, random order
        largest_first = shuffled[np.argsort(-group_size[shuffled], kind="stable")]
        fold_in_class = np.zeros(folds, dtype=np.int64)  # (K,) images of class c per fold
        for group in largest_first:
            fold = min(range(folds), key=lambda f: (fold_in_class[f], fold_total[f]))  # min: first = lowest index
            fold_of_group[group] = fold
            fold_in_class[fold] += group_size[group]
            fold_total[fold] += group_size[group]
    return fold_of_group[group_of_image]  # (n,)


# The settings crossval reads (the others are retrain's and are left out of the report's record of the run).
USED = ("image_dir", "bottleneck_dir", "backbone", "device", "on_bad_image", "fast_decode", "how_many_training_steps",
        "learning_rate", "train_batch_size", "class_balancing", "random_seed", "positive_label", "report")


def _rate(successes: int, n: int) -> dict:
    """A proportion as metrics.py writes it: estimate, counts and the 95% Wilson interval."""
    low, high = wilson_interval(successes, n)
    return {"estimate": successes / n if n else None, "successes": successes, "n": n, "ci": [low, high]}


def check_folds(folds: int, image_lists: dict[str, list[str]] | None = None,
                group_pattern: str | None = None) -> None:
    """folds before any image is decoded: an integer >= 2, and (given the listed images) no more than the smallest
    class has independent images (patient groups), since every fold must hold every class."""
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 (each fold is held out once), got {folds!r}")
    for label, files in (image_lists or {}).items():
        groups = len({hash_key(f, group_pattern) for f in files})
        if groups < folds:
            raise ValueError(f"folds {folds} is more than class {label!r} has independent images "
                             f"({groups} patient groups); use folds={groups} or fewer")


def cross_validate(dataset: Dataset, folds: int, rng: np.random.Generator, *, how_many_training_steps: int,
                   learning_rate: float, train_batch_size: int, class_balancing: bool,
                   positive_label: str | None = None, log: Callable[[str], None] = print,
                   group_pattern: str | None = None, copies: np.ndarray | None = None) -> dict:
    """Stratified, group-aware K-fold cross-validation of the final layer on every image of `dataset`.

    Returns a JSON-serialisable dict: per_fold (fold, n_train, n_test, accuracy record), pooled (metrics.evaluate
    of all out-of-fold predictions) and predictions (file, fold, true, predicted, probabilities; one per image).
    Each fold is trained as retrain.py trains (train.py: class-balanced batches, gradient descent), with no
    validation set: the held-out fold is only predicted, after training, so it cannot steer anything.
    copies (copies, n, D): distorted copies of every row; a fold trains on those of its training rows only.
    """
    labels, files = dataset.labels, dataset.files
    y = dataset.class_indices  # (n,)
    fold_of = assign_folds(files, y, folds, rng, labels, group_pattern)  # (n,)
    folds = int(folds)
    probabilities = np.zeros((len(files), len(labels)))  # (n, classes), each row filled by the fold holding it out
    per_fold = []
    for k in range(folds):
        held_out = fold_of == k  # (n,) bool
        batch_size = min(train_batch_size, int((~held_out).sum()))  # capped at the training set, as in retrain
        layer = train_layer(dataset.bottlenecks[~held_out], y[~held_out], len(labels), rng,
                            how_many_training_steps=how_many_training_steps, learning_rate=learning_rate,
                            train_batch_size=batch_size, class_balancing=class_balancing,
                            standardise=standardises(dataset.layers),  # scaled by the fold's training rows only
                            train_copies=None if copies is None else copies[:, ~held_out])
        probabilities[held_out] = softmax(compute_logits(dataset.bottlenecks[held_out], layer.weights, layer.biases))
        correct = int(np.sum(probabilities[held_out].argmax(axis=1) == y[held_out]))
        accuracy = _rate(correct, int(held_out.sum()))
        per_fold.append({"fold": k + 1, "n_train": int((~held_out).sum()), "n_test": int(held_out.sum()),
                         "accuracy": accuracy})
        composition = ", ".join(f"{label} {int(np.sum(y[held_out] == c))}" for c, label in enumerate(labels))
        low, high = accuracy["ci"]
        log(f"Fold {k + 1}/{folds}: accuracy = {100 * accuracy['estimate']:.1f}% ({correct}/{accuracy['n']}, "
            f"95% CI {100 * low:.1f}-{100 * high:.1f}%); held out {composition}; trained on {(~held_out).sum()}")

    fold_accuracies = np.array([row["accuracy"]["estimate"] for row in per_fold])  # (K,)
    log(f"Mean of the {folds} fold accuracies = {100 * fold_accuracies.mean():.1f}% "
        f"(standard deviation {100 * fold_accuracies.std(ddof=1):.1f}%)")
    pooled = evaluate(probabilities, y, labels, positive_label)
    for line in format_evaluation(pooled, title="Cross-validated accuracy"):
        log(line)
    predicted = probabilities.argmax(axis=1)  # (n,)
    return {
        "folds": folds,
        "how_many_training_steps": how_many_training_steps,
        "learning_rate": learning_rate,
        "train_batch_size": train_batch_size,
        "class_balancing": "on" if class_balancing else "off",
        "per_fold": per_fold,
        "pooled": pooled,
        "predictions": [{"file": files[i], "fold": int(fold_of[i]) + 1, "true": labels[y[i]],
                         "predicted": labels[predicted[i]], "probabilities": probabilities[i].tolist()}
                        for i in range(len(files))],
    }


def crossval(settings: RetrainSettings, folds: int = 5, output_json: Path = Path("crossval.json"),
             log: Callable[[str], None] = print) -> dict:
    """`mini_retrain crossval`: load every image's bottleneck (cached), cross-validate, write the JSON; return it.

    Uses image_dir, bottleneck_dir, backbone, device, precision, on_bad_image, bottleneck_layers, how_many_training_steps,
    learning_rate, train_batch_size, class_balancing, random_seed, positive_label, report, the distortion flags and
    distorted_copies of `settings`; the split percentages are ignored. Every flag and output is checked before the
    first image is decoded.
    """
    if settings.distort_every_step:
        raise ValueError("--distort_every_step is for retrain only; crossval trains on cached distorted copies")
    # 0% validation, 0% testing: every image is "training", i.e. every image takes part.
    settings = dataclasses.replace(settings, validation_percentage=0.0, testing_percentage=0.0)
    check_folds(folds)
    output_json = Path(output_json)
    check_writable(output_json, "--output_json", is_folder=False)  # now, before the bottlenecks, not after them
    check_writable(bottleneck_folder(settings), "--bottleneck_dir", is_folder=True)
    if settings.report is not None:
        check_writable(settings.report, "--report", is_folder=True)
    # pool_3 and the population layer ride along in the same forward pass, so a later retrain finds them cached.
    dataset = load_dataset(settings, log, check_lists=lambda image_lists: check_folds(folds, image_lists,
                                                                                 settings.group_pattern),
                           optional_layers=("pool_3", POPULATION_LAYER))
    distortions = distortions_of(settings)
    copies = None  # every film is a training film of K - 1 folds, so every film gets its copies
    if distortions_requested(distortions):
        copies = distorted_copies_of(dataset, np.arange(len(dataset.files)), settings, distortions, log)
    result = cross_validate(dataset, folds, np.random.default_rng(settings.random_seed),
                            how_many_training_steps=settings.how_many_training_steps,
                            learning_rate=settings.learning_rate, train_batch_size=settings.train_batch_size,
                            class_balancing=settings.class_balancing, positive_label=settings.positive_label, log=log,
                            group_pattern=settings.group_pattern, copies=copies)
    result["random_seed"] = settings.random_seed
    result["bottleneck_layers"] = list(dataset.layers)
    result["distortions"] = describe(distortions)
    result["distorted_copies"] = settings.distorted_copies if copies is not None else 0
    _warn_about_identical_images(dataset, result["predictions"], log)
    write_bytes_atomically(output_json, (json.dumps(result, indent=2) + "\n").encode())
    log(f"Wrote {output_json}")
    if settings.report is not None:
        from mini_retrain.commands.retrain import run_record
        from mini_retrain.evaluation.report import write_report

        pooled = dict(result["pooled"])
        pooled["misclassified"] = [{"file": p["file"], "predicted": p["predicted"], "true": p["true"],
                                    "score": max(p["probabilities"])}
                                   for p in result["predictions"] if p["predicted"] != p["true"]]
        counts = {label: {"images": int(np.sum(dataset.class_indices == c))} for c, label in enumerate(dataset.labels)}
        pooled["run"] = run_record(settings, "crossval", counts, folds=int(folds),
                                   skip=tuple(f.name for f in dataclasses.fields(settings) if f.name not in USED),
                                   extra_flags=(f"--folds {folds}", f"--output_json {output_json}"))
        page = write_report(settings.report, [], pooled, dataset.labels,
                            title=f"mini_retrain cross-validation report ({folds} folds)", log=log)
        log(f"Wrote report {page}")
    return result


def _warn_about_identical_images(dataset: Dataset, predictions: list[dict], log: Callable[[str], None]) -> None:
    """Byte-identical files in two folds: one is trained on while its copy is tested, which flatters the accuracy."""
    folds_of_key: dict[str, list[tuple[str, int]]] = {}
    for key, row in zip(dataset.keys, predictions):
        folds_of_key.setdefault(key, []).append((row["file"], row["fold"]))
    for copies in folds_of_key.values():
        if len({fold for _, fold in copies}) > 1:
            log("WARNING: identical images in different folds (data leak; remove the copies or give them one "
                f"_nohash_ name): {', '.join(file for file, _ in copies)}")
