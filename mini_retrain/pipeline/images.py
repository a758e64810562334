"""Image files -> the input of the Inception v3 backbone.

    file --read_image--> 8-bit RGB (or grey) image --resize_for_backbone--> (299, 299, 3) float32, 0..255
         --to_backbone_input--> (3, 299, 299) float32, about -1..1

Google's 2015 Inception v3 was trained on 299x299 RGB images normalised as retrain.py does it
(input_mean = 128, input_std = 128):

    x_normalised = (x - 128) / 128        0 -> -1,   128 -> 0,   255 -> 0.9921875

`read_image` accepts what a clinic or a public data set is likely to hand over (JPEG, PNG, TIFF,
BMP, GIF, WebP, DICOM) in any common pixel format, and turns every one of them into 8-bit RGB
with one documented rule per Pillow mode (see `_to_8bit`). The file's content decides the decoder,
never its name: a PNG called .jpg reads fine. Every failure is a `BadImageError` that names the
file, the reason and the fix, so one bad file among thousands is a one-line message.
"""

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mini_retrain.errors import BadImageError

INPUT_SIZE = 299  # Inception v3 sees 299x299 pixels
MIN_SIDE = 8  # smaller than this is an icon or a broken export, not an X-ray
# File names callers should pick up when they list a folder (compare `suffix.lower()`).
# A frozenset so no caller can change it for everybody.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".dcm"})
# The Pillow decoders we let near untrusted files. Pillow knows dozens of formats, some of which
# hand the file to external programs (EPS runs Ghostscript); we only need the ones that hold photos
# and radiographs.
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP")
_DICOM_MAGIC_OFFSET = 128  # a DICOM file is a 128-byte preamble, then b"DICM", then the data set
_BOMB_FIX = "downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"


def read_image(path: str | os.PathLike, fast: bool = False, keep_gray: bool = False) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, EXIF orientation applied.

    keep_gray=True returns a grey image as 8-bit "L" instead (RGB images stay RGB): an X-ray's
    three RGB channels would be identical, so the pipeline keeps one until after the resize
    (resize_for_backbone accepts both) and decodes a 4000x5000 film with a third of the memory
    and of the resizing work. The 299x299 pixels that reach the network are the same.

    DICOM files (b"DICM" after the 128-byte preamble, or named .dcm and not recognised by Pillow:
    old DICOM files have no preamble) go to `dicom.read_dicom`. Everything else goes to Pillow,
    which fully decodes the file here, so a truncated file fails now rather than later.
    Multi-frame files (animated GIF, multi-page TIFF) give their first frame.

    fast=True (`--fast_decode`) lets the JPEG decoder skip detail with Image.draft: libjpeg can
    decode straight to 1/2, 1/4 or 1/8 size by dropping DCT coefficients, much faster for
    3000-pixel X-rays. We keep at least 2 * INPUT_SIZE pixels per side. The pixels then differ
    slightly from a full decode followed by resize, so it is off by default (benchmarks/README.md,
    row g, measures the difference in the bottlenecks). It does nothing to other formats.
    """
    path = Path(path)
    header = _read_header(path)
    if header[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return _read_dicom(path, keep_gray)
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as opened:  # reads the header only
            _check_size(opened.size, path)
            if fast and opened.format == "JPEG":
                opened.draft("RGB", (2 * INPUT_SIZE, 2 * INPUT_SIZE))
            opened.load()  # decode everything now: truncated or corrupt data raises here
            ImageOps.exif_transpose(opened, in_place=True)  # rotated as the camera says; no copy when upright
        image = opened  # its pixels are loaded, so closing the file above does not lose them
    except BadImageError:
        raise
    except Image.UnidentifiedImageError:
        if path.suffix.lower() == ".dcm":
            return _read_dicom(path, keep_gray)
        raise BadImageError(
            path, "not a recognised image", "expected JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow refuses more than 2 * MAX_IMAGE_PIXELS itself (the Warning is an error under
        # python -W error); between 1x and 2x it only warns and _check_size refuses.
        raise BadImageError(path, f"too many pixels, a possible decompression bomb: {error}",
                            _BOMB_FIX) from None
    except Exception as error:
        # Pillow's decoders answer malformed data with many exception types (OSError, SyntaxError,
        # struct.error, ValueError, EOFError, ...). To us they all mean the same thing.
        raise BadImageError(
            path,
            f"truncated or corrupt image data ({type(error).__name__}: {error})",
            "re-export or re-download the file",
        ) from None
    image = _to_8bit(image, path)  # "L" or "RGB"
    return image if keep_gray or image.mode == "RGB" else image.convert("RGB")  # gray copied into R, G, B


def to_image(image: Image.Image | np.ndarray, name: str = "image") -> Image.Image:
    """An image already in memory -> 8-bit "L" or "RGB", as read_image makes one from a file.

    A PIL image in any mode read_image accepts (the same rules, see `_to_8bit`), or a NumPy array of uint8:
    (H, W) grey or (H, W, 3) RGB. `name` stands for the path in error messages."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"{name}: an image array must be (height, width) or (height, width, 3) uint8, got "
                             f"shape {image.shape} dtype {image.dtype}; pass a list for several images")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"{name}: expected a path, a PIL image or a NumPy array, got {type(image).__name__}")
    _check_size(image.size, Path(name))
    return _to_8bit(image, Path(name))


def _read_dicom(path: Path, keep_gray: bool) -> Image.Image:
    from mini_retrain.pipeline.dicom import read_dicom  # imported here: pydicom is an optional extra

    image = read_dicom(path)  # mode "L" or "RGB"
    _check_size(image.size, path)
    return image if keep_gray or image.mode == "RGB" else image.convert("RGB")


def _read_header(path: Path) -> bytes:
    """The first 132 bytes of a regular, readable, non-empty file, else BadImageError."""
    try:
        status = os.stat(path)  # follows symbolic links
        if stat.S_ISDIR(status.st_mode):
            raise BadImageError(path, "is a directory, not an image file", "pass an image file")
        if not stat.S_ISREG(status.st_mode):  # reading a pipe or a device could block forever
            raise BadImageError(path, "not a regular file", "pass an image file")
        if status.st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)", "re-export or re-copy the image")
        with open(path, "rb") as file:
            return file.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError as error:
        raise _file_error(path, error) from None


def _file_error(path: Path, error: OSError) -> BadImageError:
    """Turn an operating-system error while opening `path` into a BadImageError."""
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        return BadImageError(
            path,
            f"broken symbolic link (its target {os.readlink(path)} does not exist)",
            "fix or remove the link",
        )
    if isinstance(error, FileNotFoundError):
        return BadImageError(path, "file not found", "check the path")
    if isinstance(error, PermissionError):
        return BadImageError(path, "permission denied", "make the file readable, e.g. chmod a+r")
    return BadImageError(path, f"cannot read the file: {error.strerror or error}", "check the disk")


def _check_size(size: tuple[int, int], path: Path) -> None:
    """Refuse icons (a side < MIN_SIDE) and decompression bombs (> Image.MAX_IMAGE_PIXELS).

    A bomb is a small file that declares a huge image (a few kB of PNG can decode to gigabytes).
    Pillow's limit is about 89 M pixels (it warns there and refuses at twice that); a chest
    X-ray has under 20 M, so we refuse at the warning already. We compare ourselves instead of
    turning the warning into an error, because warnings.catch_warnings changes global state and
    images are decoded by several threads at once (bottlenecks.py).
    """
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS  # None if the user switched the check off
    if limit and width * height > limit:
        raise BadImageError(
            path,
            f"{width}x{height} = {width * height} pixels is more than the {limit} allowed, "
            "a possible decompression bomb",
            _BOMB_FIX,
        )
    if min(width, height) < MIN_SIDE:
        raise BadImageError(
            path,
            f"image is only {width}x{height} pixels; sides shorter than {MIN_SIDE} are refused",
            "use the full-size image, not an icon or thumbnail",
        )


def _to_8bit(image: Image.Image, path: Path) -> Image.Image:
    """Convert any supported Pillow mode to 8-bit grey "L" or 8-bit "RGB", one rule per mode.

    (read_image then copies grey into R, G and B, unless asked to keep it grey.)
    RGB, L              kept.
    1                   grey, 0 -> 0, 1 -> 255.
    LA, RGBA, RGBX      the alpha (or padding) channel is dropped, as TensorFlow's
                        decode_png(channels=3) does: the colour under a transparent pixel stays.
    P, PA               palette looked up, alpha dropped.
    CMYK                R = (255 - C) (255 - K) / 255, likewise G from M and B from Y
                        (the textbook formula; no colour profile).
    YCbCr               JPEG's (ITU-R BT.601) matrix, by Pillow.
    I;16*, I            integers, e.g. 16-bit PNG. Medical sets often store 12-bit data in
                        16 bits (Montgomery: 0..4095), so we scale by the bit depth the image
                        actually uses, not by 65535 (which would make it nearly black):
                            bits = max(8, ceil(log2(max + 1)))
                            y = round(x * 255 / (2**bits - 1))
                        An 8-bit image stored in 16 bits is therefore unchanged. For bits <= 16
                        y is looked up in a table of the 2**bits possible values (the same
                        numbers, without a float64 copy of a 20-megapixel film).
    F                   32-bit float (TIFF). Values in [0, 1] are taken as fractions of white:
                        y = round(255 x). Any other range is stretched: y = round(255 (x - min) /
                        (max - min)) (a constant image becomes black).
    Anything else (LAB, HSV, ...) is a BadImageError.
    """
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode in ("1", "LA"):
        return image.convert("L")  # Pillow drops the alpha of LA
    if mode in ("RGBA", "RGBX", "YCbCr"):
        return image.convert("RGB")  # Pillow drops the 4th channel of RGBA/RGBX
    if mode in ("P", "PA"):
        # via RGBA: going straight to RGB makes Pillow warn about palette transparency
        return image.convert("RGBA").convert("RGB")
    if mode == "CMYK":
        cmyk = np.asarray(image, dtype=np.float64)  # (H, W, 4)
        rgb = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0  # (H, W, 3)
        return _gray_or_rgb_to_image(rgb)
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image)  # (H, W) uint16 or int32, native byte order
        low, high = int(values.min()), int(values.max())
        if low < 0:
            raise BadImageError(
                path, f"negative pixel values ({low}) in a {mode} image", "export as 8- or 16-bit"
            )
        bits = max(8, high.bit_length())  # == ceil(log2(high + 1)) for integers >= 0
        if bits <= 16:
            x = np.arange(2**bits)  # (2**bits,) every value a pixel can have
            table = np.clip(np.rint(x * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)  # y for each x
            return Image.fromarray(table[values])  # (H, W) uint8: each pixel's y, looked up
        return _gray_or_rgb_to_image(values.astype(np.int64) * 255.0 / (2**bits - 1))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if not np.isfinite(values).all():
            raise BadImageError(path, "NaN or infinite pixel values", "re-export the image")
        low, high = values.min(), values.max()
        if low >= 0.0 and high <= 1.0:
            return _gray_or_rgb_to_image(255.0 * values)
        scale = 255.0 / (high - low) if high > low else 0.0
        return _gray_or_rgb_to_image((values - low) * scale)
    raise BadImageError(path, f"unsupported pixel mode {mode!r}",
                        "convert the image to RGB or grey")


def _gray_or_rgb_to_image(values: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, 3) floats in 0..255 -> 8-bit "L" or "RGB" image, rounding to the nearest level."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def resize_for_backbone(image: Image.Image, size: int = INPUT_SIZE, fast: bool = False) -> np.ndarray:
    """Squeeze an RGB or grey ("L") image into (size, size, 3) float32 pixels in 0..255 (whole levels).

    A grey image is resized once and then used for all three channels: the same numbers as
    resizing its RGB copy (Pillow resizes each channel alike), a third of the work. Its result is
    a read-only view of that one channel (to_backbone_input makes the array the network gets).

    fast=True (`--fast_decode`) first shrinks a large image by a whole factor with Image.reduce
    (each output pixel the plain mean of a k x k block), keeping at least 2 * size pixels per
    side, and then resizes bilinearly: Pillow's reducing_gap=2. Much less work for a 3000-pixel
    film, slightly different pixels (measured in benchmarks/README.md, row g).

    Like retrain.py we do not keep the aspect ratio or crop: the whole film goes in.
    Pillow's BILINEAR antialiases when it shrinks (its filter widens with the shrink factor, so
    every source pixel counts); TF1's resize_bilinear, used by retrain.py, did not (each output
    pixel blends only its 4 nearest source pixels, so a big X-ray aliases). Antialiasing is the
    better choice; the bottlenecks differ slightly from TF1's.
    """
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"resize_for_backbone needs an RGB or L image, got mode {image.mode!r}; "
                         "read it with read_image")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0 if fast else None),
                         dtype=np.float32)
    if resized.ndim == 2:  # grey (size, size) -> (size, size, 3): the one channel seen three times (a read-only
        resized = np.broadcast_to(resized[:, :, None], (size, size, 3))  # view, no copy)
    return resized  # (size, size, 3)


def to_backbone_input(pixels: np.ndarray, mean: float = 128.0, std: float = 128.0) -> np.ndarray:
    """(H, W, 3) pixels in 0..255 -> (3, H, W) float32, x_normalised = (x - mean) / std.

    mean = std = 128 for Inception v3 (another backbone's sidecar may say otherwise, see models/README.md).
    Channels first, because the ONNX Inception v3 takes (batch, 3, 299, 299).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must have shape (height, width, 3), got {pixels.shape}")
    normalised = np.empty((3,) + pixels.shape[:2], np.float32)  # (3, H, W)
    np.subtract(pixels.transpose(2, 0, 1), np.float32(mean), out=normalised, dtype=np.float32)  # x - mean
    normalised /= np.float32(std)  # (x - mean) / std, in place: no temporary copies of the image
    return normalised


def load_backbone_input(path: str | os.PathLike, fast: bool = False) -> np.ndarray:
    """Read, resize and normalise one file: (3, 299, 299) float32, ready for the backbone."""
    return to_backbone_input(resize_for_backbone(read_image(path, fast=fast, keep_gray=True), fast=fast))


def file_sha1(path: str | os.PathLike) -> str:
    """Hex SHA-1 of the file's bytes, read in 1 MiB chunks (cache keys, duplicate detection).

    Identical bytes give the same key whatever the file is called; SHA-1 is fine here because
    nobody gains anything by forging a collision between two training images.
    """
    path = Path(path)
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except IsADirectoryError:
        raise BadImageError(path, "is a directory, not a file", "pass a file") from None
    except OSError as error:
        raise _file_error(path, error) from None
    return digest.hexdigest()
