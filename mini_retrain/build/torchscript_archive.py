"""Read the tensors of a TorchScript archive (a `.pt` zip) with zipfile + pickle + NumPy, without torch.

A TorchScript file is a zip:

    <root>/code/__torch__/*.py   the forward code, readable Python-like text
    <root>/data.pkl              the module tree, pickled; each tensor is a *reference* to raw bytes
    <root>/data/<key>            the raw little-endian bytes of each tensor's storage

Unpickling runs code: a pickle names Python callables ("globals") and calls them. A weights file from the internet must
not be able to call `os.system`, so `_RestrictedUnpickler` refuses every global except the handful a tensor archive
needs: the module classes it defines itself (`__torch__.*`, which we turn into empty records), `OrderedDict`,
`torch._utils._rebuild_tensor_v2` (replaced by our own NumPy version), TorchScript's typed-list builders (plain `list`)
and the `torch.*Storage` dtype markers.

The result is a flat dictionary: "layers.mixed_10.conv.weight" -> np.ndarray, plus the modules' plain
attributes ("layers.conv.stride" -> 2).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class ArchiveError(ValueError):
    """The file is not a TorchScript archive we can read safely (damaged, truncated, or asks for a forbidden global)."""


# torch storage type name -> NumPy dtype (all stored little-endian).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class ModuleRecord:
    """Stands in for a pickled `__torch__.X` module: unpickling fills its `__dict__` with the module's attributes."""

    torch_class = "?"


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_ignored: Any) -> np.ndarray:
    """Our `torch._utils._rebuild_tensor_v2`: a strided view of a flat storage, copied to a C-contiguous array."""
    if not size:
        return storage[offset].copy()
    # Largest flat index the view touches must exist, otherwise the archive is damaged.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ArchiveError(f"a tensor of shape {tuple(size)} reads past the end of its storage (damaged archive)")
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.ascontiguousarray(view)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__") and name.isidentifier():
            # The archive's own module classes: an empty record that the pickle fills with attributes.
            return type(name, (ModuleRecord,), {"torch_class": f"{module}.{name}"})
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list  # TorchScript's typed lists, e.g. a conv's padding [0, 1]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise ArchiveError(
            f"the pickle asks for the global {module}.{name}, which a weights archive never needs; refusing to run it"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        # pid = ("storage", dtype, key, location, numel): the tensor bytes live in <root>/data/<key>.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise ArchiveError(f"unexpected persistent id {pid!r} in data.pkl")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            member = f"{self._root}/data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise ArchiveError(f"tensor storage {member} is missing (truncated archive)") from None
            if len(raw) < numel * dtype.itemsize:
                raise ArchiveError(f"tensor storage {member} holds {len(raw)} bytes, needs {numel * dtype.itemsize}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        return self._storages[key]


def _flatten(record: Any, prefix: str, out: dict[str, Any]) -> None:
    """Walk the module tree; keep tensors and plain attributes under dotted names."""
    for name, value in vars(record).items():
        if name.startswith("_") or name == "training":
            continue
        key = f"{prefix}{name}"
        if isinstance(value, ModuleRecord):
            _flatten(value, key + ".", out)
        elif isinstance(value, (np.ndarray, int, float, list, tuple)) and not isinstance(value, bool):
            out[key] = value


def read_archive(path: str | Path) -> dict[str, Any]:
    """Return {dotted name: array or attribute} for every tensor and attribute of a TorchScript archive.

    Raises ArchiveError (a ValueError) with a one-line reason for anything that is not a safe, complete archive.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ArchiveError(f"{path}: not a TorchScript archive (no single */data.pkl inside)")
            root = pickles[0][: -len("/data.pkl")]
            payload = archive.read(pickles[0])
            tree = _RestrictedUnpickler(io.BytesIO(payload), archive, root).load()
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
        raise ArchiveError(f"{path}: not a readable zip archive ({error}); download it again") from None
    except ArchiveError as error:
        message = str(error)
        raise ArchiveError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError) as error:
        raise ArchiveError(f"{path}: damaged data.pkl ({error})") from None
    if not isinstance(tree, ModuleRecord):
        raise ArchiveError(f"{path}: data.pkl does not hold a module")
    tensors: dict[str, Any] = {}
    _flatten(tree, "", tensors)
    return tensors
