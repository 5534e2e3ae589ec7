"""Atomic file replacement: a crash at any moment leaves the old file or the new one, both complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from autocaption.paths import TEMP_PREFIX


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync'd, then renamed over it.

    The temp name starts with TEMP_PREFIX so watchers and folder walks ignore it. Raises OSError.
    """
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


class RefusedError(OSError):
    """Replacing the file would change something we must not change (ownership, other hard links)."""


def replace_faithfully(path: Path, data: bytes) -> os.stat_result:
    """Replace `path`'s content with `data` atomically, keeping mode, times, xattrs and ownership.

    The new file is complete and fsync'd before the rename; a crash at any moment leaves either the old
    file or the new one. Returns the new file's stat. Raises RefusedError or OSError.
    """
    original = path.stat()
    if original.st_nlink > 1:
        raise RefusedError(f"has {original.st_nlink} hard links; the other names would keep the old content")
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.copystat(path, temp)  # mode, atime/mtime, extended attributes (ACLs, tags, quarantine)
        if (original.st_uid, original.st_gid) != (os.getuid(), os.getgid()):
            try:
                os.chown(temp, original.st_uid, original.st_gid)
            except PermissionError:
                raise RefusedError("is owned by another user; refusing to change its ownership") from None
        os.utime(temp, ns=(original.st_atime_ns, original.st_mtime_ns))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)
    return path.stat()
