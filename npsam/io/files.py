"""Writing files so that nothing is ever half-written.

Every file npsam writes (masks, PNGs, JSON records, weights, embeddings) goes
to a temporary file in the destination's folder and is renamed over the
destination only once complete; on any error the temporary file is removed
and the destination is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def umask() -> int:
    """The process's umask, read without changing it where the system tells it
    (os.umask can only read it by setting it, which other threads would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to
    ``path`` with the mode a new file gets under the umask (mkstemp makes it 0600)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
