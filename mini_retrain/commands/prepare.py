"""Turn the NLM chest X-ray downloads into mini_retrain's layout: one folder per class.

The U.S. National Library of Medicine publishes two tuberculosis sets (Jaeger et al., 2014):

    ChinaSet_AllFiles/                          Shenzhen: 326 normal, 336 TB
      CXR_png/CHNCXR_0001_0.png ...
      ClinicalReadings/CHNCXR_0001_0.txt ...
    MontgomerySet/                              Montgomery County: 80 normal, 58 TB
      CXR_png/MCUCXR_0001_0.png ...
      ClinicalReadings/MCUCXR_0001_0.txt ...
      ManualMask/leftMask/MCUCXR_0001_0.png ... lung masks with THE SAME names: not X-rays

The last digit of a name is its label (_0 = normal, _1 = abnormal, i.e. TB). `prepare` puts every X-ray in

    lungs/normal/CHNCXR_0001_0.png ...   lungs/abnormal/CHNCXR_0327_1.png ...

under its original name (the CHNCXR_ / MCUCXR_ prefix still tells the source), and with holdout=N it sets N images
per class aside in lungs_holdout/normal|abnormal for `mini_retrain label`, as the original experiment held out 25 + 25.

Each rule has a reason:
  * Only PNGs named <CHNCXR|MCUCXR>_<digits>_<0|1>.png are X-rays. Everything else (Thumbs.db, the ReadMe .docx,
    hidden files, the "._" files of macOS zips) is skipped and counted.
  * Nothing below a folder whose name contains "mask" (ManualMask, leftMask, rightMask) or is ClinicalReadings is
    ever taken, whatever its name: a lung mask trained on as an X-ray teaches the model nonsense.
  * A file name found twice is used once when both are the same bytes (reported), and is an error when they differ:
    picking one silently could pick a mask.
  * Outputs are hard links (no extra disk space; they survive moving the download), else symbolic links to the
    absolute path (e.g. across file systems), else copies; copy=True forces copies. The sources are only read.
  * Running again is safe: a target that already is the same file (a link to it, or an identical copy) is left as it
    is; a different file there is an error naming it. An image that this run places in one folder while an earlier
    run placed it in another (a changed holdout or random_seed) is an error too: keeping both would put held-out
    images into training.
  * Everything is checked before anything is written.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

SOURCES = {"CHNCXR": "Shenzhen", "MCUCXR": "Montgomery"}  # file-name prefix -> data set
LABELS = {"0": "normal", "1": "abnormal"}  # last digit of the file name -> class folder
CLASSES = ("normal", "abnormal")
NLM_NAME = re.compile(r"^(CHNCXR|MCUCXR)_\d+_([01])\.png$", re.IGNORECASE)
EXPECTED_NAMES = "CHNCXR_0001_0.png (Shenzhen) or MCUCXR_0001_1.png (Montgomery), ending _0 = normal, _1 = abnormal"
MASK_FOLDERS = ("manualmask", "leftmask", "rightmask")  # Montgomery's lung masks (compared in lower case)


class NlmImage(NamedTuple):
    path: Path  # the X-ray in the download
    source: str  # "Shenzhen" or "Montgomery"
    label: str  # "normal" or "abnormal"


class _Scan(NamedTuple):
    images: list[NlmImage]
    not_xray_folders: int  # files below ManualMask/, leftMask/, ClinicalReadings/, ...
    other_files: list[Path]  # files not named like an NLM X-ray


def _holds_no_xrays(folder_name: str) -> bool:
    """ManualMask, leftMask, rightMask (or any *mask* folder) and ClinicalReadings never hold X-rays."""
    name = folder_name.lower()
    return "mask" in name or name == "clinicalreadings"


def _scan(folder: str | Path) -> _Scan:
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{folder}: nlm folder does not exist; pass the unzipped NLM folder, "
                         "e.g. ChinaSet_AllFiles/ or MontgomerySet/")
    if not folder.is_dir():
        hint = "unzip it first and pass the folder" if folder.suffix.lower() == ".zip" else "pass the folder it is in"
        raise ValueError(f"{folder}: nlm must be a folder, this is a file; {hint}")
    mask_part = next((p for p in folder.resolve().parts if p.lower() in MASK_FOLDERS), None)
    if mask_part is not None:
        raise ValueError(f"{folder}: this is inside the lung-mask folder {mask_part}/, not X-rays; "
                         "pass the data set's top folder, e.g. MontgomerySet/")
    images: list[NlmImage] = []
    not_xray_folders = 0
    other_files: list[Path] = []
    visited: set[str] = set()
    # followlinks: a download may be linked in from another drive; `visited` stops a link loop.
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .Trash: not part of the download
        # Judge only the folders BELOW the --nlm folder, so a user's own folder name can never hide the data.
        below_masks = any(_holds_no_xrays(part) for part in Path(root).relative_to(folder).parts)
        for name in sorted(names):
            path = Path(root) / name
            match = NLM_NAME.match(name)
            if below_masks:
                not_xray_folders += 1
            elif match is None or not path.is_file():
                other_files.append(path)
            else:
                images.append(NlmImage(path, SOURCES[match[1].upper()], LABELS[match[2]]))
    images.sort(key=lambda image: (image.path.name.casefold(), str(image.path)))
    return _Scan(images, not_xray_folders, other_files)


def find_nlm_images(folder: str | Path) -> list[NlmImage]:
    """Every NLM chest X-ray below `folder`, sorted by file name; lung masks and clinical readings left out.

    The same name can appear twice (say an archive unzipped twice); `prepare` checks those.
    """
    return _scan(folder).images


def _one_per_name(images: Iterable[NlmImage]) -> tuple[list[NlmImage], list[tuple[Path, Path]]]:
    """Keep the first image of each file name; return (images, [(kept, dropped)] for same-bytes repeats).

    One file reached twice (overlapping --nlm folders) is dropped silently; different bytes under one name raise.
    """
    first: dict[str, NlmImage] = {}
    repeats: list[tuple[Path, Path]] = []
    for image in images:
        key = image.path.name.casefold()  # one name on a case-insensitive output file system
        if key not in first:
            first[key] = image
            continue
        kept = first[key].path
        if os.path.samefile(kept, image.path):
            continue
        if not filecmp.cmp(kept, image.path, shallow=False):
            raise ValueError(f"{image.path.name} is found twice with different content: {kept} and {image.path}; "
                             "keep the right one (not a lung mask) and remove the other, or pass only one folder")
        repeats.append((kept, image.path))
    return sorted(first.values(), key=lambda image: image.path.name.casefold()), repeats


def _choose_holdout(images: list[NlmImage], holdout: int, random_seed: int) -> set[str]:
    """File names of `holdout` images per class, drawn without replacement by a seeded generator.

    The candidates are sorted by name first, so the same download, holdout and random_seed give the same choice
    on every machine, whatever order the file system lists files in.
    """
    rng = np.random.default_rng(random_seed)
    chosen: set[str] = set()
    for label in CLASSES:
        names = sorted((image.path.name for image in images if image.label == label), key=str.casefold)
        if holdout >= len(names):
            raise ValueError(f"holdout {holdout}: only {len(names)} {label} images were found and at least one "
                             "must stay for training; use a smaller holdout")
        picks = rng.choice(len(names), size=holdout, replace=False)  # (holdout,) distinct indices
        chosen.update(names[k] for k in picks)
    return chosen


def _check_folders(nlm_dirs: list[Path], output: Path, holdout_dir: Path | None) -> None:
    """The output must neither be in a source (a second run would find it as more X-rays) nor hold one."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: output is a file; pass a folder name (it is created)")
    written = [("output", output)] + ([("holdout_dir", holdout_dir)] if holdout_dir is not None else [])
    for flag, folder in written:
        resolved = folder.resolve()
        for nlm in nlm_dirs:
            source = nlm.resolve()
            if resolved == source or source in resolved.parents:
                raise ValueError(f"{folder}: {flag} is inside the NLM folder nlm={nlm}; a later run would take the "
                                 "output for more X-rays; choose a folder outside it")
            if resolved in source.parents:
                raise ValueError(f"{folder}: {flag} contains the NLM folder nlm={nlm}; retrain would take "
                                 f"{source.name}/ for a class; choose a folder beside it instead")
    if holdout_dir is not None:
        a, b = output.resolve(), holdout_dir.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(f"{holdout_dir}: holdout_dir overlaps output={output}; held-out images must stay "
                             "out of the training folder; choose a folder beside it")


def _same_file(source: Path, target: Path) -> bool:
    """Is `target` already `source`: a hard link to it, a symbolic link to it, or an identical copy?"""
    try:
        if os.path.samefile(source, target):
            return True
    except OSError:
        return False  # a broken symbolic link
    # shallow: same size and modification time (copy2 keeps it) is enough; otherwise the bytes are compared.
    return target.is_file() and filecmp.cmp(source, target, shallow=True)


def _check_targets(plan: list[tuple[Path, Path]], folders: list[Path]) -> None:
    """Raise before writing anything if a target is taken or an earlier run placed an image elsewhere."""
    target_of = {source.name.casefold(): target for source, target in plan}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            target = target_of.get(entry.name.casefold())
            if target is not None and target.parent != folder:
                raise ValueError(
                    f"{entry}: this run puts {entry.name} in {target.parent}; an earlier run (another holdout or "
                    "random_seed?) put it here, and keeping both mixes held-out and training images; "
                    "delete the output folders and run again")
    for source, target in plan:
        if os.path.lexists(target) and not _same_file(source, target):
            raise ValueError(f"{target}: already exists and is a different file from {source}; "
                             "remove it or choose another output")


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy via a hidden temporary file and a rename, so an interrupted run never leaves half an image."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        shutil.copy2(source, temporary)  # bytes, permissions and modification time
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _place(source: Path, target: Path, copy: bool) -> str:
    """Put `source` at `target`; return how: "already there", "hard link", "symbolic link" or "copy"."""
    if os.path.lexists(target):  # _check_targets made sure it is the same file
        is_link = target.is_symlink() or os.path.samefile(source, target)
        if not (copy and is_link):
            return "already there"
        target.unlink()  # copy=True after a run that linked: swap the link for a copy (the source is untouched)
    if not copy:
        try:
            os.link(source, target)
            return "hard link"
        except OSError:
            pass  # another file system (EXDEV), or one without hard links
        try:
            os.symlink(os.path.abspath(source), target)
            return "symbolic link"
        except OSError:
            pass  # e.g. Windows without the symbolic-link privilege
    _copy_atomically(source, target)
    return "copy"


_PLURAL = {"already there": "already there", "hard link": "hard links", "symbolic link": "symbolic links",
           "copy": "copies"}


def _describe(how: Counter) -> str:
    """Counter({"hard link": 800}) -> "hard links"; mixed kinds -> "790 already there, 10 hard links"."""
    if len(how) == 1:
        return _PLURAL[next(iter(how))]
    return ", ".join(f"{n} {_PLURAL[kind] if n != 1 else kind}" for kind, n in sorted(how.items()))


def _count(images: Iterable[NlmImage]) -> dict[str, int]:
    counts = Counter(image.label for image in images)
    return {label: counts[label] for label in CLASSES}


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[label]} {label}" for label in CLASSES)


def prepare(nlm_dirs: Iterable[str | Path] | str | Path, output: str | Path, holdout: int = 0,
            holdout_dir: str | Path | None = None, copy: bool = False, random_seed: int = 0,
            log: Callable[[str], None] = print) -> dict:
    """Place every NLM X-ray below `nlm_dirs` in output/normal or output/abnormal (and holdout_dir/...).

    holdout: images per class set aside in holdout_dir (default: <output>_holdout), chosen with random_seed.
    Returns {"output", "holdout_dir", "counts", "holdout_counts", "sources", "skipped", "how"}, where counts are
    {"normal": n, "abnormal": n}, sources {"Shenzhen": counts, ...} and how {"hard link": n, "copy": n, ...}.
    """
    if isinstance(nlm_dirs, (str, os.PathLike)):
        nlm_dirs = [nlm_dirs]
    nlm_dirs = [Path(folder) for folder in nlm_dirs]
    if not nlm_dirs:
        raise ValueError("nlm: no folder given; pass the unzipped ChinaSet_AllFiles/ and/or MontgomerySet/")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)) or holdout < 0:
        raise ValueError(f"holdout {holdout!r}: must be a whole number of images per class, 0 or more")
    output = Path(output)
    if holdout == 0 and holdout_dir is not None:
        raise ValueError(f"holdout_dir {holdout_dir}: given without holdout=N; say how many images per class "
                         "to hold out")
    absolute = Path(os.path.abspath(output))  # "lungs" -> "lungs_holdout"; "." -> "<cwd name>_holdout"
    default_holdout_dir = output.with_name(output.name + "_holdout") if output.name else \
        absolute.with_name(absolute.name + "_holdout")
    if holdout > 0 and holdout_dir is None:
        holdout_dir = default_holdout_dir
    holdout_dir = Path(holdout_dir) if holdout_dir is not None else None
    _check_folders(nlm_dirs, output, holdout_dir)

    # 1. Find the X-rays.
    found: list[NlmImage] = []
    not_xray_folders = 0
    other_files: list[Path] = []
    for folder in nlm_dirs:
        scan = _scan(folder)
        if not scan.images:
            extra = f"; skipped {len(scan.other_files)} other files, e.g. {scan.other_files[0].name}" \
                if scan.other_files else ""
            raise ValueError(f"{folder}: no NLM chest X-ray PNG found; expected names like {EXPECTED_NAMES}{extra}")
        found += scan.images
        not_xray_folders += scan.not_xray_folders
        other_files += scan.other_files
    images, repeats = _one_per_name(found)
    sources = {}
    for prefix, source in SOURCES.items():
        of_source = [image for image in images if image.source == source]
        if of_source:
            sources[source] = _count(of_source)
            log(f"{source} ({prefix}): {_counts_text(sources[source])}")
    skipped = not_xray_folders + len(other_files)
    if skipped:
        parts = [f"{not_xray_folders} in lung-mask / clinical-reading folders"] if not_xray_folders else []
        if other_files:
            names = sorted({path.name for path in other_files}, key=lambda name: (name.startswith("."), name))
            examples = ", ".join(names[:3])  # visible names first: they tell the user more than ._ files
            parts.append(f"{len(other_files)} not named like an NLM X-ray (e.g. {examples})")
        log(f"Skipped {skipped} files: " + ", ".join(parts))
    if repeats:
        log(f"Used once: {len(repeats)} file names found twice with the same content "
            f"(e.g. {repeats[0][0]} and {repeats[0][1]})")
    for label in CLASSES:
        if not any(image.label == label for image in images):
            log(f"WARNING: no {label} images found; retrain needs images of both classes")

    # 2. Plan where each one goes, check it all, then write.
    held_out = _choose_holdout(images, holdout, random_seed) if holdout > 0 else set()
    plan = [(image.path, (holdout_dir if image.path.name in held_out else output) / image.label / image.path.name)
            for image in images]
    class_folders = [root / label for root in [output] + ([holdout_dir] if holdout_dir else []) for label in CLASSES]
    # Without a holdout now, a holdout folder left by an earlier run must not hold images this run trains on.
    earlier_holdout = [] if holdout_dir else [default_holdout_dir / label for label in CLASSES]
    _check_targets(plan, class_folders + earlier_holdout)
    for folder in class_folders:
        folder.mkdir(parents=True, exist_ok=True)
    how_training: Counter = Counter()
    how_holdout: Counter = Counter()
    for source, target in plan:
        how = _place(source, target, copy)
        (how_holdout if target.parent.parent == holdout_dir else how_training)[how] += 1

    counts = _count(image for image in images if image.path.name not in held_out)
    log(f"Wrote {output}{os.sep}: {_counts_text(counts)} ({_describe(how_training)})")
    holdout_counts = _count(image for image in images if image.path.name in held_out)
    if held_out:
        log(f"Held out {holdout_dir}{os.sep}: {_counts_text(holdout_counts)} ({_describe(how_holdout)}); "
            "never train on these, label them after retraining")
    log(f"Next: mini_retrain retrain --image_dir {output}")
    return {"output": output, "holdout_dir": holdout_dir, "counts": counts,
            "holdout_counts": holdout_counts if held_out else None, "sources": sources, "skipped": skipped,
            "how": dict(how_training + how_holdout)}
