"""Write a file so that no reader ever sees half of it: write a temporary file beside it, then rename.

A rename within one folder is atomic on POSIX and Windows file systems: the target is either the old file or the
complete new one. A run killed mid-write leaves only a hidden `.name.*.tmp`, which nothing reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(target: str | Path, payload: bytes) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
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
