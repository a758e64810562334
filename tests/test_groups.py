"""Patient groups: --group_pattern keeps one patient's files in one split and one fold (hypothesis), and the warning
that says when file names look like one patient's films."""

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_retrain.cli import main
from mini_retrain.commands.crossval import assign_folds
from mini_retrain.core.split import SPLITS, group_of, hash_key, shared_id_warning, split_image_lists
from mini_retrain.pipeline.dataset import load_dataset
from mini_retrain.pipeline.image_lists import find_images
from mini_retrain.settings import RetrainSettings
from tests.conftest import DEMO_DATA

PATTERNS = ["p[0-9]+", "(p[0-9]+)_view", "^(p[0-9]+)"]


@st.composite
def patients(draw, min_groups: int = 1):
    """{label: ["<label>/p<patient>_view<k>.png", ...]}: each patient 1-4 films, in listing order drawn at random."""
    image_lists = {}
    for label in draw(st.lists(st.sampled_from(["normal", "tb", "other"]), min_size=1, max_size=3, unique=True)):
        ids = draw(st.lists(st.integers(0, 10**6), min_size=min_groups, max_size=25, unique=True))
        names = [f"{label}/p{i}_view{k}.png" for i in ids for k in range(draw(st.integers(1, 4)))]
        image_lists[label] = draw(st.permutations(names))
    return image_lists


def patient(path: str) -> tuple[str, str]:
    """(class folder, patient) of a generated name, read from how it was made."""
    folder, name = path.split("/")
    return folder, name.split("_")[0]


percentages = st.tuples(st.floats(0, 60), st.floats(0, 39.9))


@settings(max_examples=150, deadline=None)
@given(patients(), percentages, st.sampled_from(PATTERNS), st.randoms())
def test_no_patient_in_two_splits_and_listing_order_does_not_matter(image_lists, vt, pattern, rnd):
    splits, warnings = split_image_lists(image_lists, *vt, group_pattern=pattern)
    where: dict[tuple[str, str], set[str]] = {}
    for label, parts in splits.items():
        for split in SPLITS:
            for path in parts[split]:
                where.setdefault(patient(path), set()).add(split)
    assert all(len(found) == 1 for found in where.values())  # the small-class move takes whole patients too
    assert sum(len(parts[s]) for parts in splits.values() for s in SPLITS) == sum(map(len, image_lists.values()))
    assert not any("--group_pattern" in w for w in warnings)  # every name matches
    shuffled = {label: rnd.sample(paths, len(paths)) for label, paths in image_lists.items()}
    assert split_image_lists(shuffled, *vt, group_pattern=pattern) == (splits, warnings)


@settings(max_examples=100, deadline=None)
@given(patients(min_groups=5), st.integers(2, 5), st.sampled_from(PATTERNS), st.integers(0, 2**32 - 1), st.randoms())
def test_no_patient_in_two_folds_and_listing_order_does_not_matter(image_lists, folds, pattern, seed, rnd):
    labels = sorted(image_lists)
    files = [path for label in labels for path in image_lists[label]]
    classes = np.array([labels.index(path.split("/")[0]) for path in files])
    fold_of = assign_folds(files, classes, folds, np.random.default_rng(seed), group_pattern=pattern)
    fold_of_patient: dict[tuple[str, str], set[int]] = {}
    for path, fold in zip(files, fold_of):
        fold_of_patient.setdefault(patient(path), set()).add(int(fold))
    assert all(len(found) == 1 for found in fold_of_patient.values())
    order = rnd.sample(range(len(files)), len(files))
    again = assign_folds([files[i] for i in order], classes[order], folds, np.random.default_rng(seed),
                         group_pattern=pattern)
    assert {files[i]: int(f) for i, f in zip(order, again)} == {f: int(k) for f, k in zip(files, fold_of)}


@settings(max_examples=15, deadline=None)
@given(patients(min_groups=2), st.sampled_from(PATTERNS), st.sampled_from(["p1", "p7_view0", "person12", "data"]))
def test_moving_the_folder_changes_nothing(image_lists, pattern, parent):
    """The same files under two folders, one of whose names the pattern matches: the same splits and folds."""
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for root in (Path(scratch) / "a" / "images", Path(scratch) / parent / "moved" / parent):
            for paths in image_lists.values():
                for relative in paths:
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    (root / relative).write_bytes(b"")
            found, _ = find_images(root, min_classes=1)
            files = [path for label in sorted(found) for path in found[label]]
            classes = np.array([sorted(found).index(path.split("/")[0]) for path in files])
            folds = assign_folds(files, classes, 2, np.random.default_rng(0), group_pattern=pattern)
            results.append((split_image_lists(found, 10, 10, pattern), files, folds.tolist()))
    assert results[0] == results[1]


def test_hash_key_with_a_pattern_by_hand():
    name = "pneumonia/person1004_virus_1686.jpeg"
    assert hash_key(name, "person[0-9]+") == "pneumonia/person1004"
    assert hash_key(name, "(person[0-9]+)_") == "pneumonia/person1004"  # group 1, not the whole match
    assert hash_key("normal/NORMAL2-IM-1266-0001-0002.jpeg", "(person[0-9]+|IM-[0-9]+)") == "normal/IM-1266"
    assert hash_key(name, "IM-[0-9]+") == name  # no match: the file is its own group
    assert hash_key("normal/pat7_nohash_1.png", "IM-[0-9]+") == "normal/pat7"  # and _nohash_ still works
    assert group_of("abc.png", "x*") is None  # an empty match is no group
    assert hash_key(name) == name


@pytest.mark.parametrize("command", ["retrain", "crossval", "sweep"])
def test_a_bad_pattern_is_one_line_before_any_work(command, tmp_path, capsys):
    code = main([command, "--image_dir", str(tmp_path / "nowhere"), "--group_pattern", "(person[0-9]+",
                 "--output_json" if command != "retrain" else "--output_graph",
                 str(tmp_path / ("out.json" if command != "retrain" else "g.onnx"))])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "--group_pattern '(person[0-9]+' is not a regular expression (missing )" in error


def test_names_without_a_match_are_said_once():
    _, warnings = split_image_lists({"a": ["a/p1_x.png", "a/zz.png", "a/yy.png"], "b": ["b/p2_y.png"]}, 10, 10,
                                    group_pattern="p[0-9]+")
    said = [w for w in warnings if "--group_pattern" in w]
    assert said == ["WARNING: --group_pattern 'p[0-9]+' finds nothing in 2 of 4 file names (e.g. a/yy.png); "
                    "each of those is its own group"]


# ---------------------------------------------------------------- the warning without a pattern


def kermany_names(seed: int = 0) -> dict[str, list[str]]:
    """Names shaped like Kermany's: children with one to three films, and normal films IM-<patient>-<film>."""
    rng = random.Random(seed)
    pneumonia = [f"pneumonia/person{child}_{rng.choice(['bacteria', 'virus'])}_{rng.randrange(5000)}.jpeg"
                 for child in rng.sample(range(1, 2000), 60) for _ in range(rng.choice([1, 2, 3]))]
    normal = [f"normal/IM-{patient:04d}-0001.jpeg" for patient in rng.sample(range(1, 1000), 80)]
    return {"normal": sorted(set(normal)), "pneumonia": sorted(set(pneumonia))}


def test_the_warning_fires_on_kermany_names_and_its_pattern_groups_them():
    image_lists = kermany_names()
    warning = shared_id_warning(image_lists)
    assert warning is not None and warning.startswith("WARNING: file names share a leading ID (")
    pattern = re.search(r"--group_pattern '([^']+)'", warning).group(1)
    assert pattern == "(person[0-9]+)"  # the normal films here are one per patient: only the children are named
    two = re.search(r"e\.g\. (\S+) and (\S+)\.", warning).groups()
    assert two[0] != two[1] and two[0].split("_")[0] == two[1].split("_")[0]
    assert all(f"pneumonia/{name}" in image_lists["pneumonia"] for name in two)
    splits, _ = split_image_lists(image_lists, 10, 10, group_pattern=pattern)
    children = {}
    for split in SPLITS:
        for path in splits["pneumonia"][split]:
            children.setdefault(path.split("/")[1].split("_")[0], set()).add(split)
    assert all(len(found) == 1 for found in children.values())


def test_the_warning_on_kermany_normal_series_names():
    """NORMAL2-IM-1266-0001.jpeg and NORMAL2-IM-1266-0001-0001.jpeg: the constant NORMAL2 is no patient."""
    normal = [f"normal/NORMAL2-IM-{p:04d}-0001{suffix}.jpeg" for p in range(1000, 1040) for suffix in ("", "-0001")]
    warning = shared_id_warning({"normal": normal, "other": [f"other/{i}.png" for i in range(40)]})
    assert "--group_pattern '(NORMAL2-IM-[0-9]+)'" in warning
    assert "e.g. NORMAL2-IM-1000-0001-0001.jpeg and NORMAL2-IM-1000-0001.jpeg" in warning


@pytest.mark.parametrize("names", [
    [f"CHNCXR_{i:04d}_{int(i > 326)}.png" for i in range(1, 663)],  # Shenzhen: one patient per number
    [f"MCUCXR_{i:04d}_{i % 2}.png" for i in range(1, 139)],  # Montgomery
    [f"{i:04d}.png" for i in range(300)],
    [f"img_{i}.png" for i in range(300)],
    [f"IMG-{i:05d}.jpeg" for i in range(300)],
    [f"IM-{i:04d}-0001.jpeg" for i in range(300)],  # one film per patient
    [f"pat{i // 2}_nohash_{i % 2}.png" for i in range(300)],  # grouped already
    [f"1.2.840.113619.2.55.{i}.dcm" for i in range(300)],  # DICOM UIDs
], ids=["shenzhen", "montgomery", "0001", "img_1", "IMG-00001", "IM-0001-0001", "nohash", "dicom-uid"])
def test_the_warning_does_not_fire_on_one_patient_per_name(names):
    assert shared_id_warning({"a": [f"a/{n}" for n in names], "b": [f"b/{n}" for n in names[:50]]}) is None


def test_a_few_shared_names_are_not_many():
    """The demo's 8 pneumonia films hold one child twice: not enough to warn about (and the demo stays quiet)."""
    image_lists, _ = find_images(DEMO_DATA / "pneumonia-demo")
    assert shared_id_warning(image_lists) is None


def test_load_dataset_warns_once_without_a_pattern_and_not_with_one(tiny_backbone, tmp_path):
    image_dir = tmp_path / "kermany"
    sources = sorted((DEMO_DATA / "pneumonia-demo").glob("*/*.jpeg"))
    for number, source in enumerate(sources * 2):
        name = (f"normal/IM-{number:04d}-0001.jpeg" if source.parent.name == "normal"
                else f"pneumonia/person{number % 6}_bacteria_{number}.jpeg")
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image_dir / name)
    for pattern, expected in ((None, 1), ("(person[0-9]+|IM-[0-9]+)", 0)):
        lines = []
        dataset = load_dataset(RetrainSettings(image_dir=image_dir, backbone=tiny_backbone, device="cpu",
                                               bottleneck_dir=tmp_path / "cache", group_pattern=pattern), lines.append)
        said = [line for line in lines if "share a leading ID" in line]
        assert len(said) == expected
        if expected:
            assert "--group_pattern '(person[0-9]+)'" in said[0] and said[0].startswith("WARNING: ")
        else:
            split_of = {}
            for file, split in zip(dataset.files, dataset.splits):
                split_of.setdefault(hash_key(file, pattern), set()).add(str(split))
            assert all(len(found) == 1 for found in split_of.values())
