"""Where mini_retrain keeps its files, and how it writes them.

`cache_dir()`: the per-user folder for the backbone and the bottleneck cache.

`write_bytes_atomically` (and `write_file_atomically`, for content written piece by piece): so that no reader ever
sees half a file, write a temporary file beside it, then rename.

A rename within one folder is atomic on POSIX and Windows file systems: the target is either the old file or the
complete new one. A run killed mid-write leaves only a hidden `.name.*.tmp`, which nothing reads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_bytes_atomically(target: str | Path, payload: bytes) -> Path:
    return write_file_atomically(target, lambda file: file.write(payload))


def write_file_atomically(target: str | Path, fill: Callable[[BinaryIO], object]) -> Path:
    """fill(file) writes the content into a temporary file beside `target` (its name is file.name), which is then
    renamed onto `target`; if fill raises, the temporary file is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.close(handle)
        with open(temporary, "wb") as file:
            fill(file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def cache_dir() -> Path:
    """Per-user folder for the backbone: $MINI_RETRAIN_HOME, else $XDG_CACHE_HOME/mini_retrain, else ~/.cache/mini_retrain."""
    if os.environ.get("MINI_RETRAIN_HOME"):
        return Path(os.environ["MINI_RETRAIN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mini_retrain"
