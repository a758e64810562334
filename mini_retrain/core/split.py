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

Patient groups without renaming (`--group_pattern REGEX`): the file name is searched for the pattern and
its match (group 1 if the pattern has a group, else the whole match) replaces the file name in the key:

    --group_pattern 'person[0-9]+'    "pneumonia/person1004_bacteria_2935.jpeg" -> "pneumonia/person1004"
                                      "pneumonia/person1004_virus_1686.jpeg"    -> "pneumonia/person1004"

so one child's films share one split (and one fold in crossval), exactly as a `_nohash_` group. A name the
pattern does not match is hashed as before (`_nohash_` included). Only the file name is searched, never
the folders, so moving the image folder cannot regroup anything. Without a pattern, `shared_id_warning`
says when many names in a class look like "<patient ID>_<more>", the leak the pattern prevents.

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
from collections import Counter

from mini_retrain.core.checks import check_split_percentages

SPLITS = ("training", "validation", "testing")

# retrain.py's constant: the hash is reduced modulo MAX + 1 and rescaled to [0, 100].
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1

_NOHASH = re.compile(r"_nohash_.*$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")
_ID_END = re.compile(r"[0-9]+(?=[^0-9A-Za-z]+[0-9A-Za-z])")  # digits, then a separator and more of the name
_REGEX_SPECIAL = re.compile(r"([.^$*+?{}\[\]\\|()])")
# shared_id_warning: "many" names of a class share a leading ID when at least this many, and this fraction, do.
SHARED_ID_MIN_FILES = 5
SHARED_ID_MIN_FRACTION = 0.1


def check_group_pattern(group_pattern: str | None) -> re.Pattern | None:
    """--group_pattern compiled, or a one-line ValueError saying why it is not a regular expression."""
    if group_pattern is None:
        return None
    try:
        return re.compile(group_pattern)
    except re.error as error:
        raise ValueError(f"--group_pattern {group_pattern!r} is not a regular expression ({error}); "
                         "e.g. --group_pattern 'person[0-9]+' groups person1004_*.jpeg") from None


def group_of(file_name: str, group_pattern: str | re.Pattern | None) -> str | None:
    """The patient group the pattern finds in a file name: group 1 if the pattern has a group, else the whole
    match; None when it finds nothing (or only an empty string)."""
    if group_pattern is None:
        return None
    match = re.search(group_pattern, file_name)
    if match is None:
        return None
    group = match.group(1) if match.re.groups else match.group(0)
    return group or None


def hash_key(relative_path: str, group_pattern: str | re.Pattern | None = None) -> str:
    """The string that gets hashed: forward-slash relative path with `_nohash_...` cut from the file name,
    or with the file name replaced by its group when `group_pattern` finds one.

    "normal/pat7_nohash_1.png" -> "normal/pat7"; "normal/a.png" -> "normal/a.png";
    with group_pattern "person[0-9]+": "pneumonia/person1004_virus_1686.jpeg" -> "pneumonia/person1004".
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
    group = group_of(file_name, group_pattern)
    return directory + slash + (group if group is not None else _NOHASH.sub("", file_name))


def percentage_hash(relative_path: str, group_pattern: str | re.Pattern | None = None) -> float:
    """retrain.py's percentage_hash of hash_key(relative_path, group_pattern): a number in [0, 100]."""
    digest = hashlib.sha1(hash_key(relative_path, group_pattern).encode("utf-8")).hexdigest()
    bucket = int(digest, 16) % (MAX_NUM_IMAGES_PER_CLASS + 1)  # in [0, MAX]
    return bucket * (100.0 / MAX_NUM_IMAGES_PER_CLASS)


def _split_of(percentage: float, validation_percentage: float, testing_percentage: float) -> str:
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def which_split(relative_path: str, validation_percentage: float, testing_percentage: float,
                group_pattern: str | re.Pattern | None = None) -> str:
    """"training", "validation" or "testing" for one image, by retrain.py's rule (see module docstring)."""
    check_split_percentages(validation_percentage, testing_percentage)
    return _split_of(percentage_hash(relative_path, group_pattern), validation_percentage, testing_percentage)


def split_image_lists(
    image_lists: dict[str, list[str]], validation_percentage: float, testing_percentage: float,
    group_pattern: str | re.Pattern | None = None,
) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """Split every class's images; apply the small-class rule; return (splits, warnings).

    image_lists: label -> relative paths of that class's images. group_pattern: --group_pattern (see the module
    docstring); names it does not match are said in one warning.
    Returns label -> {"training": [...], "validation": [...], "testing": [...]} (each list sorted)
    and a list of human-readable warnings (see the module docstring for when they appear).
    """
    check_split_percentages(validation_percentage, testing_percentage)
    group_pattern = check_group_pattern(group_pattern) if isinstance(group_pattern, str) else group_pattern
    splits: dict[str, dict[str, list[str]]] = {}
    warnings: list[str] = []
    missing: dict[str, list[str]] = {"validation": [], "testing": []}  # a warning per class without that split
    for label, paths in image_lists.items():
        if len(paths) == 0:
            raise ValueError(f"class {label!r} has no images; add images or remove its folder.")
        if len(set(paths)) != len(paths):
            raise ValueError(f"class {label!r} lists the same image more than once; pass each path once.")

        percentages = {path: percentage_hash(path, group_pattern) for path in paths}
        by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        for path, percentage in percentages.items():
            by_split[_split_of(percentage, validation_percentage, testing_percentage)].append(path)

        if not by_split["training"]:
            # Move the image nearest the training range (highest hash) and its _nohash_ group.
            # Ties in percentage are broken by path so the choice never depends on listing order.
            nearest = max(paths, key=lambda path: (percentages[path], path))
            key = hash_key(nearest, group_pattern)
            moved = [path for path in paths if hash_key(path, group_pattern) == key]
            for split in ("validation", "testing"):
                by_split[split] = [path for path in by_split[split] if hash_key(path, group_pattern) != key]
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
    if group_pattern is not None:
        unmatched = sorted(path for paths in image_lists.values() for path in paths
                           if group_of(path.rpartition("/")[2], group_pattern) is None)
        if unmatched:
            total = sum(len(paths) for paths in image_lists.values())
            warnings.append(f"WARNING: --group_pattern {group_pattern.pattern!r} finds nothing in {len(unmatched)} of "
                            f"{total} file names (e.g. {unmatched[0]}); each of those is its own group")
    return splits, warnings


def leading_ids(stems: list[str]) -> list[str | None]:
    """Each file name's (without extension) leading ID, or None: its shortest prefix that ends in digits followed by
    more of the name ("person1004_bacteria_2935" -> "person1004", "CHNCXR_0001_0" -> "CHNCXR_0001"), skipping
    prefixes that more than half of `stems` share: a constant such as "NORMAL2" in "NORMAL2-IM-1266-0001" names a
    series, not a patient (that name's ID is "NORMAL2-IM-1266"). Names ending in their only number have none."""
    candidates = [[stem[: match.end()] for match in _ID_END.finditer(stem)] for stem in stems]  # shortest first
    counts = Counter(prefix for prefixes in candidates for prefix in set(prefixes))
    return [next((prefix for prefix in prefixes if counts[prefix] <= len(stems) / 2), None) for prefixes in candidates]


def _id_shape(identifier: str) -> str:
    """A regular expression for IDs like this one: its last run of digits becomes [0-9]+ ("IM-0115" -> "IM-[0-9]+")."""
    prefix = identifier.rstrip("0123456789")
    return _REGEX_SPECIAL.sub(r"\\\1", prefix) + "[0-9]+"


def shared_id_warning(image_lists: dict[str, list[str]]) -> str | None:
    """One WARNING when many file names of a class share a leading ID with another file, else None.

    person1004_bacteria_2935.jpeg and person1004_virus_1686.jpeg are one child: hashed by name, one film may land in
    training and the other in testing, and the test then rewards recognising the child. "Many": at least
    SHARED_ID_MIN_FILES files and SHARED_ID_MIN_FRACTION of the class. The warning names two such files and the
    --group_pattern that groups them. NLM names (CHNCXR_0001_0.png: one patient per number), plain numbered names
    (0001.png, img_0001.png) and `_nohash_` names (already grouped) never trigger it.
    """
    counts, shapes, example, most = [], Counter(), None, 0
    for label, paths in image_lists.items():
        names = sorted(path.rpartition("/")[2] for path in paths if "_nohash_" not in path)
        members: dict[str, list[str]] = {}
        for name, identifier in zip(names, leading_ids([name.rpartition(".")[0] or name for name in names])):
            if identifier is not None:
                members.setdefault(identifier, []).append(name)
        shared = {identifier: files for identifier, files in members.items() if len(files) > 1}
        count = sum(len(files) for files in shared.values())
        if count >= max(SHARED_ID_MIN_FILES, SHARED_ID_MIN_FRACTION * len(names)):
            counts.append(f"{count} of {len(names)} in '{label}'")
            shapes.update({_id_shape(identifier): len(files) for identifier, files in shared.items()})
            if count > most:  # the example comes from the class where most names share an ID
                example, most = shared[min(shared)][:2], count
    if not counts:
        return None
    pattern = "(" + "|".join(sorted(shape for shape, _ in shapes.most_common(3))) + ")"
    return (f"WARNING: file names share a leading ID ({', '.join(counts)}), e.g. {example[0]} and {example[1]}. If an "
            "ID is a patient, one patient's films can land in training and in testing, which flatters the test "
            f"accuracy: pass --group_pattern '{pattern}' to keep each patient's films in one split "
            "(ignore this if the IDs are not patients)")
