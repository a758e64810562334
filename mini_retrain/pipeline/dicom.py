"""DICOM files (what X-ray machines and hospital archives store) -> an 8-bit image.

A DICOM pixel is a measurement, not a brightness. The standard (PS3.3 C.11) turns it into a grey
level in three steps, which we follow:

1. Modality LUT: stored value -> physical value. Usually a straight line,
       x = stored * RescaleSlope + RescaleIntercept        (CT: Hounsfield units)
   sometimes a lookup table. Done by pydicom's apply_modality_lut.
2. VOI LUT ("values of interest"): which physical values the reader should see, and how.
   Usually a window, centre c and width w: values below c - w/2 are black, above c + w/2 white,
   linear in between (the exact formulas are in `apply_window`). We send the window straight
   to 0..255, so "scale to 8 bits" means: the window's own range becomes 0..255.
   Sometimes a lookup table instead (pydicom's apply_voi); its range, the smallest to the
   largest entry of the table, becomes 0..255. With neither, the image's own min..max becomes
   0..255.
3. Photometric interpretation: MONOCHROME2 means larger = brighter; MONOCHROME1 (usual for
   computed radiography) means larger = darker, so we invert: y = 255 - y.

Colour DICOM (RGB, or YBR which pydicom converts to RGB) is scaled by its bit depth.
pydicom is an optional extra (pip install 'mini_retrain[dicom]'), imported only when a DICOM file
is read. Compressed transfer syntaxes (JPEG lossless, JPEG 2000) also need pydicom's decoder
plugins (e.g. pylibjpeg); without them the file is a BadImageError saying so.
"""

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mini_retrain.errors import BadImageError

_INSTALL = "pip install 'mini_retrain[dicom]'"
_REEXPORT = "re-export the image from the archive as a single uncompressed DICOM file"


def read_dicom(path: str | os.PathLike) -> Image.Image:
    """Read a single-frame DICOM image as an 8-bit PIL image, mode "L" (grey) or "RGB"."""
    pydicom, pixels = _import_pydicom(path)
    try:
        # force=True: old files have no "DICM" preamble. Anything that then fails is not DICOM.
        dataset = pydicom.dcmread(path, force=True)
        if "PixelData" not in dataset:
            raise BadImageError(path, "DICOM file has no pixel data (a report or a study index?)",
                                _REEXPORT)
        if "TransferSyntaxUID" not in dataset.file_meta:
            _name_the_encoding(dataset, pydicom)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        photometric = str(dataset.PhotometricInterpretation).strip().upper()
    except BadImageError:
        raise
    except Exception as error:  # pydicom raises many types on malformed files
        raise BadImageError(path, f"not a readable DICOM image ({type(error).__name__}: {error})",
                            _REEXPORT) from None
    limit = Image.MAX_IMAGE_PIXELS  # the same limit as for other images (None: no limit)
    if limit and rows * columns > limit:  # checked before pydicom allocates the pixels
        raise BadImageError(path, f"{columns}x{rows} = {rows * columns} pixels is more than the "
                            f"{limit} allowed, a possible decompression bomb",
                            "downscale the image before using it")
    if frames > 1:
        raise BadImageError(path, f"multi-frame DICOM ({frames} frames) is not supported",
                            "export the one frame you want as its own file")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and \
            not photometric.startswith("YBR"):
        raise BadImageError(path, f"unsupported photometric interpretation {photometric!r}",
                            "export the image as MONOCHROME2 or RGB")
    try:
        stored = dataset.pixel_array  # (rows, columns) or (rows, columns, 3); YBR -> RGB
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        raise BadImageError(
            path,
            f"cannot decode the DICOM pixel data ({getattr(syntax, 'name', syntax)}; "
            f"{type(error).__name__}: {error})",
            f"{_REEXPORT}, or install pydicom's decoder plugins (pip install pylibjpeg)",
        ) from None
    expected_shape = (rows, columns) if photometric.startswith("MONOCHROME") else (rows, columns, 3)
    if stored.shape != expected_shape:
        raise BadImageError(path, f"pixel array shape {stored.shape} does not match the declared "
                            f"{expected_shape} of a {photometric} image", _REEXPORT)
    if photometric.startswith("MONOCHROME"):
        try:
            gray = _monochrome_to_8bit(stored, dataset, pixels)  # (rows, columns) floats 0..255
            if not np.isfinite(gray).all():
                raise ValueError("NaN or infinite values after rescale and window")
        except Exception as error:  # a malformed rescale, window or lookup table
            raise BadImageError(path, f"invalid DICOM grey-level mapping ({type(error).__name__}: "
                                f"{error})", _REEXPORT) from None
        if photometric == "MONOCHROME1":
            gray = 255.0 - gray
        return Image.fromarray(np.rint(gray).astype(np.uint8))  # uint8 (rows, columns) -> "L"
    # Colour: scale by the stored bit depth, y = x * 255 / (2**bits - 1).
    bits = int(dataset.get("BitsStored") or 0)
    if not 1 <= bits <= 16:
        raise BadImageError(path, f"invalid Bits Stored {bits} for a colour image", _REEXPORT)
    rgb = stored.astype(np.float64) * 255.0 / (2**bits - 1)  # (rows, columns, 3)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))  # -> "RGB"


def _import_pydicom(path):
    """(pydicom, pydicom.pixels), or a BadImageError telling how to install them."""
    try:
        import pydicom
    except ImportError:
        raise BadImageError(path, "reading DICOM needs the optional package pydicom, "
                            "which is not installed", _INSTALL) from None
    try:
        import pydicom.pixels
    except ImportError:  # pydicom < 3.0 has no pydicom.pixels
        raise BadImageError(path, f"pydicom {pydicom.__version__} is too old, 3.0 or newer is "
                            "needed", f"{_INSTALL} --upgrade") from None
    return pydicom, pydicom.pixels


def _name_the_encoding(dataset, pydicom) -> None:
    """A bare data set (no file meta) does not say how it is encoded, and pydicom will not decode
    its pixels until told. Only uncompressed encodings can be bare; pydicom detected which one
    while reading, so we name it."""
    implicit_vr, little_endian = dataset.original_encoding
    if implicit_vr:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    elif little_endian:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    else:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian


def _monochrome_to_8bit(stored: np.ndarray, dataset, pixels) -> np.ndarray:
    """Steps 1 and 2 of the module docstring: stored values -> grey levels 0..255 (floats)."""
    values = pixels.apply_modality_lut(stored, dataset)  # (rows, columns) physical values
    if dataset.get("VOILUTSequence"):
        # A lookup table maps integers; its range is the smallest..largest of its entries.
        values = np.rint(values).astype(np.int64)
        count, first, _ = dataset.VOILUTSequence[0].LUTDescriptor
        entries = pixels.apply_voi(np.arange(first, first + (count or 2**16)), dataset)
        looked_up = pixels.apply_voi(values, dataset).astype(np.float64)
        return _stretch(looked_up, float(entries.min()), float(entries.max()))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        # The element may hold several windows (e.g. "lungs", "bone"); the first is the default.
        center = float(_first(dataset.WindowCenter))
        width = float(_first(dataset.WindowWidth))
        function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
        return apply_window(values, center, width, function)
    values = np.asarray(values, dtype=np.float64)
    return _stretch(values, float(values.min()), float(values.max()))


def apply_window(values: np.ndarray, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 and C.11.2.1.3: window (center c, width w) -> floats in 0..255.

    LINEAR (the default; the 0.5 and 1 make an integer window cover exactly w integer values):
        y = 255 * ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to 0..255; w = 1 is a threshold
    LINEAR_EXACT:
        y = 255 * ((x - c) / w + 0.5),                clipped to 0..255
    SIGMOID:
        y = 255 / (1 + exp(-4 (x - c) / w))
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"a LINEAR window needs width >= 1, got {width}")
        if width == 1:
            return np.where(x > center - 0.5, 255.0, 0.0)
        return np.clip(255.0 * ((x - (center - 0.5)) / (width - 1) + 0.5), 0.0, 255.0)
    if width <= 0:
        raise ValueError(f"a {function} window needs width > 0, got {width}")
    if function == "LINEAR_EXACT":
        return np.clip(255.0 * ((x - center) / width + 0.5), 0.0, 255.0)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ValueError(f"unknown VOI LUT function {function!r}; expected LINEAR, LINEAR_EXACT or "
                     "SIGMOID")


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map low..high linearly onto 0..255 (everything to 0 when low == high)."""
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def _first(value):
    """The first value of a multi-valued DICOM element (pydicom's MultiValue), else the value."""
    return value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
