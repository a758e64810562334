"""Steps 1-3 of retrain.py as one call: find the labelled images, split them, get their bottlenecks (cached).

`load_dataset` is what retrain, crossval and sweep share: each gets a `Dataset`, one row per usable image.
Identical files (same SHA-1) are reported: in two splits they leak test data into training, in two classes they
contradict each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mini_retrain.core.split import SPLITS, split_image_lists
from mini_retrain.paths import cache_dir
from mini_retrain.pipeline.backbone import Backbone, load_backbone
from mini_retrain.pipeline.bottlenecks import get_bottlenecks
from mini_retrain.pipeline.image_lists import find_images
from mini_retrain.settings import RetrainSettings


class Dataset(NamedTuple):
    """Every usable image of an image_dir with its label, split and bottleneck (one row each)."""

    image_dir: Path
    labels: list[str]  # class index -> label, sorted
    files: list[str]  # (n,) paths relative to image_dir
    splits: np.ndarray  # (n,) "training" / "validation" / "testing"
    class_indices: np.ndarray  # (n,) int64
    bottlenecks: np.ndarray  # (n, D) float32
    keys: list[str]  # (n,) SHA-1 of each file: equal keys are identical files
    backbone: Backbone

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(bottlenecks, class indices, relative files) of one split."""
        rows = np.flatnonzero(self.splits == name)
        return self.bottlenecks[rows], self.class_indices[rows], [self.files[r] for r in rows]


def load_dataset(settings: RetrainSettings, log: Callable[[str], None] = print) -> Dataset:
    """Steps 1-3: find the images, split them, get their bottlenecks (cached); report duplicates.

    Uses image_dir, validation_percentage, testing_percentage, backbone, device, precision, bottleneck_dir, on_bad_image
    and fast_decode of `settings`. The folder is listed and split before the backbone is loaded (or built), so a missing
    folder, a single class or bad percentages are reported at once.
    """
    image_dir = Path(settings.image_dir)
    image_lists, warnings = find_images(image_dir)
    splits, split_warnings = split_image_lists(image_lists, settings.validation_percentage,
                                               settings.testing_percentage)
    backbone = load_backbone(settings.backbone, settings.device, precision=settings.precision)
    for warning in warnings + split_warnings:
        log(warning)
    labels = list(splits)  # class index order = sorted label order
    log(f"Found {sum(len(v) for v in image_lists.values())} images in {len(labels)} classes: "
        + ", ".join(f"{label} ({len(image_lists[label])})" for label in labels))

    entries = [(split, index, relative) for index, label in enumerate(labels)
               for split in SPLITS for relative in splits[label][split]]
    bottleneck_dir = settings.bottleneck_dir or cache_dir() / "bottlenecks"
    result = get_bottlenecks([image_dir / relative for _, _, relative in entries], backbone, bottleneck_dir,
                             on_bad_image=settings.on_bad_image, log=log, fast_decode=settings.fast_decode)
    copies = len(result.keys) - len(set(result.keys))  # identical files: one bottleneck serves them all
    log(f"{len(result.kept)} bottlenecks ready ({result.computed} computed now, "
        f"{len(result.kept) - copies - result.computed} from the cache in {bottleneck_dir}"
        + (f", {copies} for identical copies)" if copies else ")"))
    if result.bad:
        log(f"{len(result.bad)} image(s) skipped:")
        for path, reason in result.bad:
            log(f"  {path}: {reason}")
    kept = [entries[i] for i in result.kept]
    _report_duplicates(kept, result.keys, labels, log)
    dataset = Dataset(image_dir, labels, [relative for _, _, relative in kept], np.array([s for s, _, _ in kept]),
                      np.array([c for _, c, _ in kept], dtype=np.int64), result.values, result.keys, backbone)
    for index, label in enumerate(labels):
        if not np.any((dataset.class_indices == index) & (dataset.splits == "training")):
            raise ValueError(f"{image_dir}: class '{label}' has no usable training image; add readable images to it")
    return dataset


def _report_duplicates(entries: list[tuple[str, int, str]], keys: list[str], labels: list[str],
                       log: Callable[[str], None]) -> None:
    """Identical files (same SHA-1) in two splits leak test data into training; in two classes they contradict."""
    by_key: dict[str, list[tuple[str, int, str]]] = {}
    for entry, key in zip(entries, keys):
        by_key.setdefault(key, []).append(entry)
    for copies in by_key.values():
        if len(copies) < 2:
            continue
        names = ", ".join(relative for _, _, relative in copies)
        if len({label for _, label, _ in copies}) > 1:
            log(f"WARNING: identical images with different labels (label conflict): {names}")
        if len({split for split, _, _ in copies}) > 1:
            log(f"WARNING: identical images in different splits (data leak: "
                f"{'/'.join(sorted({s for s, _, _ in copies}))}): {names}")
