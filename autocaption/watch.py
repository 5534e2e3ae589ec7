"""Watching folders: watchdog events become settled, complete files for the journal's queue.

The event handler runs on watchdog's single dispatcher thread and only records the path (a dict
update under a lock). A settler thread decides when a file is complete: quiet for `settle_seconds`,
size > 0 and unchanged across two checks, and structurally complete (JPEG EOI, PNG IEND, WebP RIFF
size). Filtering is on the destination name, so browser `.crdownload`/`.part` files and rsync's
`.name.XXXXXX` temp files are ignored until their final rename. Folders created or moved in are
walked, because a file written into a brand-new folder may arrive before its watch exists.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from autocaption.complete import looks_complete, stat_key
from autocaption.config import WatchConfig
from autocaption.discover import Candidate, relative_path, walk
from autocaption.errors import ConfigError
from autocaption.paths import TEMP_PREFIX, display

log = logging.getLogger(__name__)

# What we ask the kernel to report: not opens and reads (our own reads would wake us up).
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, DirCreatedEvent, DirMovedEvent]
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "fuse.sshfs",
                       "fuse.rclone", "fuse.glusterfs", "davfs", "fuse.davfs2"}  # fmt: skip
INOTIFY_LIMIT_HELP = (
    "the inotify watch limit is reached (one watch per folder). Raise it with "
    "`sudo sysctl fs.inotify.max_user_watches=1048576` and make it permanent in "
    "/etc/sysctl.d/90-autocaption.conf; until then this folder is polled"
)


@dataclass
class _Pending:
    watch: WatchConfig
    due: float  # monotonic time of the next check
    key: tuple[int, int] | None = None  # (size, mtime) at the last check
    stable_since: float | None = None


class Settler:
    """Holds paths until their files are complete, then passes them to `ready` in one call per round."""

    def __init__(self, ready: Callable[[list[Candidate]], None], interval: float = 0.2) -> None:
        self.ready = ready
        self.interval = interval
        self._pending: dict[Path, _Pending] = {}
        self._folders: list[tuple[Path, WatchConfig]] = []
        self._lock = threading.Lock()

    def touch(self, path: Path, watch: WatchConfig) -> None:
        with self._lock:
            entry = self._pending.get(path)
            due = time.monotonic() + watch.settle_seconds
            if entry is None:
                self._pending[path] = _Pending(watch, due)
            else:
                entry.due, entry.stable_since = due, None

    def folder(self, path: Path, watch: WatchConfig) -> None:
        with self._lock:
            self._folders.append((path, watch))

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.step()

    def step(self) -> None:
        with self._lock:
            folders, self._folders = self._folders, []
        for folder, watch in folders:
            self._walk(folder, watch)
        now = time.monotonic()
        with self._lock:
            due = [(path, entry) for path, entry in self._pending.items() if entry.due <= now]
        done: list[Candidate] = []
        for path, entry in due:
            verdict = self._check(path, entry, now)
            if verdict is not None:
                with self._lock:
                    if self._pending.get(path) is entry:
                        del self._pending[path]
                if verdict:
                    done.append(Candidate(path, relative_path(path, entry.watch.path), entry.watch.path))
        if done:
            self.ready(done)

    def _check(self, path: Path, entry: _Pending, now: float) -> bool | None:
        """True: take it; False: drop it (gone); None: look again later."""
        key = stat_key(path)
        if key is None:
            return False
        settle = entry.watch.settle_seconds
        recheck = now + max(settle / 2, self.interval)
        if key[0] == 0 or key != entry.key:
            entry.key, entry.due, entry.stable_since = key, recheck, None
            return None
        if entry.stable_since is None:
            entry.stable_since = now
        # Stable twice. A file that still looks unfinished gets more time, but not forever: after a long
        # quiet spell it goes to the decoder, which reports a truncated file clearly.
        if looks_complete(path) or now - entry.stable_since > 5 * settle + 10:
            return True
        entry.due = recheck
        return None

    def _walk(self, folder: Path, watch: WatchConfig) -> None:
        try:
            found = list(walk(folder, watch.path, watch.include, watch.exclude, recursive=watch.recursive))
        except OSError as exc:
            log.warning("%s: cannot scan new folder: %s", display(folder), exc.strerror or exc)
            return
        for item in found:
            if isinstance(item, Candidate):
                self.touch(item.path, watch)


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: filter by name and record the path, nothing else."""

    def __init__(self, watch: WatchConfig, settler: Settler) -> None:
        self.watch = watch
        self.settler = settler

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "modified", "moved", "closed"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.settler.folder(path, self.watch)
            return
        if path.name.startswith(TEMP_PREFIX):
            return
        relative = relative_path(path, self.watch.path)
        if self.watch.include.matches(relative) and not self.watch.exclude.matches(relative):
            self.settler.touch(path, self.watch)


def is_network_mount(path: Path) -> bool:
    """True when `path` lives on NFS/SMB/... where inotify does not see other machines' writes."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    best, fstype = "", ""
    target = str(path.resolve())
    for line in lines:
        fields = line.split(" - ", 1)
        mount_point = fields[0].split()[4].replace("\\040", " ")
        if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, fields[1].split()[0] if len(fields) > 1 else ""
    return fstype in NETWORK_FILESYSTEMS


class _OverflowLog(logging.Handler):
    """watchdog 7.1 logs an inotify queue overflow but sends no event: turn the log record into a call."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class Watchers:
    """One inotify observer for local folders, one polling observer per network or polled folder."""

    def __init__(self, watches: tuple[WatchConfig, ...], settler: Settler, on_overflow: Callable[[], None]) -> None:
        self.watches = watches
        self.settler = settler
        self.observers: list[BaseObserver] = []
        self._overflow = _OverflowLog(on_overflow)

    def start(self) -> None:
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).addHandler(self._overflow)
        inotify: BaseObserver | None = None
        for watch in self.watches:
            if not watch.path.is_dir():
                raise ConfigError(f"watch: {display(watch.path)}: folder does not exist")
            polled = watch.polling == "yes" or (watch.polling == "auto" and is_network_mount(watch.path))
            if not polled:
                if inotify is None:
                    inotify = Observer()
                    inotify.start()
                    self.observers.append(inotify)
                try:
                    inotify.schedule(_Handler(watch, self.settler), str(watch.path), recursive=watch.recursive,
                                     event_filter=EVENTS)  # fmt: skip
                    log.info("watching %s (inotify)", display(watch.path))
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                        raise
                    log.error("%s: %s", display(watch.path), INOTIFY_LIMIT_HELP)
            poller = PollingObserver(timeout=watch.poll_seconds)
            poller.schedule(_Handler(watch, self.settler), str(watch.path), recursive=watch.recursive)
            poller.start()
            self.observers.append(poller)
            log.info("watching %s (polling every %.0f s)", display(watch.path), watch.poll_seconds)

    def stop(self) -> None:
        for observer in self.observers:
            observer.stop()
        for observer in self.observers:
            observer.join(timeout=10)
        self.observers.clear()
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._overflow)
