"""Tests for mini_retrain.pipeline.images: every pixel mode, every failure, the backbone input, fuzzing.

All images are made here with Pillow/NumPy; expected pixel values are worked out by hand
from the rules in images._to_8bit's docstring.
"""

import contextlib
import hashlib
import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mini_retrain.pipeline.images import (
    IMAGE_EXTENSIONS,
    INPUT_SIZE,
    BadImageError,
    file_sha1,
    load_backbone_input,
    read_image,
    resize_for_backbone,
    to_backbone_input,
)
from tests.conftest import mutated, read_or_bad


def save(image: Image.Image, path, format=None, **params):
    image.save(path, format=format, **params)
    return path


def pixels_of(path) -> np.ndarray:
    image = read_image(path)
    assert image.mode == "RGB"
    result = np.asarray(image)
    assert result.dtype == np.uint8
    return result


def gray_expected(values) -> np.ndarray:
    """(H, W) gray levels -> the (H, W, 3) RGB we expect."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, :, None], 3, axis=2)


RNG = np.random.default_rng(0)
RGB_ARRAY = RNG.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
GRAY_ARRAY = RNG.integers(0, 256, size=(12, 16), dtype=np.uint8)


# ---------------------------------------------------------------- modes -> 8-bit RGB

def test_rgb_png_round_trips(tmp_path):
    path = save(Image.fromarray(RGB_ARRAY), tmp_path / "rgb.png")
    np.testing.assert_array_equal(pixels_of(path), RGB_ARRAY)


def test_gray_png_is_copied_to_three_channels(tmp_path):
    path = save(Image.fromarray(GRAY_ARRAY), tmp_path / "gray.png")
    np.testing.assert_array_equal(pixels_of(path), gray_expected(GRAY_ARRAY))


def test_gray_with_alpha_drops_alpha(tmp_path):
    alpha = np.full_like(GRAY_ARRAY, 255)
    alpha[:, :8] = 0  # half transparent: the grey underneath must survive
    image = Image.merge("LA", [Image.fromarray(GRAY_ARRAY), Image.fromarray(alpha)])
    path = save(image, tmp_path / "la.png")
    np.testing.assert_array_equal(pixels_of(path), gray_expected(GRAY_ARRAY))


def test_rgba_drops_alpha(tmp_path):
    alpha = RNG.integers(0, 256, size=RGB_ARRAY.shape[:2], dtype=np.uint8)
    rgba = np.concatenate([RGB_ARRAY, alpha[:, :, None]], axis=2)
    path = save(Image.fromarray(rgba), tmp_path / "rgba.png")
    np.testing.assert_array_equal(pixels_of(path), RGB_ARRAY)


def test_palette_image_looks_up_colours(tmp_path):
    palette = [(10, 20, 30), (200, 100, 0), (0, 255, 7)]
    indices = np.array([[0, 1, 2, 1] * 3] * 9, dtype=np.uint8)  # (9, 12)
    image = Image.frombytes("P", (12, 9), indices.tobytes())
    image.putpalette([level for colour in palette for level in colour])
    path = save(image, tmp_path / "palette.png", transparency=1)  # index 1 transparent
    expected = np.array(palette, dtype=np.uint8)[indices]  # (9, 12, 3)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(pixels_of(path), expected)


def test_cmyk_uses_the_textbook_formula(tmp_path):
    # R = (255 - C)(255 - K)/255, worked by hand for these colours:
    cases = [
        ((0, 0, 0, 0), (255, 255, 255)),      # no ink: white
        ((0, 0, 0, 255), (0, 0, 0)),          # full black
        ((255, 0, 0, 0), (0, 255, 255)),      # full cyan
        ((0, 0, 0, 51), (204, 204, 204)),     # 255 * 204/255
        ((51, 102, 0, 51), (163, 122, 204)),  # 204*204/255 = 163.2, 153*204/255 = 122.4
    ]
    cmyk = np.array([[c for c, _ in cases]] * 8, dtype=np.uint8)  # (8, 5, 4)
    cmyk = np.repeat(cmyk, 2, axis=1)  # (8, 10, 4): at least 8 pixels a side
    path = save(Image.frombytes("CMYK", (10, 8), cmyk.tobytes()), tmp_path / "cmyk.tif")
    expected = np.repeat(np.array([[rgb for _, rgb in cases]] * 8, dtype=np.uint8), 2, axis=1)
    np.testing.assert_array_equal(pixels_of(path), expected)


def test_one_bit_image_is_black_and_white(tmp_path):
    bits = RNG.integers(0, 2, size=(10, 9)).astype(bool)
    image = Image.fromarray(bits)
    assert image.mode == "1"
    path = save(image, tmp_path / "bits.png")
    np.testing.assert_array_equal(pixels_of(path), gray_expected(bits * 255))


def test_16_bit_png_with_12_bit_data_is_scaled_by_12_bits(tmp_path):
    values = np.array([[0, 4095, 2048, 16, 1000, 4095, 0, 3]] * 8, dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "twelve.png")
    assert Image.open(path).mode == "I;16"
    # x * 255 / 4095: 2048 -> 127.53 -> 128, 16 -> 0.996 -> 1, 1000 -> 62.27 -> 62, 3 -> 0.19 -> 0
    expected_row = [0, 255, 128, 1, 62, 255, 0, 0]
    np.testing.assert_array_equal(pixels_of(path), gray_expected([expected_row] * 8))


def test_16_bit_png_with_12_bit_data_matches_8_bit_rendering(tmp_path):
    eight = RNG.integers(0, 256, size=(20, 24)).astype(np.uint16)
    eight[0, 0] = 255
    low_bits = RNG.integers(0, 16, size=eight.shape).astype(np.uint16)
    low_bits[0, 0] = 15
    twelve = eight * 16 + low_bits  # 12-bit data whose top 8 bits are `eight`; max is 4095
    path = save(Image.fromarray(twelve), tmp_path / "twelve.png")
    difference = pixels_of(path)[:, :, 0].astype(int) - eight
    assert np.abs(difference).max() <= 1


def test_8_bit_data_in_16_bit_png_is_unchanged(tmp_path):
    path = save(Image.fromarray(GRAY_ARRAY.astype(np.uint16)), tmp_path / "eight_in_16.png")
    np.testing.assert_array_equal(pixels_of(path), gray_expected(GRAY_ARRAY))


def test_big_endian_16_bit_tiff(tmp_path):
    values = np.array([[0, 1023, 512, 4] * 2] * 8, dtype=">u2")  # 10-bit data
    image = Image.frombytes("I;16B", (8, 8), values.tobytes())
    path = save(image, tmp_path / "big_endian.tif")
    assert Image.open(path).mode == "I;16B"
    # x * 255 / 1023: 512 -> 127.62 -> 128, 4 -> 0.997 -> 1
    np.testing.assert_array_equal(pixels_of(path), gray_expected([[0, 255, 128, 1] * 2] * 8))


def test_32_bit_integer_tiff(tmp_path):
    # max 262143 = 2**18 - 1: 18 bits
    values = np.array([[0, 65535 * 4 + 3, 131072, 7] * 2] * 8, dtype=np.int32)
    path = save(Image.fromarray(values), tmp_path / "int32.tif")
    assert Image.open(path).mode == "I"
    # x * 255 / 262143: 131072 -> 127.5005 -> 128, 7 -> 0.0068 -> 0
    np.testing.assert_array_equal(pixels_of(path), gray_expected([[0, 255, 128, 0] * 2] * 8))


def test_negative_32_bit_integers_are_refused(tmp_path):
    values = np.full((8, 8), 5, dtype=np.int32)
    values[0, 0] = -1
    path = save(Image.fromarray(values), tmp_path / "negative.tif")
    with pytest.raises(BadImageError, match="negative"):
        read_image(path)


def test_float_tiff_in_unit_range_is_times_255(tmp_path):
    values = np.array([[0.0, 1.0, 0.2, 0.6] * 2] * 8, dtype=np.float32)
    path = save(Image.fromarray(values), tmp_path / "unit.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(pixels_of(path), gray_expected([[0, 255, 51, 153] * 2] * 8))


def test_float_tiff_outside_unit_range_is_stretched(tmp_path):
    values = np.array([[-10.0, 0.0, 40.0, 20.0] * 2] * 8, dtype=np.float32)
    path = save(Image.fromarray(values), tmp_path / "wide.tif")
    # (x + 10) * 255 / 50: -10 -> 0, 0 -> 51, 40 -> 255, 20 -> 153
    np.testing.assert_array_equal(pixels_of(path), gray_expected([[0, 51, 255, 153] * 2] * 8))


def test_float_tiff_with_nan_is_refused(tmp_path):
    values = np.ones((8, 8), dtype=np.float32)
    values[3, 3] = np.nan
    path = save(Image.fromarray(values), tmp_path / "nan.tif")
    with pytest.raises(BadImageError, match="NaN"):
        read_image(path)


def test_other_formats_read_by_content(tmp_path):
    for format, name in [("BMP", "a.bmp"), ("GIF", "b.gif"), ("TIFF", "c.tiff"),
                         ("WEBP", "d.webp")]:
        params = {"lossless": True} if format == "WEBP" else {}
        path = save(Image.fromarray(GRAY_ARRAY).convert("RGB"), tmp_path / name, format, **params)
        np.testing.assert_array_equal(pixels_of(path), gray_expected(GRAY_ARRAY))


def test_png_named_jpg_and_jpeg_named_png_read(tmp_path):
    png_as_jpg = save(Image.fromarray(RGB_ARRAY), tmp_path / "really_png.jpg", "PNG")
    np.testing.assert_array_equal(pixels_of(png_as_jpg), RGB_ARRAY)
    flat = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    jpeg_as_png = save(Image.fromarray(flat), tmp_path / "really_jpeg.PNG", "JPEG", quality=95)
    assert np.abs(pixels_of(jpeg_as_png).astype(int) - flat).max() <= 3  # JPEG is lossy


@pytest.mark.parametrize("orientation, rotate", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_rotates(tmp_path, orientation, rotate):
    # EXIF 3: upside down; 6: turn 90 degrees clockwise to view; 8: 90 degrees counter-clockwise.
    # np.rot90(k) turns counter-clockwise k times.
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(RGB_ARRAY), tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(pixels_of(path), np.rot90(RGB_ARRAY, k=rotate))


def test_exif_orientation_in_jpeg(tmp_path):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white, right half black, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer turns it clockwise: white ends on top
    path = save(Image.fromarray(stored), tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = pixels_of(path).astype(int)
    assert shown.shape == (32, 16, 3)
    assert shown[:12].min() > 230 and shown[20:].max() < 25


# ---------------------------------------------------------------- failures

def assert_bad(path, reason_part: str) -> BadImageError:
    with pytest.raises(BadImageError) as caught:
        read_image(path)
    error = caught.value
    message = str(error)
    assert error.path == str(path)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert message.endswith(")")
    assert reason_part in error.reason, error.reason
    return error


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_bad(path, "empty")


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "nowhere.jpg", "not found")


def test_broken_symlink(tmp_path):
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "deleted.png")
    assert_bad(link, "broken symbolic link")


def test_directory(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_bad(folder, "directory")


@contextlib.contextmanager
def unprivileged():
    """Run the block as user `nobody` when we are root (root may read anything)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_permission_denied(tmp_path):
    path = save(Image.fromarray(RGB_ARRAY), tmp_path / "secret.png")
    read_image(path)  # readable before
    path.chmod(0)
    try:
        with unprivileged():
            with pytest.raises(BadImageError) as caught:
                read_image(path)
    finally:
        path.chmod(0o644)
    assert caught.value.reason == "permission denied"
    assert str(path) in str(caught.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("patient 12, follow up in two weeks\n" * 20)
    assert_bad(path, "not a recognised image")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


NOISE = Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def test_truncated_png(tmp_path):
    data = png_bytes(NOISE)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert_bad(path, "truncated or corrupt")


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes(NOISE)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert_bad(path, "truncated or corrupt")


def test_corrupt_png_data(tmp_path):
    data = bytearray(png_bytes(NOISE))
    start = data.index(b"IDAT") + 20
    data[start:start + 40] = bytes(40)  # overwrite compressed pixels: zlib/CRC must object
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert_bad(path, "truncated or corrupt")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk declaring width x height 8-bit grey, no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + checksum
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_decompression_bomb(tmp_path):
    # 3.6 G pixels: over Pillow's own error limit (2 * 89.5 M)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(60000, 60000))
    assert_bad(path, "decompression bomb")


def test_decompression_bomb_warning_is_refused_too(tmp_path):
    # 90 M pixels: over Pillow's warning limit (89.5 M) only; Pillow warns, we refuse
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(10000, 9000))
    with pytest.warns(Image.DecompressionBombWarning):
        assert_bad(path, "decompression bomb")


@pytest.mark.parametrize("size", [(4, 300), (300, 7), (1, 1)])
def test_tiny_images_are_refused(tmp_path, size):
    path = save(Image.new("RGB", size, (9, 9, 9)), tmp_path / "tiny.png")
    assert_bad(path, "shorter than 8")


def test_eight_pixels_is_enough(tmp_path):
    path = save(Image.new("L", (8, 8), 42), tmp_path / "small.png")
    np.testing.assert_array_equal(pixels_of(path), np.full((8, 8, 3), 42))


def test_unsupported_mode(tmp_path):
    path = save(Image.new("LAB", (10, 10), (50, 0, 0)), tmp_path / "lab.tif")
    assert Image.open(path).mode == "LAB"
    assert_bad(path, "unsupported pixel mode 'LAB'")


def test_bad_image_error_is_a_value_error_and_pickles():
    error = BadImageError("/x/y.png", "empty file (0 bytes)", "re-export")
    assert isinstance(error, ValueError)
    assert str(error) == "/x/y.png: empty file (0 bytes) (re-export)"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, copy.fix, str(copy)) == (error.path, error.reason, error.fix,
                                                              str(error))


# ---------------------------------------------------------------- fuzzing

FUZZ_SETTINGS = settings(max_examples=150, deadline=5000,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])
SEED_FILES = [png_bytes(Image.fromarray(RGB_ARRAY)), jpeg_bytes(Image.fromarray(RGB_ARRAY)),
              png_bytes(Image.fromarray((GRAY_ARRAY.astype(np.uint16) * 16)))]


@FUZZ_SETTINGS
@given(data=st.binary(min_size=0, max_size=2000))
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "random.jpg"
    path.write_bytes(data)
    read_or_bad(path)


@FUZZ_SETTINGS
@given(seed=st.sampled_from(SEED_FILES),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=8),
       keep=st.floats(0.0, 1.0))
def test_fuzz_mutated_png_and_jpeg(tmp_path, seed, flips, keep):
    path = tmp_path / "mutated.png"
    path.write_bytes(mutated(seed, flips, keep, truncate_below=0.9))
    read_or_bad(path)


# ---------------------------------------------------------------- backbone input

def test_resize_for_backbone_shape_dtype_range():
    image = Image.fromarray(RNG.integers(0, 256, size=(400, 300, 3), dtype=np.uint8))
    pixels = resize_for_backbone(image)
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3) and pixels.dtype == np.float32
    assert pixels.min() >= 0 and pixels.max() <= 255
    np.testing.assert_array_equal(pixels, np.rint(pixels))  # whole levels
    assert resize_for_backbone(image, size=17).shape == (17, 17, 3)


def test_resize_for_backbone_keeps_a_flat_colour():
    image = Image.new("RGB", (640, 480), (0, 77, 255))
    pixels = resize_for_backbone(image)
    np.testing.assert_array_equal(pixels, np.broadcast_to([0, 77, 255], pixels.shape))


def test_resize_for_backbone_antialiases_when_shrinking():
    # Columns repeat 0, 0, 0, 255. Shrunk 4x, an antialiased filter sees the average, 63.75;
    # a 2-tap bilinear at half-pixel centres would only see columns 4i+1 and 4i+2, i.e. black.
    columns = np.tile([0, 0, 0, 255], INPUT_SIZE).astype(np.uint8)  # (1196,)
    image = Image.fromarray(np.tile(columns, (64, 1))).convert("RGB")
    pixels = resize_for_backbone(image)
    interior = pixels[:, 2:-2]
    assert abs(interior.mean() - 63.75) < 3


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "F"])
def test_resize_for_backbone_wants_rgb_or_gray(mode):
    with pytest.raises(ValueError, match="RGB or L"):
        resize_for_backbone(Image.new(mode, (20, 20)))


def test_to_backbone_input_values_and_layout():
    pixels = np.zeros((2, 3, 3), dtype=np.float32)
    pixels[..., 0] = 0
    pixels[..., 1] = 128
    pixels[..., 2] = 255
    pixels[1, 2] = (64, 192, 32)
    result = to_backbone_input(pixels)
    assert result.shape == (3, 2, 3) and result.dtype == np.float32
    assert result.flags["C_CONTIGUOUS"]
    assert (result[0, 0] == -1).all() and (result[1, 0] == 0).all()
    assert (result[2, 0] == 0.9921875).all()
    # (64 - 128)/128 = -0.5, (192 - 128)/128 = 0.5, (32 - 128)/128 = -0.75
    assert tuple(result[:, 1, 2]) == (-0.5, 0.5, -0.75)


def test_to_backbone_input_wants_three_channels():
    with pytest.raises(ValueError, match="shape"):
        to_backbone_input(np.zeros((4, 4)))


def test_load_backbone_input(tmp_path):
    path = save(Image.new("RGB", (500, 400), (0, 128, 255)), tmp_path / "flat.png")
    result = load_backbone_input(path)
    assert result.shape == (3, INPUT_SIZE, INPUT_SIZE) and result.dtype == np.float32
    assert (result[0] == -1).all() and (result[1] == 0).all() and (result[2] == 0.9921875).all()


def test_fast_decodes_big_jpeg_at_reduced_size(tmp_path):
    ramp = np.linspace(0, 255, 1400).astype(np.uint8)
    smooth = np.add.outer(ramp // 2, ramp // 2).astype(np.uint8)  # (1400, 1400) gentle gradient
    path = save(Image.fromarray(smooth), tmp_path / "big.jpg", quality=95)
    assert read_image(path).size == (1400, 1400)
    # 1400 // 598 = 2, so libjpeg decodes at 1/2 scale: still >= 2 * 299 per side
    assert read_image(path, fast=True).size == (700, 700)
    full, fast = load_backbone_input(path), load_backbone_input(path, fast=True)
    assert np.abs(full - fast).max() * 128 <= 4  # "slightly" different pixels


def test_fast_decode_of_a_png_is_left_to_the_resize(tmp_path):
    path = save(Image.fromarray(RNG.integers(0, 256, (700, 700, 3), dtype=np.uint8)),
                tmp_path / "big.png")
    assert read_image(path, fast=True).size == (700, 700)  # no draft for PNG: the whole image is decoded


def test_fast_resize_reduces_by_block_means_then_resizes(tmp_path):
    """resize_for_backbone(fast=True) = Image.reduce(k) (k x k block means, k = side // (2 * 299)), then bilinear."""
    ramp = np.linspace(0, 255, 2400)
    film = Image.fromarray(np.add.outer(ramp / 2, ramp / 2).astype(np.uint8))  # (2400, 2400) smooth
    k = 2400 // (2 * INPUT_SIZE)  # 4
    expected = resize_for_backbone(film.reduce(k))  # the two steps written out
    np.testing.assert_array_equal(resize_for_backbone(film, fast=True), expected)
    exact = resize_for_backbone(film)
    assert not np.array_equal(exact, expected) and np.abs(exact - expected).max() <= 2  # slightly different
    small = Image.fromarray(RNG.integers(0, 256, (500, 500), dtype=np.uint8))  # < 2 x 299: nothing to reduce
    np.testing.assert_array_equal(resize_for_backbone(small, fast=True), resize_for_backbone(small))


# ---------------------------------------------------------------- hashing, extensions

def test_file_sha1_known_vector(tmp_path):
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    # FIPS 180-2 test vector
    assert file_sha1(path) == "a9993e364706816aba3e25717850c26c9cd0d89d"


def test_file_sha1_streams_large_files(tmp_path):
    data = RNG.integers(0, 256, size=3 * (1 << 20) + 5, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha1(path) == hashlib.sha1(data).hexdigest()
    assert file_sha1(str(path)) == file_sha1(path)


def test_file_sha1_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        file_sha1(tmp_path / "gone.png")


def test_image_extensions():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".dcm"}
    assert all(extension == extension.lower() for extension in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------- keep_gray: the pipeline's one-channel path

GRAY_FILMS = {  # name -> (image, format): every grey kind read_image meets, big enough for a real downscale
    "gray.png": (Image.fromarray(RNG.integers(0, 256, size=(500, 700), dtype=np.uint8)), "PNG"),
    "gray.jpg": (Image.fromarray(RNG.integers(0, 256, size=(500, 700), dtype=np.uint8)), "JPEG"),
    "twelve_in_16.png": (Image.fromarray(RNG.integers(0, 4096, size=(500, 700)).astype(np.uint16)), "PNG"),
    "one_bit.png": (Image.fromarray(RNG.integers(0, 2, size=(500, 700)).astype(bool)), "PNG"),
    "gray_alpha.png": (Image.fromarray(RNG.integers(0, 256, size=(500, 700, 2), dtype=np.uint8), "LA"), "PNG"),
    "int32.tif": (Image.fromarray(RNG.integers(0, 2**18, size=(500, 700)).astype(np.int32)), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(GRAY_FILMS))
def test_keep_gray_gives_the_network_exactly_the_same_pixels(tmp_path, name):
    image, format = GRAY_FILMS[name]
    path = save(image, tmp_path / name, format)
    gray = read_image(path, keep_gray=True)
    assert gray.mode == "L"
    np.testing.assert_array_equal(np.asarray(gray), np.asarray(read_image(path))[:, :, 0])
    one_channel = resize_for_backbone(gray)  # resized once, then copied to 3 channels
    three_channels = resize_for_backbone(read_image(path))  # the RGB copy resized
    assert one_channel.shape == three_channels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    np.testing.assert_array_equal(one_channel, three_channels)


def test_keep_gray_leaves_colour_images_in_colour(tmp_path):
    path = save(Image.fromarray(RGB_ARRAY), tmp_path / "rgb.png")
    image = read_image(path, keep_gray=True)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), RGB_ARRAY)
