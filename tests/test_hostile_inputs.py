"""A hostile image folder through the real `mini_retrain retrain` (and `label`): nothing crashes, nothing is lost.

The folder is built here from the bundled demo X-rays plus every kind of bad file a clinic's export can contain.
Each bad file must give exactly one "Skipping <path>: <reason>" line and appear in the summary at the end; each good
file in an unusual format (PNG named .jpg, 12-bit data in a 16-bit PNG, DICOM) must be USED, and its bottleneck must
match the one of the JPEG it was made from (the expected pixels are worked out by hand below, so equal pixels must
give equal bottlenecks). Problems with the folder's structure or the output paths stop the run with exit code 2 and
one line, never a traceback.
"""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_retrain.cli import main
from mini_retrain.core.split import which_split
from tests.conftest import DEMO_DATA

XRAYS = DEMO_DATA / "pneumonia-demo"
NORMAL = sorted((XRAYS / "normal").glob("*.jpeg"))
PNEUMONIA = sorted((XRAYS / "pneumonia").glob("*.jpeg"))
PERCENTAGES = ["--testing_percentage", "25", "--validation_percentage", "25"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with its stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2
    assert "Traceback" not in out + err
    # stderr also holds the progress of bottleneck creation; apart from that, the error is the one and last line
    lines = [line for line in err.strip().splitlines() if not line.startswith("Creating bottlenecks: ")]
    assert len(lines) == 1 and lines[0].startswith("mini_retrain: error: "), err
    assert err.strip().splitlines()[-1] == lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def gray_pixels(path: Path) -> np.ndarray:
    """The 8-bit grey levels of a demo X-ray (they are all mode "L" JPEGs)."""
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height 8-bit grey, and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def write_dicom_cr(path: Path, gray: np.ndarray) -> None:
    """A computed-radiography DICOM as archives hold them: 12 bits stored in 16, MONOCHROME1 (larger = darker).

    Stored value s = (255 - v) * 16 for grey level v. With no window, read_dicom stretches min..max = 0..4080 to
    0..255, giving 255 - v, then MONOCHROME1 inverts it: exactly v again (every demo X-ray spans 0..255).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PhotometricInterpretation = "CR", "MONOCHROME1"
    dataset.Rows, dataset.Columns = gray.shape
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 1, 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = ((255 - gray.astype(np.uint16)) * 16).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def name_in_split(folder: str, stem: str, wanted: str) -> str:
    """The first name folder/<stem>_<i>.jpeg that the hash split puts in `wanted` (25% validation, 25% testing)."""
    return next(f"{folder}/{stem}_{i}.jpeg" for i in range(1000)
                if which_split(f"{folder}/{stem}_{i}.jpeg", 25, 25) == wanted)


@dataclasses.dataclass
class Corpus:
    """The hostile folder: what was put where, and what the program must say about each file."""

    image_dir: Path
    good: dict[str, Path]  # relative path -> the demo JPEG with the same pixels (or itself)
    bad: dict[str, str]  # relative path -> what the reason must say
    ignored: list[str]  # hidden files and other extensions: never mentioned
    sixteen_bit: str  # 12-bit data in a 16-bit PNG: close to its source, not equal
    conflict: tuple[str, str]  # identical files in two classes, same split
    leak: tuple[str, str]  # identical files in one class, two splits
    leak_splits: str  # "testing/training" (say): the two splits of the leak, sorted

    def counts(self) -> dict[str, int]:
        files = list(self.good) + [self.sixteen_bit] + list(self.bad)
        return {label: sum(f.startswith(label + "/") for f in files) for label in ("normal", "pneumonia")}


def make_corpus(root: Path) -> Corpus:
    image_dir = root / "images"
    good: dict[str, Path] = {}
    bad: dict[str, str] = {}

    def path(relative: str) -> Path:
        path = image_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def copy(source: Path, relative: str) -> None:
        shutil.copyfile(source, path(relative))
        good[relative] = source

    def rel(demo_file: Path) -> str:
        return f"{demo_file.parent.name}/{demo_file.name}"

    for source in NORMAL + PNEUMONIA:
        copy(source, rel(source))

    # Good files in unusual formats: the content decides the decoder.
    Image.fromarray(gray_pixels(NORMAL[1])).save(path("normal/really_a_png.jpg"), format="PNG")
    good["normal/really_a_png.jpg"] = NORMAL[1]
    # 12-bit data in a 16-bit PNG (Montgomery's format): value = 16 v. read_image scales by the 12 bits in use,
    # y = round(16 v * 255 / 4095), within one grey level of v; so the bottleneck must be close, not equal.
    sixteen = Image.fromarray((gray_pixels(NORMAL[3]).astype(np.uint16) * 16))
    assert sixteen.mode.startswith("I;16")
    sixteen.save(path("normal/röntgen 12 bit.png"))
    write_dicom_cr(path("pneumonia/scan.dcm"), gray_pixels(PNEUMONIA[0]))
    good["pneumonia/scan.dcm"] = PNEUMONIA[0]
    # chmod 000: unreadable for a normal user; root (as in CI) reads it anyway, and then it is a good image.
    unreadable = path("normal/unreadable.jpeg")
    unreadable.write_bytes(NORMAL[4].read_bytes() + b"\0")  # a trailing byte: other SHA-1, same pixels
    unreadable.chmod(0)
    try:
        unreadable.read_bytes()
        good["normal/unreadable.jpeg"] = NORMAL[4]
    except PermissionError:
        bad["normal/unreadable.jpeg"] = "permission denied"

    # Duplicates. A copy in the other class, in the same split as its original: a label conflict only.
    conflict = (name_in_split("normal", "conflict_copy", which_split(rel(PNEUMONIA[2]), 25, 25)), rel(PNEUMONIA[2]))
    copy(PNEUMONIA[2], conflict[0])
    # A copy in the same class, in another split: a data leak only.
    original_split = which_split(rel(PNEUMONIA[3]), 25, 25)
    other_split = "training" if original_split != "training" else "testing"
    leak = (name_in_split("pneumonia", "leak_copy", other_split), rel(PNEUMONIA[3]))
    copy(PNEUMONIA[3], leak[0])

    # Bad files: one "Skipping" line each.
    path("normal/empty.jpeg").write_bytes(b"")
    bad["normal/empty.jpeg"] = "empty file (0 bytes)"
    data = NORMAL[5].read_bytes()
    path("normal/truncated.jpeg").write_bytes(data[: len(data) // 3])
    bad["normal/truncated.jpeg"] = "truncated or corrupt image data"
    path("pneumonia/notes.png").write_text("Patient 7: follow-up in two weeks.\n")
    bad["pneumonia/notes.png"] = "not a recognised image"
    Image.new("LAB", (64, 64), (50, 0, 0)).save(path("pneumonia/lab_colour.png"), format="TIFF")
    bad["pneumonia/lab_colour.png"] = "unsupported pixel mode 'LAB'"
    path("normal/bomb.png").write_bytes(png_header_only(60000, 60000))
    bad["normal/bomb.png"] = "decompression bomb"
    Image.new("L", (4, 4)).save(path("normal/icon.png"))
    bad["normal/icon.png"] = "image is only 4x4 pixels"
    path("pneumonia/moved_away.jpeg").symlink_to(root / "no_such_file.jpeg")
    bad["pneumonia/moved_away.jpeg"] = "broken symbolic link"
    os.mkfifo(path("normal/pipe.png"))  # reading it would block forever
    bad["normal/pipe.png"] = "not a regular file"

    # Never looked at: hidden files and folders, other extensions.
    ignored = ["normal/.DS_Store", "normal/._NORMAL2-IM-1427-0001.jpeg", "pneumonia/.thumbs/small.jpeg",
               "normal/readme.txt"]
    for name in ignored:
        path(name).write_bytes(b"\0\1garbage")
    return Corpus(image_dir, good, bad, ignored, "normal/röntgen 12 bit.png", conflict, leak,
                  "/".join(sorted({original_split, other_split})))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, real_backbone_path):
    """The corpus, and one `retrain` run over it: (corpus, folder, exit code, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("hostile")
    corpus = make_corpus(folder)
    code, out, err = run_cli([
        "retrain", "--image_dir", corpus.image_dir, "--backbone", real_backbone_path, "--device", "cpu",
        "--bottleneck_dir", folder / "bottlenecks", "--output_graph", folder / "out" / "graph.onnx",
        "--output_labels", folder / "out" / "labels.txt", "--how_many_training_steps", "20", *PERCENTAGES])
    yield corpus, folder, code, out, err
    (corpus.image_dir / "normal" / "unreadable.jpeg").chmod(0o644)  # so pytest can delete it


def test_retrain_survives_the_hostile_folder(hostile):
    corpus, folder, code, out, err = hostile
    assert code == 0, err
    assert "Traceback" not in out + err
    counts = corpus.counts()
    assert f"Found {sum(counts.values())} images in 2 classes: normal ({counts['normal']}), " \
           f"pneumonia ({counts['pneumonia']})" in out
    kept = sum(counts.values()) - len(corpus.bad)  # the two copies share one bottleneck with their originals
    assert f"{kept} bottlenecks ready ({kept - 2} computed now, 0 from the cache in {folder / 'bottlenecks'}, " \
           "2 for identical copies)" in out
    assert (folder / "out" / "graph.onnx").is_file()
    assert (folder / "out" / "labels.txt").read_text().splitlines() == ["normal", "pneumonia"]


def fix_for(path: Path) -> str:
    """The fix that mini_retrain's own checks give for a bad file (hashing it, then decoding it)."""
    from mini_retrain.pipeline.bottlenecks import _content_key
    from mini_retrain.pipeline.images import BadImageError, read_image

    try:
        _content_key(path)
        read_image(path)
    except BadImageError as error:
        return error.fix
    raise AssertionError(f"{path} reads fine")


def test_one_skipping_line_per_bad_file_naming_it(hostile):
    corpus, _, _, out, _ = hostile
    skipping = [line for line in out.splitlines() if line.startswith("Skipping ")]
    assert len(skipping) == len(corpus.bad)
    for relative, reason in corpus.bad.items():
        mine = [line for line in skipping if line.startswith(f"Skipping {corpus.image_dir / relative}: ")]
        assert len(mine) == 1, relative
        assert reason in mine[0]
        assert mine[0].endswith(f" ({fix_for(corpus.image_dir / relative)})")  # and what to do about it
    for relative in corpus.ignored:  # hidden files and other extensions are not even mentioned
        assert Path(relative).name not in out


def test_summary_at_the_end_lists_exactly_the_bad_files(hostile):
    corpus, _, _, out, _ = hostile
    lines = out.splitlines()
    start = lines.index(f"{len(corpus.bad)} image(s) skipped:")
    listed = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        path, _, reason = line.strip().partition(": ")
        listed.append(path)
        assert corpus.bad[str(Path(path).relative_to(corpus.image_dir))] in reason
    assert sorted(listed) == sorted(str(corpus.image_dir / relative) for relative in corpus.bad)


def test_duplicate_warnings_name_both_copies(hostile):
    corpus, _, _, out, _ = hostile
    conflicts = [line for line in out.splitlines() if "label conflict" in line]
    leaks = [line for line in out.splitlines() if "data leak" in line]
    assert len(conflicts) == 1 and len(leaks) == 1
    assert conflicts[0].startswith("WARNING: identical images with different labels")
    assert all(name in conflicts[0] for name in corpus.conflict)
    assert f"(data leak: {corpus.leak_splits})" in leaks[0]
    assert all(name in leaks[0] for name in corpus.leak)


def test_unusual_formats_are_used_and_give_the_same_bottleneck(hostile, real_backbone):
    """Cache rows by file content: a PNG named .jpg, a DICOM and (as root) the chmod-000 copy have the pixels of
    their source JPEG, so the same bottleneck; the 12-bit PNG is within a grey level, so its bottleneck is far
    closer to its source's than the source's is to any other X-ray."""
    from mini_retrain.pipeline.bottlenecks import load_store, store_folder
    from mini_retrain.pipeline.images import file_sha1

    corpus, folder, _, _, _ = hostile
    index, values = load_store(store_folder(folder / "bottlenecks", real_backbone))

    def bottleneck(path: Path) -> np.ndarray:
        return values[index[file_sha1(path)]]

    unusual = [r for r in corpus.good if not r.endswith(".jpeg") or r == "normal/unreadable.jpeg"]
    assert len(unusual) == (2 if "normal/unreadable.jpeg" in corpus.bad else 3)
    for relative in unusual:
        np.testing.assert_allclose(bottleneck(corpus.image_dir / relative), bottleneck(corpus.good[relative]),
                                   atol=1e-4, err_msg=relative)
    source = bottleneck(NORMAL[3])  # the 12-bit PNG's source
    nearest_other = min(np.linalg.norm(bottleneck(other) - source) for other in NORMAL + PNEUMONIA
                        if other != NORMAL[3])
    assert np.linalg.norm(bottleneck(corpus.image_dir / corpus.sixteen_bit) - source) < 0.1 * nearest_other


def test_label_skips_the_same_bad_files(hostile):
    """`label` on the bad files and one good one: a reason per bad file, scores for the good one, valid JSON."""
    corpus, folder, _, _, _ = hostile
    images = [corpus.image_dir / relative for relative in corpus.bad] + [corpus.image_dir / "pneumonia/scan.dcm"]
    code, out, err = run_cli(["label", "--graph", folder / "out" / "graph.onnx", "--labels",
                              folder / "out" / "labels.txt", "--device", "cpu", "--json", "--image", *images])
    assert code == 0 and "Traceback" not in out + err
    results = {Path(r["image"]).relative_to(corpus.image_dir).as_posix(): r for r in json.loads(out)}
    for relative, reason in corpus.bad.items():
        assert reason in results[relative]["error"]
        assert results[relative]["fix"] == fix_for(corpus.image_dir / relative)
        assert f"Skipping {corpus.image_dir / relative}: " in err
    assert [p["label"] for p in results["pneumonia/scan.dcm"]["predictions"]] in (["normal", "pneumonia"],
                                                                                   ["pneumonia", "normal"])


def test_on_bad_image_error_stops_with_one_line_naming_the_file(hostile, real_backbone_path, tmp_path):
    corpus, folder, _, _, _ = hostile
    common = ["--backbone", real_backbone_path, "--device", "cpu", "--bottleneck_dir", folder / "bottlenecks",
              "--output_graph", tmp_path / "g.onnx", "--output_labels", tmp_path / "l.txt", "--on_bad_image", "error",
              *PERCENTAGES]
    # The whole hostile folder: the error names one of the bad files, and nothing is written.
    line = assert_one_line_error(*run_cli(["retrain", "--image_dir", corpus.image_dir, *common]))
    named = [relative for relative in corpus.bad if f"{corpus.image_dir / relative}: " in line]
    assert len(named) == 1 and corpus.bad[named[0]] in line
    assert not (tmp_path / "g.onnx").exists()
    # One bad file among good ones: that file.
    only = tmp_path / "images"
    for source in NORMAL[:3] + PNEUMONIA[:3]:
        (only / source.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, only / source.parent.name / source.name)
    (only / "pneumonia" / "zz_truncated.jpeg").write_bytes(PNEUMONIA[5].read_bytes()[:5000])
    assert_one_line_error(*run_cli(["retrain", "--image_dir", only, *common]),
                          f"{only / 'pneumonia' / 'zz_truncated.jpeg'}: truncated or corrupt image data")


def test_class_whose_every_file_is_bad_is_a_clean_error(hostile, real_backbone_path, tmp_path):
    corpus, folder, _, _, _ = hostile
    image_dir = tmp_path / "images"
    (image_dir / "normal").mkdir(parents=True)
    for source in NORMAL[:3]:
        shutil.copyfile(source, image_dir / "normal" / source.name)
    (image_dir / "tuberculosis").mkdir()
    for relative in ("normal/empty.jpeg", "normal/truncated.jpeg", "pneumonia/notes.png", "normal/bomb.png"):
        shutil.copyfile(corpus.image_dir / relative, image_dir / "tuberculosis" / Path(relative).name)
    code, out, err = run_cli([
        "retrain", "--image_dir", image_dir, "--backbone", real_backbone_path, "--device", "cpu",
        "--bottleneck_dir", folder / "bottlenecks", "--output_graph", tmp_path / "g.onnx",
        "--output_labels", tmp_path / "l.txt", *PERCENTAGES])
    assert_one_line_error(code, out, err, "class 'tuberculosis' has no usable training image")
    assert out.count("Skipping ") == 4  # each bad file was still named on the way


def make_classes(image_dir: Path, *folders: str) -> Path:
    for folder in folders:
        (image_dir / folder).mkdir(parents=True)
        shutil.copyfile(NORMAL[0], image_dir / folder / "x.jpeg")
    return image_dir


@pytest.mark.parametrize("layout, fragments", [
    ("missing", ["does not exist", "--image_dir"]),
    ("a file", ["is not a folder"]),
    ("empty", ["no class subfolders"]),
    ("Normal and normal", ["folders 'Normal' and 'normal' both give the label 'normal'", "rename"]),
    ("Latin-1 file name", ["normal/caf\\xe9.jpeg: the name is not valid UTF-8", "rename it"]),
])
def test_image_dir_structure_errors_through_the_cli(tmp_path, layout, fragments):
    """Exit code 2 and one line, before any backbone is loaded (the default backbone path is never needed)."""
    image_dir = tmp_path / "images"
    if layout == "a file":
        image_dir.write_bytes(NORMAL[0].read_bytes())
    elif layout == "empty":
        image_dir.mkdir()
    elif layout == "Normal and normal":
        make_classes(image_dir, "Normal", "normal", "pneumonia")
    elif layout == "Latin-1 file name":  # e.g. from a zip made on Windows; Python shows the byte as a surrogate
        make_classes(image_dir, "normal", "pneumonia")
        shutil.copyfile(NORMAL[0], image_dir / "normal" / os.fsdecode(b"caf\xe9.jpeg"))
    line = assert_one_line_error(*run_cli([
        "retrain", "--image_dir", image_dir, "--backbone", tmp_path / "never_read.onnx",
        "--output_graph", tmp_path / "g.onnx", "--output_labels", tmp_path / "l.txt"]), *fragments)
    assert str(image_dir) in line


@pytest.mark.parametrize("flag, target, fragment", [
    ("--output_graph", "/proc/x.onnx", "cannot write there"),
    ("--output_graph", "{file}/x.onnx", "{file} is a file, not a folder"),
    ("--output_graph", "{folder}", "is a folder, not a file name"),
    ("--output_labels", "{file}/labels/l.txt", "{file} is a file, not a folder"),
    ("--output_weights", "{file}/w.npz", "{file} is a file, not a folder"),
    ("--summaries_dir", "{file}", "{file} is a file, not a folder"),
    ("--bottleneck_dir", "{file}/cache", "{file} is a file, not a folder"),
    ("--explain_misclassified", "{file}/maps", "{file} is a file, not a folder"),
])
def test_output_that_cannot_be_written_fails_before_any_work(tmp_path, flag, target, fragment):
    """Checked first: the backbone path given does not even exist, so any work before the check would fail
    differently."""
    image_dir = make_classes(tmp_path / "images", "normal", "pneumonia")
    a_file, a_folder = tmp_path / "notes.txt", tmp_path / "a_folder"
    a_file.write_text("not a folder\n")
    a_folder.mkdir()
    target = target.format(file=a_file, folder=a_folder)
    argv = ["retrain", "--image_dir", image_dir, "--backbone", tmp_path / "never_read.onnx",
            "--output_graph", tmp_path / "g.onnx", "--output_labels", tmp_path / "l.txt", flag, target]
    line = assert_one_line_error(*run_cli(argv), target, fragment.format(file=a_file), "choose another output path")
    assert line.startswith(f"mini_retrain: error: {target}: ")


def test_label_refuses_graphs_and_labels_that_are_not_ours(hostile, tmp_path):
    """Graphs: a text file, random bytes, a truncated copy of a real graph, a folder. Labels: missing, a folder.
    One line each, exit 2. (A real ONNX without our metadata, and a labels file of other labels, are tested in
    test_retrain_cli.py.)"""
    _, folder, _, _, _ = hostile
    graph, labels = folder / "out" / "graph.onnx", folder / "out" / "labels.txt"
    image = NORMAL[0]
    text = tmp_path / "graph.onnx"
    text.write_text("this is not a model\n")
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.onnx"
    with open(graph, "rb") as full:
        truncated.write_bytes(full.read(1 << 20))
    for bad_graph in (text, noise, truncated):
        assert_one_line_error(*run_cli(["label", "--graph", bad_graph, "--image", image, "--device", "cpu"]),
                              f"{bad_graph}: not an ONNX graph onnxruntime can load")
    assert_one_line_error(*run_cli(["label", "--graph", tmp_path, "--image", image]), f"{tmp_path}: no such graph")
    for bad_labels in (tmp_path / "missing.txt", tmp_path):
        assert_one_line_error(*run_cli(["label", "--graph", graph, "--labels", bad_labels, "--image", image,
                                        "--device", "cpu"]), f"{bad_labels}: cannot read the labels file")


@pytest.mark.parametrize("command", ["label", "explain"])
def test_label_and_explain_on_a_folder_without_images(hostile, tmp_path, command):
    _, folder, _, _, _ = hostile
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images\n")
    assert_one_line_error(*run_cli([command, "--graph", folder / "out" / "graph.onnx", "--image", empty]),
                          f"{empty}: no images found; pass image files or a folder")


@pytest.mark.parametrize("argv, flag", [
    (["crossval", "--image_dir", "IMAGES", "--output_json", "FOLDER"], "--output_json"),
    (["sweep", "--image_dir", "IMAGES", "--output_json", "FOLDER"], "--output_json"),
    (["recalibrate", "--graph", "g.onnx", "--image_dir", "IMAGES", "--output", "FOLDER"], "--output"),
])
def test_an_unwritable_output_of_crossval_sweep_or_recalibrate_is_one_line_before_any_work(tmp_path, capsys, argv,
                                                                                          flag):
    """The three share settings.check_writable with retrain: an output that is a folder fails at once, naming it
    (before the images are listed: the image folder does not even exist)."""
    from mini_retrain.cli import main

    folder = tmp_path / "out.onnx"  # a folder whose name ends in .onnx, so recalibrate's suffix check passes
    folder.mkdir()
    places = {"FOLDER": str(folder), "IMAGES": str(tmp_path / "no-images")}
    assert main([places.get(word, word) for word in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a folder, not a file name" in err and flag in err
