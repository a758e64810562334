"""Find the labelled images: one subfolder of `image_dir` per class, its name the label (retrain.py's create_image_lists).

    lungs/
      abnormal/  CHNCXR_0327_1.png ...
      normal/    CHNCXR_0001_0.png ...

Labels are the folder names as retrain.py writes them: lower case, every run of characters other than a-z and 0-9
turned into one space ("Pleural_Effusion" -> "pleural effusion"). Images are found by extension (.jpg, .jpeg, .png,
.dcm, in any case) in ONE listing of each folder, so a file is never counted twice (retrain.py globbed "*.jpg" and
"*.JPG" separately, which found every file twice on a case-insensitive file system); hidden files (".DS_Store", "._x.jpg") are
ignored. Paths are kept relative to image_dir, with "/" separators, so the split does not depend on where the folder
lives.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mini_retrain.pipeline.images import IMAGE_EXTENSIONS

MIN_IMAGES_PER_CLASS = 20  # retrain.py warns below this


def label_for_folder(folder_name: str) -> str:
    """retrain.py's label rule: lower-case, runs of non-alphanumerics become one space."""
    return re.sub(r"[^a-z0-9]+", " ", folder_name.lower()).strip()


def find_images(image_dir: str | Path, min_classes: int = 2) -> tuple[dict[str, list[str]], list[str]]:
    """Return ({label: [relative paths, sorted]}, warnings), labels sorted; raise ValueError on a structure problem.

    Images may sit in nested folders inside a class folder; all of them belong to that class. Training needs two
    classes at least; `evaluate` accepts a folder of one (min_classes=1), e.g. a hospital's tuberculosis films only.
    """
    image_dir = Path(image_dir)
    if not image_dir.exists():
        raise ValueError(f"{image_dir}: image_dir does not exist; pass a folder with one subfolder per class")
    if not image_dir.is_dir():
        raise ValueError(f"{image_dir}: image_dir is not a folder; pass the folder that holds one subfolder per class")
    class_folders = sorted((p for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=lambda p: (label_for_folder(p.name), p.name))  # class index order = label order
    if not class_folders:
        raise ValueError(f"{image_dir}: no class subfolders; put each class's images in its own subfolder, e.g. normal/ and abnormal/")

    image_lists: dict[str, list[str]] = {}
    folder_of_label: dict[str, str] = {}
    warnings: list[str] = []
    for folder in class_folders:
        label = label_for_folder(folder.name)
        if not label:
            raise ValueError(f"{folder}: the folder name has no letters or digits to make a label from; rename it")
        if label in image_lists:
            raise ValueError(
                f"{image_dir}: folders '{folder_of_label[label]}' and '{folder.name}' both give the label '{label}'; "
                "merge or rename one"
            )
        files = _image_files(folder, image_dir)
        if not files:
            raise ValueError(f"{folder}: no images (.jpg, .jpeg, .png, .dcm); add images or remove the folder")
        image_lists[label] = files
        folder_of_label[label] = folder.name
    small = [f"{folder_of_label[label]} ({len(files)})" for label, files in image_lists.items()
             if len(files) < MIN_IMAGES_PER_CLASS]
    if small:  # retrain.py warned once per folder; one line says the same for all of them
        warnings.append(f"WARNING: {'Folder' if len(small) == 1 else 'Folders'} {', '.join(small)} "
                        f"{'has' if len(small) == 1 else 'have'} less than {MIN_IMAGES_PER_CLASS} images, "
                        "which may cause issues.")
    if len(image_lists) < min_classes:
        only = next(iter(image_lists))
        raise ValueError(
            f"{image_dir}: only one class ('{only}') was found; at least two class subfolders are needed to learn anything"
        )
    return image_lists, warnings


def _image_files(folder: Path, image_dir: Path) -> list[str]:
    """Image files under folder (recursively), relative to image_dir, each real file once, sorted."""
    found: list[str] = []
    seen_files: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root) / name
            try:
                stat = path.stat()
                identity = (stat.st_dev, stat.st_ino)
            except OSError:
                identity = None  # broken link or unreadable: kept, so the input check reports it by name
            if identity is not None and identity in seen_files:
                continue  # the same file reached twice (case-insensitive file system, hard link)
            if identity is not None:
                seen_files.add(identity)
            relative = path.relative_to(image_dir).as_posix()
            try:
                relative.encode("utf-8")  # the split hashes the UTF-8 name, as retrain.py did
            except UnicodeEncodeError:  # Python decodes such bytes to lone surrogates
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                raise ValueError(f"{shown}: the name is not valid UTF-8 (made on another system?); rename it, "
                                 "e.g. convmv -f latin1 -t utf8 -r --notest FOLDER") from None
            found.append(relative)
    return sorted(found)
