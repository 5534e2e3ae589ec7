"""Atomic file replacement: a crash at any moment leaves the old file or the new one, both complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from autocaption.paths import TEMP_PREFIX


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderSyncs:
    """The folders whose renames still wait for their fsync, and those whose fsync failed (folder: reason)."""

    def __init__(self) -> None:
        self.waiting: dict[Path, None] = {}  # a dict keeps the order folders were first written in
        self.failed: dict[Path, str] = {}

    def flush(self) -> None:
        for folder in self.waiting:
            try:
                fsync_dir(folder)
            except OSError as exc:
                self.failed[folder] = exc.strerror or str(exc)
        self.waiting.clear()


_batch = threading.local()  # this thread's FolderSyncs while a batch is open; other threads sync at once


@contextlib.contextmanager
def batched_folder_syncs() -> Iterator[FolderSyncs]:
    """Within the block, this thread's atomic writes fsync their file before the rename, as always, but fsync
    each folder once, when the block ends, rather than once per write: a batch of photos in one folder costs
    one folder fsync instead of three per photo (photo, JSON sidecar, XMP sidecar).

    A crash before the folder's fsync leaves each file's old version or its new one, both complete, as
    before; only which of the two survives is decided later. Callers must not record a write as done (the
    journal) until the block has ended, and must treat a folder in `failed` as not durably written.
    """
    if getattr(_batch, "syncs", None) is not None:  # nested: the outer block syncs
        yield _batch.syncs
        return
    syncs = FolderSyncs()
    _batch.syncs = syncs
    try:
        yield syncs
    finally:
        _batch.syncs = None
        syncs.flush()


def _sync_folder(folder: Path) -> None:
    syncs: FolderSyncs | None = getattr(_batch, "syncs", None)
    if syncs is None:
        fsync_dir(folder)
    else:
        syncs.waiting[folder] = None


def _replace_with(path: Path, data: bytes, prepare: Callable[[Path], None]) -> None:
    """Write `data` to a temp file beside `path`, let `prepare` set its metadata, fsync, rename over `path`,
    fsync the folder (now, or when this thread's batch of writes ends). The temp name starts with TEMP_PREFIX
    so watchers and folder walks ignore it."""
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            prepare(temp)  # before the fsync, so mode, times and owner are as durable as the bytes
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_folder(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file of ours (a sidecar) atomically. Raises OSError."""
    _replace_with(path, data, lambda temp: os.chmod(temp, mode))


class RefusedError(OSError):
    """Replacing the file would change something we must not change (ownership, other hard links)."""


def replace_faithfully(path: Path, data: bytes) -> os.stat_result:
    """Replace `path`'s content with `data` atomically, keeping mode, times, xattrs and ownership.

    A crash at any moment leaves either the old file or the new one, both complete. Returns the new
    file's stat. Raises RefusedError or OSError.
    """
    original = path.stat()
    if original.st_nlink > 1:
        raise RefusedError(f"has {original.st_nlink} hard links; the other names would keep the old content")

    def keep_metadata(temp: Path) -> None:
        shutil.copystat(path, temp)  # mode, times, extended attributes (ACLs, tags, quarantine)
        if (original.st_uid, original.st_gid) != (os.getuid(), os.getgid()):
            try:
                os.chown(temp, original.st_uid, original.st_gid)
            except PermissionError:
                raise RefusedError("is owned by another user; refusing to change its ownership") from None
        os.utime(temp, ns=(original.st_atime_ns, original.st_mtime_ns))

    _replace_with(path, data, keep_metadata)
    return path.stat()
