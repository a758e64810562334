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

from mini_retrain.core.split import SPLITS, check_group_pattern, shared_id_warning, split_image_lists
from mini_retrain.pipeline.backbone import Backbone, layer_sizes, load_backbone, offered_layers, parse_layers, split_layers
from mini_retrain.pipeline.bottlenecks import get_bottlenecks
from mini_retrain.pipeline.image_lists import find_images
from mini_retrain.settings import RetrainSettings, bottleneck_folder


class Dataset(NamedTuple):
    """Every usable image of an image_dir with its label, split and bottleneck (one row each)."""

    image_dir: Path
    labels: list[str]  # class index -> label, sorted
    files: list[str]  # (n,) paths relative to image_dir
    splits: np.ndarray  # (n,) "training" / "validation" / "testing"
    class_indices: np.ndarray  # (n,) int64
    bottlenecks: np.ndarray  # (n, D) float32: the pooled `layers` side by side
    keys: list[str]  # (n,) SHA-1 of each file: equal keys are identical files
    backbone: Backbone
    layers: tuple[str, ...] = ("pool_3",)  # the backbone layers in `bottlenecks` (--bottleneck_layers), in order
    pooled: dict[str, np.ndarray] | None = None  # layer -> (n, size): every layer loaded (extra_layers too)

    def split(self, name: str, layers: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(bottlenecks, class indices, relative files) of one split; `layers` (loaded ones) instead of self.layers."""
        rows = np.flatnonzero(self.splits == name)
        return self.features(layers)[rows], self.class_indices[rows], [self.files[r] for r in rows]

    def features(self, layers: tuple[str, ...] | None = None) -> np.ndarray:
        """(n, D) the pooled `layers` side by side: self.bottlenecks, or other layers loaded with extra_layers."""
        if layers is None or tuple(layers) == self.layers:
            return self.bottlenecks
        missing = [layer for layer in layers if layer not in (self.pooled or {})]
        if missing:
            raise ValueError(f"layers {missing} were not loaded; pass them to load_dataset as extra_layers")
        if len(layers) == 1:
            return self.pooled[layers[0]]  # a view, no copy
        return np.concatenate([self.pooled[layer] for layer in layers], axis=1)  # (n, D1 + D2 + ...)


def standardises(layers: tuple[str, ...]) -> bool:
    """Whether the final layer trains on standardised features: for any layers but pool_3 alone (retrain.py's
    bottleneck, trained as it always was). Measured in docs/algorithm.md, section 2: the averages of earlier blocks
    are small, and unscaled they leave the layer under-trained at the default learning rate."""
    return tuple(layers) != ("pool_3",)


def load_dataset(settings: RetrainSettings, log: Callable[[str], None] = print,
                 check_lists: Callable[[dict[str, list[str]]], None] | None = None,
                 extra_layers: tuple[str, ...] = (), optional_layers: tuple[str, ...] = ()) -> Dataset:
    """Steps 1-3: find the images, split them, get their bottlenecks (cached); report duplicates.

    Uses image_dir, validation_percentage, testing_percentage, group_pattern, backbone, device, precision,
    bottleneck_dir,
    on_bad_image, fast_decode, bottleneck_layers, positive_label and dask_scheduler of `settings`. The folder is listed
    and split, and the Dask scheduler reached, before the backbone is loaded (or built), so an unreachable scheduler,
    a bad --group_pattern, a missing folder, a single class, bad
    percentages, a --positive_label that is not a class, or what check_lists(image_lists) refuses (crossval: more
    folds than a class has images) are reported at once. Without a --group_pattern, file names that look like one
    patient's films say so (split.shared_id_warning). extra_layers: more pooled layers for every image, from the same
    forward pass (retrain's OOD distance, sweep's alternatives), in Dataset.pooled; optional_layers likewise where the
    backbone offers them (retrain's population distance: an older backbone file has none), else left out.
    """
    layers = parse_layers(settings.bottleneck_layers)
    image_dir = Path(settings.image_dir)
    group_pattern = check_group_pattern(settings.group_pattern)
    image_lists, warnings = find_images(image_dir)
    splits, split_warnings = split_image_lists(image_lists, settings.validation_percentage,
                                               settings.testing_percentage, group_pattern)
    if group_pattern is None:
        split_warnings += [warning for warning in [shared_id_warning(image_lists)] if warning]
    labels = list(splits)  # class index order = sorted label order
    if settings.positive_label is not None and settings.positive_label not in labels:
        raise ValueError(f"positive_label {settings.positive_label!r} is not a class of {image_dir}; "
                         f"choose one of: {', '.join(labels)}")
    if check_lists is not None:
        check_lists(image_lists)
    if settings.dask_scheduler:  # dask is imported only here, and in get_bottlenecks
        from mini_retrain.pipeline.cluster import check_scheduler

        check_scheduler(settings.dask_scheduler)
    backbone = load_backbone(settings.backbone, settings.device, log, precision=settings.precision)
    offered = offered_layers(backbone.sidecar)
    wanted = extra_layers + tuple(layer for layer in optional_layers if layer in offered)
    every_layer = layers + tuple(dict.fromkeys(layer for layer in wanted if layer not in layers))
    sizes = layer_sizes(backbone.sidecar, every_layer, "bottleneck_layers")  # a layer the backbone lacks: now
    for warning in warnings + split_warnings:
        log(warning)
    log(f"Found {sum(len(v) for v in image_lists.values())} images in {len(labels)} classes: "
        + ", ".join(f"{label} ({len(image_lists[label])})" for label in labels))

    entries = [(split, index, relative) for index, label in enumerate(labels)
               for split in SPLITS for relative in splits[label][split]]
    bottleneck_dir = bottleneck_folder(settings)
    result = get_bottlenecks([image_dir / relative for _, _, relative in entries], backbone, bottleneck_dir,
                             on_bad_image=settings.on_bad_image, log=log, fast_decode=settings.fast_decode,
                             layers=every_layer, dask_scheduler=settings.dask_scheduler, device=settings.device)
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
    pooled = split_layers(result.values, backbone.sidecar, every_layer)  # layer -> (n, size), views
    chosen = result.values if len(every_layer) == len(layers) else result.values[:, :sum(sizes[:len(layers)])]
    dataset = Dataset(image_dir, labels, [relative for _, _, relative in kept], np.array([s for s, _, _ in kept]),
                      np.array([c for _, c, _ in kept], dtype=np.int64), chosen, result.keys, backbone, layers,
                      pooled)
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
