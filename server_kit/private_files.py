"""The one writer of private files (keys, certificates, key files, authorized_keys, enrollment state).

A private file is written to a temporary file in the same directory — created by ``mkstemp``, so it is
mode 0600 from its first instant and never readable by others, even briefly — synced to disk, and then
renamed over the target, so a reader (sshd, nbdkit, the next start) sees the old file or the new one,
never a half-written one, even after a crash. The directory is synced too, so the rename itself
survives a power cut. ``exclusive=True`` links the finished file into place instead of renaming, which
fails when the target already exists: two processes creating the same key file at once end up with
one key, not two.

Hand-written because it is a dozen lines over ``os``; the libraries that offer atomic writes
(``atomicwrites``, unmaintained since 2022) do not create the file 0600 from the start or link
exclusively.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path | str, data: bytes | str, mode: int = PRIVATE_MODE, *, exclusive: bool = False,
                  owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` atomically with ``data`` (text is UTF-8), readable as ``mode`` (default 0600).

    ``exclusive``: fail with :class:`FileExistsError` instead of replacing an existing file.
    ``owner``: ``(uid, gid)`` to give the file (needs root; e.g. sshd reading as another account).
    The parent directory must exist. On any failure the target is untouched and no temporary file is left.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600 from creation
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != PRIVATE_MODE:
                os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and refuses an existing target (os.replace would overwrite it)
        else:
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
