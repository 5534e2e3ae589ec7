"""Watching folders: watchdog events become settled, complete files for the journal's queue.

The event handler runs on watchdog's single dispatcher thread and only records the path (a dict
update under a lock). A settler thread decides when a file is complete: quiet for `settle_seconds`,
size > 0 and unchanged across two checks, and structurally complete (JPEG EOI, PNG IEND, WebP RIFF
size). Filtering is on the destination name, so browser `.crdownload`/`.part` files and rsync's
`.name.XXXXXX` temp files are ignored until their final rename. Folders created or moved in are
walked, because a file written into a brand-new folder may arrive before its watch exists.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
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
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from autocaption.complete import looks_complete, stat_key
from autocaption.config import WatchConfig
from autocaption.discover import Candidate, relative_path, walk
from autocaption.paths import TEMP_PREFIX, display
from autocaption.plural import counted

log = logging.getLogger(__name__)

# What we ask the kernel to report: not opens and reads (our own reads would wake us up).
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, DirCreatedEvent, DirMovedEvent]
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "fuse.sshfs",
                       "fuse.rclone", "fuse.glusterfs", "davfs", "fuse.davfs2"}  # fmt: skip
EMPTY_FILE_WAIT = 60.0  # seconds an empty file may stay empty before it is reported
_SYSCTL = ("`sudo sysctl fs.inotify.max_user_watches=1048576` and make it permanent in "
           "/etc/sysctl.d/90-autocaption.conf")  # fmt: skip
RAISE_LIMIT = f"raise it with {_SYSCTL}"
INOTIFY_LIMIT_HELP = (f"the inotify watch limit is reached (one watch per folder). Raise it with {_SYSCTL}; "
                      "until then this folder is polled")  # fmt: skip
# One line per watch of /proc/self/fdinfo/<inotify fd>: the watched inode and its device (kernel encoding),
# every number in hex, the watch descriptor too ("wd:1a": a decimal-only pattern missed 6 watches in 16).
_FDINFO = re.compile(r"^inotify wd:[0-9a-f]+ ino:([0-9a-f]+) sdev:([0-9a-f]+)", re.MULTILINE)


@dataclass
class _Pending:
    watch: WatchConfig
    due: float  # monotonic time of the next check
    key: tuple[int, int] | None = None  # (size, mtime) at the last check
    stable_since: float | None = None  # monotonic time since when the key has not changed


class Settler:
    """Holds paths until their files are complete, then passes them to `ready` in one call per round."""

    def __init__(
        self, ready: Callable[[list[Candidate]], None], interval: float = 0.2, empty_wait: float = EMPTY_FILE_WAIT
    ) -> None:
        self.ready = ready
        self.interval = interval
        self.empty_wait = empty_wait
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
        if key != entry.key:
            entry.key, entry.due, entry.stable_since = key, recheck, None
            return None
        if entry.stable_since is None:
            entry.stable_since = now
        quiet = now - entry.stable_since
        # Stable twice. A file that still looks unfinished gets more time, but not forever: after a long
        # quiet spell it goes to the decoder, which reports it clearly (truncated). An empty file waits
        # longest (a browser creates the final name empty while it downloads next to it), then is reported.
        if key[0] == 0:
            if quiet > self.empty_wait:
                return True
        elif looks_complete(path) or quiet > 5 * settle + 10:
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

    def __init__(self, watch: WatchConfig, settler: Settler, on_folder: Callable[[Path, WatchConfig], None]) -> None:
        self.watch = watch
        self.settler = settler
        self.on_folder = on_folder  # a folder created or moved in: is it watched? (Watchers.check looks)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "modified", "moved", "closed"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        path = Path(os.fsdecode(raw))
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.settler.folder(path, self.watch)
                self.on_folder(path, self.watch)
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


@dataclass
class _Armed:
    """A watch in force: the observer that runs it, its handle there, and the folder it was set on."""

    observer: BaseObserver
    handle: ObservedWatch
    identity: tuple[int, int]  # (st_dev, st_ino) of the folder: a new folder under the same name differs
    shared: bool  # the one inotify observer (kept running) rather than a polling observer of its own
    mounts: frozenset[str] = frozenset()  # mount points inside the folder when it was armed


def inotify_watched() -> set[tuple[int, int]] | None:
    """(device, inode) of every folder this process's inotify instances watch, as the kernel holds them
    (/proc/self/fdinfo), whatever watchdog believes: it skips a subfolder it cannot watch without a word.
    None where /proc cannot tell."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    watched: set[tuple[int, int]] = set()
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text(encoding="ascii")
        except OSError:  # closed meanwhile (our own listdir's fd)
            continue
        for inode, device in _FDINFO.findall(info):
            kernel = int(device, 16)  # major << 20 | minor, where st_dev is the user-space encoding
            watched.add((os.makedev(kernel >> 20, kernel & 0xFFFFF), int(inode, 16)))
    return watched


def unwatched_folders(top: Path, watched: set[tuple[int, int]]) -> list[Path]:
    """The topmost folders of the tree at `top` (itself included) that no inotify watch holds; what is
    under them is polled with them. Symbolic links are not followed (as watchdog does not)."""
    found: list[Path] = []
    devices = _mount_devices()
    # Below `top` nothing is a symlink followed: its real path once, and every folder's is that plus the rest.
    spelled, real = str(top), os.path.realpath(top)
    stack = [spelled]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder, follow_symlinks=False)
        except OSError:  # gone meanwhile
            continue
        if (kernel_device(real + folder[len(spelled) :], devices, st.st_dev), st.st_ino) not in watched:
            found.append(Path(folder))
            continue
        try:
            with os.scandir(folder) as entries:
                stack.extend(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
        except OSError:
            continue
    return sorted(found)


class _SubtreePoller:
    """Looks every `poll_seconds` at the folders inotify could not watch (the watch limit): what is new or
    changed there since the last look goes to the settler, as an inotify event would. The first look at a
    folder hands over everything in it (the journal leaves photos already described alone): a file that
    arrived before the folder was found unwatched is not missed."""

    def __init__(self, settler: Settler) -> None:
        self.settler = settler
        self._folders: dict[WatchConfig, list[Path]] = {}
        self._seen: dict[Path, tuple[int, int]] = {}  # what the last round found (no more: files go)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # new folders: look now, at their own watch's interval from then on
        self._thread: threading.Thread | None = None

    def set(self, watch: WatchConfig, folders: list[Path]) -> None:
        with self._lock:
            if folders:
                self._folders[watch] = _outermost(folders)
            else:
                self._folders.pop(watch, None)
        self._wake.set()
        if folders and self._thread is None:
            self._stop = threading.Event()  # (a thread that outlived the last stop() keeps its own, set)
            self._thread = threading.Thread(target=self._run, args=(self._stop,), name="poll-unwatched", daemon=True)
            self._thread.start()

    def add(self, watch: WatchConfig, folders: list[Path]) -> None:
        with self._lock:
            merged = self._folders.get(watch, []) + folders
        self.set(watch, merged)

    def count(self) -> int:
        with self._lock:
            return sum(len(folders) for folders in self._folders.values())

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                self._round()
            except Exception as exc:  # noqa: BLE001 - the poller must outlive one bad look; the reconcile remains
                log.warning("watch: polling the unwatched folders failed this round: %s", exc)
            with self._lock:
                interval = min((w.poll_seconds for w in self._folders), default=30.0)
            self._wake.wait(interval)

    def _round(self) -> None:
        seen: dict[Path, tuple[int, int]] = {}
        with self._lock:
            polled = {watch: list(folders) for watch, folders in self._folders.items()}
        for watch, folders in polled.items():
            present = [folder for folder in folders if folder.is_dir()]
            for folder in present:
                self._look(folder, watch, seen)
            if len(present) != len(folders):  # folders gone (renamed: its new name was found as created)
                with self._lock:
                    if self._folders.get(watch) == folders:
                        self._folders[watch] = present
        self._seen = seen

    def _look(self, folder: Path, watch: WatchConfig, seen: dict[Path, tuple[int, int]]) -> None:
        try:
            found = list(walk(folder, watch.path, watch.include, watch.exclude, recursive=watch.recursive))
        except OSError:  # the folder is gone
            return
        for item in found:
            if isinstance(item, Candidate):
                key = stat_key(item.path)
                if key is None:
                    continue
                seen[item.path] = key
                if self._seen.get(item.path) != key:
                    self.settler.touch(item.path, watch)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _outermost(folders: list[Path]) -> list[Path]:
    """The folders without those under another of them (each is polled with its whole subtree)."""
    kept: list[Path] = []
    for folder in sorted(set(folders)):
        if not kept or not folder.is_relative_to(kept[-1]):
            kept.append(folder)
    return kept


class Watchers:
    """One inotify observer for local folders, one polling observer per network or polled folder.

    A watched folder that does not exist (yet) is not an error: a NAS mounted late, an external disk, a
    folder deleted and created again. `check` (called every few seconds) arms a folder as soon as it
    appears and re-arms one that was replaced (another inode under the same name, a mount on top of it),
    and says so, so the caller can reconcile the folder's contents.

    inotify needs one watch per folder, and watchdog skips the subfolders it cannot watch (the watch limit)
    without a word: after arming a tree, and for every folder created in it later, the kernel's own list of
    watches is compared with the folders, and those left out are polled (`_SubtreePoller`), said in one line.
    """

    def __init__(self, watches: tuple[WatchConfig, ...], settler: Settler, on_overflow: Callable[[], None]) -> None:
        self.watches = watches
        self.settler = settler
        self._armed: dict[WatchConfig, _Armed] = {}
        self._told: dict[WatchConfig, str] = {}  # the last thing said about a folder not watched: said once
        self._inotify: BaseObserver | None = None
        self._overflow = _OverflowLog(on_overflow)
        self._poller = _SubtreePoller(settler)
        self._created: list[tuple[Path, WatchConfig]] = []  # folders created since the last check
        self._created_lock = threading.Lock()

    @property
    def polled_folders(self) -> int:
        """Folders (with what is under them) polled because inotify could not watch them."""
        return self._poller.count()

    @property
    def observers(self) -> list[BaseObserver]:
        return [armed.observer for armed in self._armed.values()]

    def start(self) -> None:
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).addHandler(self._overflow)
        self.check()

    def update(self, watches: tuple[WatchConfig, ...]) -> None:
        """New watch settings (SIGHUP): folders no longer listed (or changed) are dropped, new ones armed."""
        for watch in [w for w in self._armed if w not in watches]:
            self._disarm(watch)
        self._told = {w: told for w, told in self._told.items() if w in watches}
        self.watches = watches
        self.check()

    def check(self) -> bool:
        """Arm the folders that appeared, re-arm the replaced ones, poll the new folders inotify could not
        watch. True when any was (re)armed: files may have arrived in it while nobody watched."""
        self._cover_created()
        armed_any = False
        points = _mount_points()
        for watch in self.watches:
            identity = _identity(watch.path)
            armed = self._armed.get(watch)
            mounts = _inside(watch, points)
            if armed is not None and armed.identity == identity and armed.mounts != mounts:
                # A disk mounted on (or taken off) a subfolder: inotify watched the folder underneath, not the
                # disk. The tree is watched again, and reconciled.
                changed = ", ".join(sorted(display(p) for p in armed.mounts ^ mounts))
                log.info("watch: %s: a mount changed at %s; watching the tree again", display(watch.path), changed)
                self._disarm(watch)
                if self._arm(watch, identity, mounts):
                    armed_any = True
                continue
            if armed is not None and armed.identity == identity:
                continue
            if armed is not None:
                self._disarm(watch)
                if identity is None:
                    self._tell(watch, "folder is gone; it is watched again as soon as it reappears", logging.WARNING)
                    continue
                log.info("watch: %s: the folder was replaced; watching the new one", display(watch.path))
            if identity is None:
                self._tell(watch, "folder does not exist (yet); it is watched as soon as it appears", logging.WARNING)
                continue
            if self._arm(watch, identity, mounts):
                armed_any = True
        return armed_any

    def _tell(self, watch: WatchConfig, message: str, level: int) -> None:
        if self._told.get(watch) != message:
            self._told[watch] = message
            log.log(level, "watch: %s: %s", display(watch.path), message)

    def _arm(self, watch: WatchConfig, identity: tuple[int, int], mounts: frozenset[str] = frozenset()) -> bool:
        try:
            self._armed[watch] = dataclasses.replace(self._schedule(watch, identity), mounts=mounts)
        except OSError as exc:
            self._tell(watch, f"cannot watch: {exc.strerror or exc}; trying again", logging.ERROR)
            return False
        self._told.pop(watch, None)
        return True

    def _schedule(self, watch: WatchConfig, identity: tuple[int, int]) -> _Armed:
        handler = _Handler(watch, self.settler, self._folder_created)
        polled = watch.polling == "yes" or (watch.polling == "auto" and is_network_mount(watch.path))
        if not polled:
            if self._inotify is None:
                self._inotify = Observer()
                self._inotify.start()
            handle = self._inotify_schedule(handler, watch, recursive=watch.recursive)
            if handle is None and watch.recursive:
                # watchdog 7.1.1 gives up a whole tree when one of its folders finds no watch left (7.1.0 kept
                # those that fit): the top folder alone, then, and the folders under it polled (`_cover`).
                handle = self._inotify_schedule(handler, watch, recursive=False)
            if handle is not None:
                log.info("watching %s (inotify)", display(watch.path))
                if watch.recursive:
                    self._cover(watch)
                return _Armed(self._inotify, handle, identity, shared=True)
            log.error("%s: %s", display(watch.path), INOTIFY_LIMIT_HELP)
        poller = PollingObserver(timeout=watch.poll_seconds)
        handle = poller.schedule(handler, str(watch.path), recursive=watch.recursive)
        poller.start()
        log.info("watching %s (polling every %.0f s)", display(watch.path), watch.poll_seconds)
        return _Armed(poller, handle, identity, shared=False)

    def _inotify_schedule(self, handler: _Handler, watch: WatchConfig, *, recursive: bool) -> ObservedWatch | None:
        """The inotify watch of a folder (and its tree), or None when the kernel's watch limit refused it."""
        assert self._inotify is not None
        try:
            return self._inotify.schedule(handler, str(watch.path), recursive=recursive, event_filter=EVENTS)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            return None

    def _cover(self, watch: WatchConfig) -> None:
        """Poll the folders of the tree that inotify holds no watch for."""
        watched = inotify_watched()
        if watched is None:
            return
        left_out = unwatched_folders(watch.path, watched)
        self._poller.set(watch, left_out)
        if left_out:
            _tell_polled(watch, f"{counted(len(left_out), 'folder')} of the tree")

    def _folder_created(self, path: Path, watch: WatchConfig) -> None:
        """On watchdog's dispatcher thread: remembered for the next `check`."""
        with self._created_lock:
            self._created.append((path, watch))

    def _cover_created(self) -> None:
        with self._created_lock:
            created, self._created = self._created, []
        if not created:
            return
        watched = inotify_watched()
        if watched is None:
            return
        for watch in {watch for _, watch in created}:
            if watch not in self._armed or not self._armed[watch].shared or not watch.recursive:
                continue  # polled already, or no longer watched
            left_out = [f for path, w in created if w == watch for f in unwatched_folders(path, watched)]
            if left_out:
                self._poller.add(watch, left_out)
                _tell_polled(watch, counted(len(left_out), "new folder"))

    def _disarm(self, watch: WatchConfig) -> None:
        self._poller.set(watch, [])
        armed = self._armed.pop(watch)
        try:
            armed.observer.unschedule(armed.handle)
        except KeyError:  # watchdog already dropped it
            log.debug("watch: %s: already unscheduled", display(watch.path))
        if not armed.shared:
            armed.observer.stop()
            armed.observer.join(timeout=10)

    def stop(self) -> None:
        for watch in list(self._armed):
            self._disarm(watch)
        self._poller.stop()
        if self._inotify is not None:
            self._inotify.stop()
            self._inotify.join(timeout=10)
            self._inotify = None
        for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
            logging.getLogger(name).removeHandler(self._overflow)


def _tell_polled(watch: WatchConfig, which: str) -> None:
    log.error("watch: %s: %s cannot be watched: the inotify watch limit is reached (one watch per folder); they "
              "are polled every %.0f s until it is raised: %s", display(watch.path), which, watch.poll_seconds,
              RAISE_LIMIT)  # fmt: skip


def _mount_devices() -> list[tuple[str, int]]:
    """(mount point, its device as the kernel names its inodes: mountinfo's major:minor), longest first.
    The kernel writes space, tab, newline and backslash as octal escapes; names are bytes, not UTF-8."""
    try:
        raw = Path("/proc/self/mountinfo").read_bytes()
    except OSError:
        return []
    found = []
    for line in raw.splitlines():
        fields = line.split()
        if len(fields) > 4 and b":" in fields[2]:
            major, _, minor = fields[2].partition(b":")
            unescaped = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            found.append((os.fsdecode(unescaped), os.makedev(int(major), int(minor))))
    return sorted(found, key=lambda entry: len(entry[0]), reverse=True)


def kernel_device(path: str, devices: list[tuple[str, int]], st_dev: int) -> int:
    """The device the kernel's watch list names `path`'s inode by: its mount's superblock. On btrfs stat()
    gives every subvolume a device of its own, and comparing that would take every folder for unwatched."""
    for point, device in devices:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return device
    return st_dev


def _mount_points() -> list[str]:
    """Every mount point of this process's view (/proc/self/mountinfo), or none where it cannot be read."""
    return [point for point, _ in _mount_devices()]


def _inside(watch: WatchConfig, points: list[str]) -> frozenset[str]:
    """The mount points strictly inside a recursively watched folder."""
    if not watch.recursive:
        return frozenset()
    prefix = str(watch.path).rstrip("/") + "/"
    return frozenset(point for point in points if point.startswith(prefix))


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when there is no folder by that name."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
