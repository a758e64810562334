"""Random training batches: retrain.py's class-balanced sampling, vectorised.

retrain.py builds each training batch one sample at a time:

    for _ in range(batch_size):
        label = random.randrange(class_count)          # a class, uniformly
        image = random.randrange(MAX + 1) % len(images_of[label])   # an image of it (uniform up to
                                                                     # a negligible modulo bias)

so every class is drawn equally often however many images it has (1000 "normal" vs 10 "tuberculosis"
still gives ~50% / ~50%), and images are drawn with replacement. A batch_size of -1 means "use every
image" (retrain.py uses it for whole-set evaluation).

Here the same distribution is drawn without a Python loop over samples:

    order   = stable argsort of labels         -> the candidates grouped by class
    count_c = number of candidates in class c,  start_c = where class c begins in `order`
    c       = a present class, uniformly        (u1 ~ U[0, 1):  c = classes[floor(u1 * n_classes)])
    index   = order[start_c + floor(u2 * count_c)]     (u2 ~ U[0, 1): an image of c, uniformly)

The grouping (a sort) depends only on the labels, so the training loop does it once (group_by_class) and then
draws 4000 batches from the groups (sample_from_groups); sample_batch does both for one batch. group_by_class and
sample_from_groups check nothing (their caller checks once, see checks.py); sample_batch and uniform_batch check.

"Class balancing off" (uniform_batch, offered by `--class_balancing off`): every image equally likely,
P(i) = 1 / n, so batches have the class frequencies of the data.

With distorted copies (pipeline/distorted_copies.py) each drawn image then gives one of its 1 + N versions, uniformly
(sample_versions): version 0 is the film itself, 1 .. N its copies. The class and the film are drawn as above, so
class balancing and the weight of each film are what they were without copies:

    P(film i, version v) = P(film i) / (1 + N)        for v = 0 .. N
"""

from typing import NamedTuple

import numpy as np

from mini_retrain.core.checks import check_batch_size, check_labels


class ClassGroups(NamedTuple):
    """The candidates grouped by class: order[start[k] : start[k] + count[k]] are those of the k-th present class."""
    order: np.ndarray  # (n,) indices into labels, sorted by class
    start: np.ndarray  # (n_classes,) where each class begins in `order`
    count: np.ndarray  # (n_classes,) how many candidates each class has, >= 1


def group_by_class(labels: np.ndarray) -> ClassGroups:
    """Group the indices of `labels` (n,) by class, once (a stable sort: the same result on every machine)."""
    order = np.argsort(labels, kind="stable")                   # (n,)
    sorted_labels = labels[order]                               # (n,)
    is_boundary = np.ones(labels.size + 1, dtype=bool)          # (n + 1,) True where a class begins, and at n
    np.not_equal(sorted_labels[1:], sorted_labels[:-1], out=is_boundary[1:-1])
    boundaries = np.flatnonzero(is_boundary)                    # (n_classes + 1,)
    return ClassGroups(order, boundaries[:-1], boundaries[1:] - boundaries[:-1])


def sample_from_groups(groups: ClassGroups, batch_size: int, rng: np.random.Generator,
                       class_balancing: bool = True) -> np.ndarray:
    """(batch_size,) indices drawn with replacement from grouped candidates; batch_size < 0: all of them, in order.

    class_balancing=True: a present class uniformly, then an image of it uniformly (retrain.py).
    class_balancing=False: an image uniformly, P(i) = 1 / n.
    """
    order, start, count = groups
    if batch_size < 0:
        return np.arange(order.size)
    if not class_balancing:
        return rng.integers(0, order.size, size=int(batch_size))  # (batch,) each in [0, n - 1]
    # One call to the generator for both choices. u < 1, so floor(u * k) is in [0, k - 1] (float64
    # rounding cannot reach k for any k < 2**53).
    u = rng.random((2, int(batch_size)))                        # (2, batch)
    drawn_class = (u[0] * start.size).astype(np.intp)           # (batch,) position in the present classes
    offset_in_class = (u[1] * count[drawn_class]).astype(np.intp)  # (batch,) which image of that class
    return order[start[drawn_class] + offset_in_class]          # (batch,) indices into labels


def sample_versions(batch_size: int, version_count: int, rng: np.random.Generator) -> np.ndarray:
    """(batch_size,) version of each drawn image, uniformly in 0 .. version_count - 1 (0 = the original film)."""
    if isinstance(version_count, bool) or int(version_count) != version_count or version_count < 1:
        raise ValueError(f"version_count must be a whole number >= 1, got {version_count!r}")
    return rng.integers(0, int(version_count), size=int(batch_size))  # (batch,)


def sample_batch(labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into `labels` of one training batch: class uniformly at random, then an image of it.

    labels: (n,) int class index of each candidate (e.g. of every training bottleneck). Only the
    classes present in `labels` are drawn. batch_size < 0 means "all": returns np.arange(n).
    Returns (batch_size,) int indices, drawn with replacement.
    """
    check_batch_size(batch_size)
    return sample_from_groups(group_by_class(check_labels(labels, allow_empty=False)), batch_size, rng)


def uniform_batch(labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one batch drawn uniformly over all images, with replacement ("class balancing off").

    P(image i) = 1 / n, so P(class c) = n_c / n: the batch has the class frequencies of the data.
    batch_size < 0 means "all": np.arange(n), as sample_batch.
    """
    check_batch_size(batch_size)
    return sample_from_groups(group_by_class(check_labels(labels, allow_empty=False)), batch_size, rng,
                              class_balancing=False)
