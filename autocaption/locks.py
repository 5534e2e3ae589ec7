"""Locks under `state.dir` that keep autocaption processes from stepping on each other.

- `DaemonLock`: one daemon per `state.dir`, held for the daemon's whole life. A second daemon refuses
  to start (before loading the model), naming the first one's pid.
- `PhotoLocks`: one writer at a time per photo, across processes and threads (the daemon, `process`,
  the web page's edits). Held only while a photo and its sidecars are checked and written (milliseconds),
  never while the model works.

Both are `flock` locks: they belong to an open file, so they are released by the kernel when a process
dies (kill -9 included) and they exclude threads of one process from each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from autocaption.errors import AutocaptionError, WriteError
from autocaption.paths import display

DAEMON_LOCK = "daemon.lock"
WAITING_FILE = "waiting"  # beside it while the daemon waits (for the server, for space): what it waits for
POLLED_FILE = "polled"  # beside it while folders are polled because inotify cannot watch them: how many, and why
SERVERS_FILE = "servers"  # beside it while the daemon uses several inference servers: which are up


def daemon_note(state_dir: Path, name: str) -> str | None:
    """What the daemon left in state_dir/`name` (WAITING_FILE, POLLED_FILE) for other processes to show."""
    try:
        return (state_dir / name).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


PHOTO_LOCK_DIR = "locks"
PHOTO_LOCK_BUCKETS = 256  # photos share lock files by hash: enough to keep unrelated photos from waiting


class AlreadyRunning(AutocaptionError):
    """Another daemon holds this state.dir."""


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


class DaemonLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DAEMON_LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock for this process's life, or raise AlreadyRunning naming the holder."""
        try:
            fd = _open_lock(self.path)
        except OSError as exc:
            what = f"state.dir: {display(self.path)}: cannot create the lock"
            raise AlreadyRunning(f"{what}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            raise AlreadyRunning(
                f"state.dir: {display(self.path.parent)} is in use by another autocaption daemon"
                f"{f' (pid {pid})' if pid else ''}; stop it first, or give this one its own state.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the daemon holding the lock, or None when no daemon holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class PhotoLocks:
    """Per-photo write locks shared by every autocaption process using the same state.dir."""

    def __init__(self, state_dir: Path, *, timeout: float = 120.0) -> None:
        self.folder = state_dir / PHOTO_LOCK_DIR
        self.timeout = timeout

    def _bucket(self, photo: Path) -> Path:
        digest = hashlib.sha1(os.fsencode(photo), usedforsecurity=False).digest()
        return self.folder / f"{int.from_bytes(digest[:4], 'big') % PHOTO_LOCK_BUCKETS:03d}.lock"

    @contextlib.contextmanager
    def hold(self, photo: Path) -> Iterator[None]:
        """Exclusive right to write `photo` and its sidecars. Raises a transient WriteError when another
        process keeps it longer than `timeout` (a write takes milliseconds: that one is stuck)."""
        try:
            fd = _open_lock(self._bucket(photo))
        except OSError as exc:
            what = f"{display(photo)}: cannot take the write lock in {display(self.folder)}"
            raise WriteError.from_os(what, exc) from None
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WriteError(
                            f"{display(photo)}: another autocaption process has been writing it for "
                            f"{self.timeout:.0f} s; will retry",
                            transient=True,
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)
