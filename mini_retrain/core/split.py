"""Stable train / validation / test split: retrain.py's hashing rule.

Every image is assigned to a split by hashing its name, not by drawing random numbers, so an
image stays in the same split when images are added or removed, and across runs. retrain.py does:

    hash_name        = re.sub(r'_nohash_.*$', '', file_name)
    percentage_hash  = (int(sha1(hash_name).hexdigest(), 16) % (MAX + 1)) * (100 / MAX)
                       with MAX = MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1,  so percentage_hash is in [0, 100]
    split            = "validation" if percentage_hash <  validation_percentage
                       "testing"    if percentage_hash <  validation_percentage + testing_percentage
                       "training"   otherwise

The one difference here: `file_name` is the path RELATIVE to image_dir with forward slashes
(e.g. "normal/CHNCXR_0001_0.png"), not the bare file name. Moving or copying the whole folder
therefore never reshuffles the split, and two classes may contain files with the same name
without those files being forced into the same split.

`_nohash_` groups: everything from `_nohash_` to the end of the FILE NAME is ignored when hashing,
so "pat7_nohash_0.png" and "pat7_nohash_1.png" (e.g. two views of one patient) share a key, land
in the same split, and cannot leak from training into testing. The directory part is kept as is.

Small classes (where retrain.py crashes with ZeroDivisionError because a class has no image in a
split), our rule:

  * Every class needs at least one training image. If hashing leaves a class with none, the image
    with the highest percentage_hash -- the one nearest the training range -- moves to training:
    exactly one image (or its whole `_nohash_` group, which must stay together). A warning names
    the class.
  * A class with no validation (or no testing) image gets a warning that it is not represented in
    that split; validation (or test) accuracy then covers the other classes only. When no class has
    one, a single warning says the split is empty. No warning when that percentage is 0, since then
    no class was asked to be represented.
"""

import hashlib
import re

from mini_retrain.core.checks import check_split_percentages

SPLITS = ("training", "validation", "testing")

# retrain.py's constant: the hash is reduced modulo MAX + 1 and rescaled to [0, 100].
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1

_NOHASH = re.compile(r"_nohash_.*$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


def hash_key(relative_path: str) -> str:
    """The string that gets hashed: forward-slash relative path with `_nohash_...` cut from the file name.

    "normal/pat7_nohash_1.png" -> "normal/pat7"; "normal/a.png" -> "normal/a.png".
    """
    if not isinstance(relative_path, str) or relative_path == "":
        raise ValueError(f"relative_path must be a non-empty string, got {relative_path!r}.")
    path = relative_path.replace("\\", "/")  # Windows separators hash like POSIX ones
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        raise ValueError(
            f"relative_path {relative_path!r} is absolute; pass the path relative to image_dir "
            "(e.g. 'normal/x.png') so the split does not depend on where the folder lives."
        )
    directory, slash, file_name = path.rpartition("/")
    return directory + slash + _NOHASH.sub("", file_name)


def percentage_hash(relative_path: str) -> float:
    """retrain.py's percentage_hash of hash_key(relative_path): a number in [0, 100]."""
    digest = hashlib.sha1(hash_key(relative_path).encode("utf-8")).hexdigest()
    bucket = int(digest, 16) % (MAX_NUM_IMAGES_PER_CLASS + 1)  # in [0, MAX]
    return bucket * (100.0 / MAX_NUM_IMAGES_PER_CLASS)


def _split_of(percentage: float, validation_percentage: float, testing_percentage: float) -> str:
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def which_split(relative_path: str, validation_percentage: float, testing_percentage: float) -> str:
    """"training", "validation" or "testing" for one image, by retrain.py's rule (see module docstring)."""
    check_split_percentages(validation_percentage, testing_percentage)
    return _split_of(percentage_hash(relative_path), validation_percentage, testing_percentage)


def split_image_lists(
    image_lists: dict[str, list[str]], validation_percentage: float, testing_percentage: float
) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Split every class's images; apply the small-class rule; return (splits, warnings).

    image_lists: label -> relative paths of that class's images.
    Returns label -> {"training": [...], "validation": [...], "testing": [...]} (each list sorted)
    and a list of human-readable warnings (see the module docstring for when they appear).
    """
    check_split_percentages(validation_percentage, testing_percentage)
    splits: dict[str, dict[str, list[str]]] = {}
    warnings: list[str] = []
    missing: dict[str, list[str]] = {"validation": [], "testing": []}  # a warning per class without that split
    for label, paths in image_lists.items():
        if len(paths) == 0:
            raise ValueError(f"class {label!r} has no images; add images or remove its folder.")
        if len(set(paths)) != len(paths):
            raise ValueError(f"class {label!r} lists the same image more than once; pass each path once.")

        percentages = {path: percentage_hash(path) for path in paths}
        by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        for path, percentage in percentages.items():
            by_split[_split_of(percentage, validation_percentage, testing_percentage)].append(path)

        if not by_split["training"]:
            # Move the image nearest the training range (highest hash) and its _nohash_ group.
            # Ties in percentage are broken by path so the choice never depends on listing order.
            nearest = max(paths, key=lambda path: (percentages[path], path))
            key = hash_key(nearest)
            moved = [path for path in paths if hash_key(path) == key]
            for split in ("validation", "testing"):
                by_split[split] = [path for path in by_split[split] if hash_key(path) != key]
            by_split["training"] = moved
            warnings.append(
                f"WARNING: class {label!r}: hashing put none of its {len(paths)} image(s) in training; moved "
                f"{', '.join(sorted(moved))} to training (every class needs at least one training image)."
            )

        for split, percentage in (("validation", validation_percentage), ("testing", testing_percentage)):
            if percentage > 0 and not by_split[split]:
                missing[split].append(
                    f"WARNING: class {label!r} has no {split} image ({len(paths)} image(s) in total); {split} "
                    f"accuracy covers the other classes only. Add images to this class to include it."
                )

        splits[label] = {split: sorted(by_split[split]) for split in SPLITS}
    for split, percentage in (("validation", validation_percentage), ("testing", testing_percentage)):
        if missing[split] and len(missing[split]) == len(image_lists):  # no class has one: say so once
            total = sum(len(paths) for paths in image_lists.values())
            warnings.append(
                f"WARNING: no {split} images at all ({percentage:g}% of {total} images fell to none), so there is "
                f"no {split} accuracy. Raise --{split}_percentage or add images."
            )
        else:
            warnings.extend(missing[split])
    return splits, warnings
