"""Tests for mini_retrain.commands.prepare on a FAKE NLM download built here (tiny PNGs, the real folder layout).

Expected counts come from the tree the test builds, never from running prepare: the label of a name is read off its
last digit by hand below, and the skipped count is the number of non-X-ray files the builder wrote.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.commands.prepare import NlmImage, find_nlm_images, prepare

SHENZHEN = {**{f"CHNCXR_{i:04d}_0.png": "normal" for i in range(1, 7)},  # 6 normal
            **{f"CHNCXR_{i:04d}_1.png": "abnormal" for i in range(327, 332)}}  # 5 abnormal
MONTGOMERY = {**{f"MCUCXR_{i:04d}_0.png": "normal" for i in (1, 2, 3, 5)},  # 4 normal
              **{f"MCUCXR_{i:04d}_1.png": "abnormal" for i in (4, 6, 8)}}  # 3 abnormal
ALL = {**SHENZHEN, **MONTGOMERY}
# Files that are not X-rays, written by make_nlm: one clinical reading per X-ray (11 + 7), a left and a right lung
# mask per Montgomery X-ray (7 + 7), and four stray files (Thumbs.db, .DS_Store, the ReadMe, a macOS "._" file).
IN_MASK_OR_READING_FOLDERS = 11 + 7 + 7 + 7
STRAY = 4


def write_png(path: Path, grey: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 3), grey).save(path)


def make_nlm(root: Path) -> tuple[Path, Path]:
    """The two downloads as NLM's zips unpack them; returns (ChinaSet_AllFiles, MontgomerySet)."""
    china, montgomery = root / "ChinaSet_AllFiles", root / "MontgomerySet"
    for grey, name in enumerate(SHENZHEN):
        write_png(china / "CXR_png" / name, grey)
        (china / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (china / "ClinicalReadings" / name.replace(".png", ".txt")).write_text("male 35yrs\nnormal\n")
    for grey, name in enumerate(MONTGOMERY, start=100):
        write_png(montgomery / "CXR_png" / name, grey)
        write_png(montgomery / "ManualMask" / "leftMask" / name, 255)  # same names, different pictures
        write_png(montgomery / "ManualMask" / "rightMask" / name, 254)
        (montgomery / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (montgomery / "ClinicalReadings" / name.replace(".png", ".txt")).write_text("Patient's Sex: F\n")
    (china / "CXR_png" / "Thumbs.db").write_bytes(b"\0" * 10)
    (china / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"PK\3\4")
    (montgomery / "CXR_png" / ".DS_Store").write_bytes(b"\0")
    (china / "__MACOSX").mkdir()
    (china / "__MACOSX" / "._CHNCXR_0001_0.png").write_bytes(b"\0\5\26\7")
    return china, montgomery


@pytest.fixture
def nlm(tmp_path) -> tuple[Path, Path]:
    return make_nlm(tmp_path / "downloads")


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def run(nlm_dirs, output, **options) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return prepare(nlm_dirs, output, log=lines.append, **options), lines


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below folder: its bytes and modification time, to show prepare never changes a source."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- finding the X-rays

def test_find_nlm_images_labels_sources_and_no_masks(nlm):
    china, montgomery = nlm
    found = find_nlm_images(montgomery)
    assert all(isinstance(image, NlmImage) for image in found)
    assert {image.path.name: image.label for image in found} == MONTGOMERY
    assert {image.source for image in found} == {"Montgomery"}
    assert all(image.path.parent == montgomery / "CXR_png" for image in found)  # never ManualMask/...
    assert len(found) == len(MONTGOMERY)  # the masks' identical names did not add entries
    shenzhen = find_nlm_images(china)
    assert {image.path.name: (image.source, image.label) for image in shenzhen} == \
        {name: ("Shenzhen", label) for name, label in SHENZHEN.items()}


@pytest.mark.parametrize("name", ["CHNCXR_0001_2.png", "CHNCXR_0001_0_mask.png", "CHNCXR_0001_0.png.txt",
                                  "CHNCXR_0001_0.jpg", "XCHNCXR_0001_0.png", "CHNCXR_0001.png", "CHNCXR_abcd_0.png",
                                  "JPCLN001.png", "._MCUCXR_0001_0.png"])
def test_other_names_are_not_xrays(tmp_path, name):
    write_png(tmp_path / "set" / "CXR_png" / "CHNCXR_0009_1.png", 1)
    (tmp_path / "set" / "CXR_png" / name).write_bytes(b"\x89PNG\r\n\x1a\n not an NLM X-ray")
    assert [image.path.name for image in find_nlm_images(tmp_path / "set")] == ["CHNCXR_0009_1.png"]


def test_any_mask_folder_is_ignored_but_the_users_own_folder_name_is_not(tmp_path):
    root = tmp_path / "unmasked_downloads"  # contains "mask", yet it is the user's folder, above --nlm's content
    write_png(root / "CXR_png" / "chncxr_0002_0.PNG", 1)  # case of the name does not matter
    write_png(root / "Masks" / "CHNCXR_0003_1.png", 2)  # a Shenzhen mask set unpacked beside it
    write_png(root / "ClinicalReadings" / "CHNCXR_0004_1.png", 3)
    found = find_nlm_images(root)
    assert [(i.path.name, i.source, i.label) for i in found] == [("chncxr_0002_0.PNG", "Shenzhen", "normal")]


def test_a_mask_folder_passed_directly_is_an_error(nlm):
    with pytest.raises(ValueError, match="inside the lung-mask folder ManualMask/, not X-rays"):
        prepare([nlm[1] / "ManualMask" / "leftMask"], nlm[1].parent.parent / "lungs", log=lambda line: None)


# ---------------------------------------------------------------------------------------------- layout and counts

def test_prepare_layout_counts_and_log(nlm, tmp_path):
    china, montgomery = nlm
    before = snapshot(tmp_path / "downloads")
    output = tmp_path / "lungs"
    result, lines = run([china, montgomery], output)

    normal = {name for name, label in ALL.items() if label == "normal"}
    abnormal = {name for name, label in ALL.items() if label == "abnormal"}
    assert names_in(output) == {"normal", "abnormal"}
    assert names_in(output / "normal") == normal and names_in(output / "abnormal") == abnormal
    assert result["counts"] == {"normal": 10, "abnormal": 8}
    assert result["sources"] == {"Shenzhen": {"normal": 6, "abnormal": 5}, "Montgomery": {"normal": 4, "abnormal": 3}}
    assert result["skipped"] == IN_MASK_OR_READING_FOLDERS + STRAY
    assert result["holdout_dir"] is None and not (tmp_path / "lungs_holdout").exists()
    assert lines[0] == "Shenzhen (CHNCXR): 6 normal, 5 abnormal"
    assert lines[1] == "Montgomery (MCUCXR): 4 normal, 3 abnormal"
    assert lines[2].startswith(f"Skipped {IN_MASK_OR_READING_FOLDERS + STRAY} files: "
                               f"{IN_MASK_OR_READING_FOLDERS} in lung-mask / clinical-reading folders, {STRAY} not")
    assert "Thumbs.db" in lines[2]
    assert f"Wrote {output}{os.sep}: 10 normal, 8 abnormal (hard links)" in lines

    # Each output is the source X-ray itself (a hard link), never a mask; the download is unchanged.
    for target in output.rglob("*.png"):
        source = (china if target.name.startswith("CHNCXR") else montgomery) / "CXR_png" / target.name
        assert os.path.samefile(source, target) and not target.is_symlink()
        assert source.stat().st_nlink == 2
    assert snapshot(tmp_path / "downloads") == before


def test_rerun_is_idempotent(nlm, tmp_path):
    output = tmp_path / "lungs"
    written = [output, tmp_path / "lungs_holdout"]
    run(nlm, output, holdout=1)
    first = {str(p): p.stat().st_ino for folder in written for p in folder.rglob("*")}
    assert len(first) == 4 + len(ALL)  # four class folders and every X-ray
    result, lines = run(nlm, output, holdout=1)
    assert result["how"] == {"already there": len(ALL)}
    assert f"Wrote {output}{os.sep}: 9 normal, 7 abnormal (already there)" in lines
    again = {str(p): p.stat().st_ino for folder in written for p in folder.rglob("*")}
    assert again == first  # nothing added, nothing replaced
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_copy_makes_real_copies_and_replaces_earlier_links(nlm, tmp_path):
    china, montgomery = nlm
    output = tmp_path / "lungs"
    run(nlm, output)  # hard links first
    result, lines = run(nlm, output, copy=True)
    assert result["how"] == {"copy": len(ALL)}
    assert f"Wrote {output}{os.sep}: 10 normal, 8 abnormal (copies)" in lines
    for target in output.rglob("*.png"):
        source = (china if target.name.startswith("CHNCXR") else montgomery) / "CXR_png" / target.name
        assert not target.is_symlink() and not os.path.samefile(source, target)
        assert target.read_bytes() == source.read_bytes()
        assert source.stat().st_nlink == 1 and target.stat().st_nlink == 1
    result, _ = run(nlm, output, copy=True)  # copies are recognised as the same file
    assert result["how"] == {"already there": len(ALL)}


def test_symbolic_links_when_hard_links_fail_then_copies(nlm, tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    output = tmp_path / "lungs"
    result, lines = run(nlm, output)
    assert result["how"] == {"symbolic link": len(ALL)}
    assert f"Wrote {output}{os.sep}: 10 normal, 8 abnormal (symbolic links)" in lines
    target = output / "normal" / "MCUCXR_0001_0.png"
    assert target.is_symlink() and os.path.isabs(os.readlink(target))
    assert Path(os.readlink(target)) == nlm[1].resolve() / "CXR_png" / "MCUCXR_0001_0.png"

    def no_symbolic_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symbolic_links)
    result, _ = run(nlm, tmp_path / "lungs2")
    assert result["how"] == {"copy": len(ALL)}
    assert not any(p.is_symlink() for p in (tmp_path / "lungs2").rglob("*"))


def test_a_different_file_at_a_target_is_an_error_and_nothing_is_written(nlm, tmp_path):
    output = tmp_path / "lungs"
    stranger = output / "normal" / "CHNCXR_0001_0.png"
    write_png(stranger, 7)
    payload = stranger.read_bytes()
    with pytest.raises(ValueError, match="CHNCXR_0001_0.png: already exists and is a different file"):
        run(nlm, output)
    assert stranger.read_bytes() == payload
    assert names_in(output) == {"normal"} and names_in(output / "normal") == {"CHNCXR_0001_0.png"}


# ---------------------------------------------------------------------------------------------- holdout

def test_holdout_counts_disjoint_and_deterministic(nlm, tmp_path):
    result, lines = run(nlm, tmp_path / "a" / "lungs", holdout=2, random_seed=5)
    holdout_dir = tmp_path / "a" / "lungs_holdout"
    assert result["holdout_dir"] == holdout_dir
    assert result["counts"] == {"normal": 8, "abnormal": 6}
    assert result["holdout_counts"] == {"normal": 2, "abnormal": 2}
    assert f"Held out {holdout_dir}{os.sep}: 2 normal, 2 abnormal (hard links); " \
           "never train on these, label them after retraining" in lines
    for label in ("normal", "abnormal"):
        training, held = names_in(tmp_path / "a" / "lungs" / label), names_in(holdout_dir / label)
        assert len(held) == 2 and not training & held
        assert training | held == {name for name, lab in ALL.items() if lab == label}

    # Same download, N and seed -> the same images, even through another output folder.
    run(nlm, tmp_path / "b" / "lungs", holdout=2, random_seed=5)
    assert names_in(tmp_path / "b" / "lungs_holdout" / "normal") == names_in(holdout_dir / "normal")
    assert names_in(tmp_path / "b" / "lungs_holdout" / "abnormal") == names_in(holdout_dir / "abnormal")
    # The seed matters: over 8 seeds, more than one choice comes out (C(10,2) * C(8,2) = 1260 possible choices).
    choices = set()
    for seed in range(8):
        out = tmp_path / f"seed{seed}" / "lungs"
        run(nlm, out, holdout=2, random_seed=seed)
        choices.add(frozenset(names_in(out.with_name("lungs_holdout") / "normal")))
    assert len(choices) > 1


def test_holdout_dir_flag_and_bad_holdouts(nlm, tmp_path):
    result, _ = run(nlm, tmp_path / "lungs", holdout=1, holdout_dir=tmp_path / "kept_for_label")
    assert len(names_in(tmp_path / "kept_for_label" / "normal")) == 1
    assert len(names_in(tmp_path / "kept_for_label" / "abnormal")) == 1
    with pytest.raises(ValueError, match="only 8 abnormal images"):
        run(nlm, tmp_path / "x", holdout=8)
    with pytest.raises(ValueError, match="^holdout -1"):
        run(nlm, tmp_path / "x", holdout=-1)
    with pytest.raises(ValueError, match="without holdout=N"):
        run(nlm, tmp_path / "x", holdout_dir=tmp_path / "y")
    with pytest.raises(ValueError, match="holdout_dir overlaps output="):
        run(nlm, tmp_path / "x", holdout=1, holdout_dir=tmp_path / "x" / "held")


def test_changing_the_holdout_on_a_rerun_is_an_error_not_a_leak(nlm, tmp_path):
    output = tmp_path / "lungs"
    run(nlm, output, holdout=2)
    with pytest.raises(ValueError, match="keeping both mixes held-out and training images"):
        run(nlm, output, holdout=3)  # at least one more image per class must move out of lungs/
    with pytest.raises(ValueError, match="lungs_holdout"):
        run(nlm, output)  # no holdout now: the held-out images would also be trained on
    assert sum(len(names_in(output / label)) for label in ("normal", "abnormal")) == len(ALL) - 4


@pytest.fixture(scope="module")
def shared_nlm(tmp_path_factory) -> tuple[Path, Path]:
    return make_nlm(tmp_path_factory.mktemp("shared") / "downloads")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(holdout=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), copy=st.booleans())
def test_every_image_lands_once_in_its_class(shared_nlm, holdout, seed, copy):
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "lungs"
        result, _ = run(shared_nlm, output, holdout=holdout, random_seed=seed, copy=copy)
        folders = [output] + ([Path(scratch) / "lungs_holdout"] if holdout else [])
        placed = [(folder.name, p.parent.name, p.name) for folder in folders for p in folder.rglob("*.png")]
        assert sorted(name for _, _, name in placed) == sorted(ALL)  # every X-ray exactly once
        for _, label, name in placed:
            assert label == ("normal" if name.endswith("_0.png") else "abnormal")  # label read off the name
        held = [label for folder, label, _ in placed if folder == "lungs_holdout"]
        assert held.count("normal") == held.count("abnormal") == holdout
        assert sum(result["counts"].values()) == len(ALL) - 2 * holdout


# ---------------------------------------------------------------------------------------------- duplicates, errors

def test_duplicate_names(nlm, tmp_path):
    china, montgomery = nlm
    # The same folder reached twice (overlapping --nlm) counts once, silently.
    result, lines = run([montgomery.parent, montgomery], tmp_path / "a")
    assert result["sources"]["Montgomery"] == {"normal": 4, "abnormal": 3}
    assert not any(line.startswith("Used once") for line in lines)
    # A second copy with the same bytes is used once and reported.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "MCUCXR_0001_0.png").write_bytes((montgomery / "CXR_png" / "MCUCXR_0001_0.png").read_bytes())
    result, lines = run([montgomery, extra], tmp_path / "b")
    assert result["counts"] == {"normal": 4, "abnormal": 3}
    assert any(line.startswith("Used once: 1 file names found twice") for line in lines)
    # Different bytes under one name (a mask in disguise?) are an error naming both files.
    write_png(extra / "MCUCXR_0001_0.png", 255)
    with pytest.raises(ValueError, match="MCUCXR_0001_0.png is found twice with different content") as error:
        run([montgomery, extra], tmp_path / "c")
    assert str(extra / "MCUCXR_0001_0.png") in str(error.value)
    assert not (tmp_path / "c").exists()


def test_folder_errors(nlm, tmp_path):
    china, _ = nlm
    with pytest.raises(ValueError, match="does not exist"):
        run([tmp_path / "nowhere"], tmp_path / "lungs")
    (tmp_path / "ChinaSet_AllFiles.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unzip it first"):
        run([tmp_path / "ChinaSet_AllFiles.zip"], tmp_path / "lungs")
    with pytest.raises(ValueError, match="output is inside the NLM folder nlm="):
        run([china], china / "lungs")
    with pytest.raises(ValueError, match="output contains the NLM folder nlm="):
        run([china], china.parent)
    empty = tmp_path / "not_nlm"
    write_png(empty / "image.png", 1)
    (empty / "Thumbs.db").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"no NLM chest X-ray PNG found; expected names like CHNCXR_0001_0\.png"):
        run([china, empty], tmp_path / "lungs")
    assert not (tmp_path / "lungs").exists()  # checked before writing


def test_numpy_choice_is_the_documented_draw(nlm, tmp_path):
    """The holdout is numpy's seeded draw without replacement from the names sorted per class (normal first)."""
    result, _ = run(nlm, tmp_path / "lungs", holdout=3, random_seed=11)
    rng = np.random.default_rng(11)
    for label in ("normal", "abnormal"):
        names = sorted(name for name, lab in ALL.items() if lab == label)
        expected = {names[k] for k in rng.choice(len(names), size=3, replace=False)}
        assert names_in(tmp_path / "lungs_holdout" / label) == expected


# ---------------------------------------------------------------------------------------------- command line

def test_cli_prints_the_counts_and_exits_0(nlm, tmp_path, capsys):
    china, montgomery = nlm
    output = tmp_path / "lungs"
    code = main(["prepare", "--nlm", str(china), str(montgomery), "--output", str(output), "--holdout", "1",
                 "--random_seed", "3", "--copy"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Shenzhen (CHNCXR): 6 normal, 5 abnormal\n" in out
    assert "Montgomery (MCUCXR): 4 normal, 3 abnormal\n" in out
    assert f"Wrote {output}{os.sep}: 9 normal, 7 abnormal (copies)\n" in out
    assert f"Held out {tmp_path / 'lungs_holdout'}{os.sep}: 1 normal, 1 abnormal (copies)" in out
    assert not any(p.is_symlink() or p.stat().st_nlink > 1 for p in output.rglob("*.png"))


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    code = main(["prepare", "--nlm", str(tmp_path / "missing"), "--output", str(tmp_path / "lungs")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mini_retrain: error: ") and err.count("\n") == 1
    assert str(tmp_path / "missing") in err


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--nlm", "--output", "--holdout", "--holdout_dir", "--copy", "--random_seed"):
        assert flag in text
    assert "(default: lungs)" in " ".join(text.split())  # argparse wraps lines
