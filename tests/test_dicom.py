"""Tests for mini_retrain.pipeline.dicom: tiny DICOM files written here with pydicom, expected grey levels
worked out by hand from DICOM PS3.3 C.11; the real radiograph RG1_UNCR.dcm from pydicom-data is
checked against pydicom's own windowing code and against anatomy.

pydicom is an optional extra, so the tests that need it skip without it; the test of the
"not installed" message runs always.
"""

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mini_retrain.pipeline.dicom import apply_window, read_dicom
from mini_retrain.pipeline.images import BadImageError, read_image
from tests.conftest import mutated, read_or_bad


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, file_format=True,
                **elements):
    """Write `pixels` as a CR image with the given data elements; returns path."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "CR"
    pixels = np.asarray(pixels)
    bits = bits_stored or pixels.dtype.itemsize * 8
    dataset.set_pixel_data(pixels, photometric, bits)
    for name, value in elements.items():
        setattr(dataset, name, value)
    if file_format:  # 128-byte preamble + "DICM" + file meta information
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.save_as(path, enforce_file_format=True)
    else:  # a bare data set, as old archives wrote them
        del dataset.file_meta  # set_pixel_data made one; a bare data set has none
        dataset.save_as(path, implicit_vr=True, little_endian=True)
    return path


def tile(row, dtype=np.uint16) -> np.ndarray:
    """`row` repeated down and across into an image at least 8 x 8: every row is `row` tiled."""
    row = np.asarray(row, dtype=dtype)
    return np.tile(row, (8, -(-8 // len(row))))  # (8, len(row) * repeats)


def gray(path) -> np.ndarray:
    image = read_dicom(path)
    assert image.mode == "L"
    return np.asarray(image)


# ---------------------------------------------------------------- grey-level pipeline

def test_monochrome2_without_window_stretches_min_to_max(tmp_path):
    path = write_dicom(tmp_path / "m2.dcm", tile([0, 100, 200, 300]), bits_stored=9)
    # (x - 0) * 255 / 300: 100 -> 85, 200 -> 170
    np.testing.assert_array_equal(gray(path), tile([0, 85, 170, 255], np.uint8))


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    values = tile([0, 100, 200, 300])
    normal = gray(write_dicom(tmp_path / "m2.dcm", values, "MONOCHROME2", 9))
    inverted = gray(write_dicom(tmp_path / "m1.dcm", values, "MONOCHROME1", 9))
    np.testing.assert_array_equal(inverted, tile([255, 170, 85, 0], np.uint8))
    np.testing.assert_array_equal(inverted.astype(int), 255 - normal.astype(int))


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    stored = tile([0, 50, 60, 70, 80, 100, 200, 0])
    # x = 2 s - 100 = -100, 0, 20, 40, 60, 100, 300, -100.
    # LINEAR window c = 50.5, w = 101: black for x <= 0, white for x > 100,
    # in between y = 255 ((x - 50) / 100 + 0.5) = 2.55 x.
    path = write_dicom(tmp_path / "rescaled.dcm", stored, bits_stored=8, RescaleSlope=2,
                       RescaleIntercept=-100, WindowCenter=50.5, WindowWidth=101)
    np.testing.assert_array_equal(gray(path), tile([0, 0, 51, 102, 153, 255, 255, 0], np.uint8))
    # Had the rescale been skipped, s = 60 would be 153, not 51.


def test_linear_exact_window_clips_outside(tmp_path):
    stored = tile([0, 40, 120, 200, 250, 1000, 100, 3])
    # c = 100, w = 200: y = 255 ((x - 100) / 200 + 0.5) = 1.275 x, clipped to 0..255.
    path = write_dicom(tmp_path / "exact.dcm", stored, bits_stored=10, WindowCenter=100,
                       WindowWidth=200, VOILUTFunction="LINEAR_EXACT")
    # 40 -> 51, 120 -> 153, 3 -> 3.825 -> 4
    np.testing.assert_array_equal(gray(path), tile([0, 51, 153, 255, 255, 255, 128, 4], np.uint8))


def test_sigmoid_window(tmp_path):
    stored = tile([500, 600, 400, 0])
    # y = 255 / (1 + exp(-4 (x - 500) / 100)): 500 -> 127.5 -> 128 (nearest even),
    # 600 -> 255 / (1 + e^-4) = 250.42 -> 250, 400 -> 255 / (1 + e^4) = 4.58 -> 5, 0 -> 0
    path = write_dicom(tmp_path / "sigmoid.dcm", stored, bits_stored=10, WindowCenter=500,
                       WindowWidth=100, VOILUTFunction="SIGMOID")
    np.testing.assert_array_equal(gray(path), tile([128, 250, 5, 0], np.uint8))


def test_first_of_several_windows_is_used(tmp_path):
    stored = tile([0, 16, 80, 200])
    # windows "c=40.5 w=81" (first) and "c=1000 w=10" (would make all black):
    # the first gives y = 255 ((x - 40) / 80 + 0.5) = 255 x / 80, so 16 -> 51
    path = write_dicom(tmp_path / "two.dcm", stored, bits_stored=8,
                       WindowCenter=[40.5, 1000], WindowWidth=[81, 10])
    np.testing.assert_array_equal(gray(path), tile([0, 51, 255, 255], np.uint8))


def test_voi_lookup_table(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    table = Dataset()
    table.add_new(0x00283002, "US", [4, 10, 16])  # LUT Descriptor: 4 entries, first value 10
    table.add_new(0x00283006, "US", [1000, 2000, 3000, 4000])  # LUT Data
    stored = tile([5, 10, 11, 12, 13, 50])
    # below 10 -> first entry, above 13 -> last; entries 1000..4000 become 0..255
    path = write_dicom(tmp_path / "lut.dcm", stored, bits_stored=8,
                       VOILUTSequence=Sequence([table]))
    np.testing.assert_array_equal(gray(path), tile([0, 0, 85, 170, 255, 255], np.uint8))


def test_rgb_dicom(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 10, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "colour.dcm", pixels, "RGB", 8)
    image = read_dicom(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_apply_window_by_hand():
    x = np.array([-1.0, 0.0, 1.0, 2.0])
    # LINEAR width 1 is a threshold at c - 0.5
    np.testing.assert_array_equal(apply_window(x, 1.0, 1.0), [0, 0, 255, 255])
    for function, width in [("LINEAR", 0.5), ("LINEAR_EXACT", 0), ("SIGMOID", -1)]:
        with pytest.raises(ValueError, match="width"):
            apply_window(x, 0.0, width, function)
    with pytest.raises(ValueError, match="unknown"):
        apply_window(x, 0.0, 10.0, "CUBIC")


# ---------------------------------------------------------------- through read_image

def test_read_image_finds_dicom_by_content_whatever_the_name(tmp_path):
    path = write_dicom(tmp_path / "scan.png", tile([0, 100, 200, 300]), "MONOCHROME1", 9)
    image = read_image(path)
    assert image.mode == "RGB"
    expected = tile([255, 170, 85, 0], np.uint8)
    np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[:, :, None], 3, axis=2))


def test_dicom_without_preamble_reads_when_named_dcm(tmp_path):
    values = tile([0, 100, 200, 300])
    bare = write_dicom(tmp_path / "old.dcm", values, bits_stored=9, file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(np.asarray(read_image(bare))[:, :, 0],
                                  tile([0, 85, 170, 255], np.uint8))
    # Without the name nothing says it is DICOM: refused like any unknown file.
    renamed = bare.rename(tmp_path / "old.png")
    with pytest.raises(BadImageError, match="not a recognised image"):
        read_image(renamed)


def test_tiny_dicom_is_refused_by_read_image(tmp_path):
    path = write_dicom(tmp_path / "tiny.dcm", np.zeros((4, 40), dtype=np.uint16), bits_stored=12)
    with pytest.raises(BadImageError, match="shorter than 8"):
        read_image(path)


# ---------------------------------------------------------------- failures

def test_truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", tile(np.arange(64)), bits_stored=12)
    data = path.read_bytes()
    path.write_bytes(data[:-50])  # lose the end of the pixel data
    with pytest.raises(BadImageError) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_dicom_without_pixels(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "report.dcm"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(BadImageError, match="no pixel data"):
        read_image(path)


def test_multi_frame_dicom_is_refused(tmp_path):
    frames = np.zeros((3, 8, 8), dtype=np.uint16)
    path = write_dicom(tmp_path / "cine.dcm", frames, bits_stored=12)
    with pytest.raises(BadImageError, match="multi-frame"):
        read_image(path)


def test_invalid_window_is_a_bad_image(tmp_path):
    path = write_dicom(tmp_path / "badwindow.dcm", tile([1, 2]), bits_stored=8, WindowCenter=1,
                       WindowWidth=0)
    with pytest.raises(BadImageError, match="window needs width"):
        read_image(path)


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch):
    # Runs without pydicom too: the file is only a preamble and the magic word.
    path = tmp_path / "scan.dcm"
    path.write_bytes(bytes(128) + b"DICM" + bytes(64))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(BadImageError, match=r"mini_retrain\[dicom\]") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


FUZZ_SETTINGS = settings(max_examples=100, deadline=5000,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbled tags we make on purpose
@FUZZ_SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=6),
       keep=st.floats(0.0, 1.0))
def test_fuzz_mutated_dicom(tmp_path, flips, keep):
    seed_path = tmp_path / "seed.dcm"
    if not seed_path.exists():
        write_dicom(seed_path, tile(np.arange(0, 4000, 250)), "MONOCHROME1", 12,
                    RescaleSlope=1.5, RescaleIntercept=-20, WindowCenter=2000, WindowWidth=3000)
    path = tmp_path / "mutated.dcm"
    path.write_bytes(mutated(seed_path.read_bytes(), flips, keep, truncate_below=0.8))
    read_or_bad(path)


# ---------------------------------------------------------------- a real chest radiograph

@pytest.fixture(scope="module")
def radiograph_path():
    pytest.importorskip("pydicom")
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file("RG1_UNCR.dcm")  # CR chest PA, MONOCHROME1, 15 bits
    if path is None:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data)")
    return path


def test_real_radiograph_matches_pydicom_windowing(radiograph_path):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(radiograph_path)
    ours = np.asarray(read_dicom(radiograph_path)).astype(float)
    assert ours.shape == (dataset.Rows, dataset.Columns) == (1955, 1841)
    # pydicom's own windowing maps the window onto the stored range 0 .. 2**15 - 1;
    # rescale that to 0..255 and invert for MONOCHROME1.
    windowed = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    theirs = 255.0 - windowed * 255.0 / (2**dataset.BitsStored - 1)
    assert np.abs(ours - theirs).max() <= 1.0


def test_real_radiograph_looks_like_a_chest_film(radiograph_path):
    image = read_image(radiograph_path)
    assert image.mode == "RGB" and image.size == (1841, 1955)
    film = np.asarray(image)[:, :, 0].astype(float)
    height, width = film.shape
    band = slice(int(0.25 * height), int(0.45 * height))  # upper chest
    right_lung = film[band, int(0.20 * width):int(0.35 * width)].mean()
    left_lung = film[band, int(0.62 * width):int(0.78 * width)].mean()
    spine = film[band, int(0.45 * width):int(0.55 * width)].mean()
    # Air lets X-rays through: lungs are dark on a correctly displayed film, the spine bright.
    # An uninverted MONOCHROME1 film would show the opposite.
    assert spine > right_lung + 20 and spine > left_lung + 20
