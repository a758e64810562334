"""Finding labelled images: retrain.py's folder and label rules, and clear errors for bad folder structures."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mini_retrain.pipeline.image_lists import find_images, label_for_folder


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("folder, label", [
    ("Normal", "normal"), ("Pleural_Effusion", "pleural effusion"), ("TB--positive 2", "tb positive 2"),
    ("abnormal", "abnormal"),
])
def test_label_rule_matches_retrain_py(folder, label):
    assert label_for_folder(folder) == label


@given(st.text(min_size=1, max_size=30))
def test_labels_are_lowercase_alphanumeric_words(name):
    label = label_for_folder(name)
    assert label == label.strip() and "  " not in label
    assert all(c.isascii() and (c.isalnum() or c == " ") and not c.isupper() for c in label)


def test_finds_images_by_extension_in_any_case_ignoring_hidden_and_other_files(tmp_path):
    for name in ["a.jpg", "b.JPG", "c.jpeg", "d.PNG", "e.dcm", ".DS_Store", "._a.jpg", "notes.txt", "sub/f.png"]:
        touch(tmp_path / "Normal" / name)
    touch(tmp_path / "abnormal" / "x.png")
    touch(tmp_path / ".hidden_class" / "y.png")
    image_lists, warnings = find_images(tmp_path)
    assert list(image_lists) == ["abnormal", "normal"]
    assert image_lists["normal"] == ["Normal/a.jpg", "Normal/b.JPG", "Normal/c.jpeg", "Normal/d.PNG", "Normal/e.dcm",
                                     "Normal/sub/f.png"]
    # One line for every small folder, not one per folder (the demo printed two).
    assert warnings == ["WARNING: Folders abnormal (1), Normal (6) have less than 20 images, which may cause issues."]


def test_hard_link_counted_once(tmp_path):
    touch(tmp_path / "a" / "one.png")
    (tmp_path / "a" / "two.png").hardlink_to(tmp_path / "a" / "one.png")
    touch(tmp_path / "b" / "x.png")
    image_lists, _ = find_images(tmp_path)
    assert len(image_lists["a"]) == 1


def test_no_warning_with_20_images(tmp_path):
    for label in ("a", "b"):
        for i in range(20):
            touch(tmp_path / label / f"{i}.png")
    assert find_images(tmp_path)[1] == []


@pytest.mark.parametrize("layout, message", [
    ({}, "no class subfolders"),
    ({"only/x.png": b"x"}, "only one class"),
    ({"a/x.png": b"x", "b/readme.txt": b"x"}, "no images"),
    ({"Normal/x.png": b"x", "normal/y.png": b"x"}, "both give the label 'normal'"),
])
def test_structure_problems_are_clear_errors(tmp_path, layout, message):
    for name, data in layout.items():
        touch(tmp_path / name, data)
    with pytest.raises(ValueError, match=message) as error:
        find_images(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_missing_and_non_folder_image_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        find_images(tmp_path / "nope")
    touch(tmp_path / "file.png")
    with pytest.raises(ValueError, match="not a folder"):
        find_images(tmp_path / "file.png")
