"""Writes that a crash or a power cut cannot tear: the one copy every side uses.

A file is replaced by writing a temporary file beside it, flushing it to disk, renaming it over
the old one and flushing the folder, so the rename itself is on disk too. A reader, or the
machine after a crash, sees the old content or the new, never half of either.

Nothing here may import mlx.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_path"]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush ``path`` to disk: a file's content, or a folder's entries (after a rename)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``, with permissions ``mode``, so a crash leaves the old
    file or the new, never half; makes the folder first if it is missing. The temporary file
    (a hidden name beside ``path``) is removed if the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file 0600 whatever the umask; launchd, for one, refuses a plist
        # that group or others can write, so the mode is always set, never inherited.
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
