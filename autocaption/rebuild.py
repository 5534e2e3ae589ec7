"""`autocaption rebuild`: a new journal from the photos' JSON sidecars, when the journal was lost or damaged.

One walk of the watched folders, no model: a photo whose sidecar holds current answers for its rules is
done again, with its answers (search), a person's correction and its content hash (moves are recognised)
taken from the sidecar — the photo is not hashed again; every other photo is queued for the daemon. The old
file is set aside (`journal.sqlite3.damaged-<time>`), never deleted. The daemon does the same by itself
when it starts on a damaged journal. A mark beside the journal (`journal.sqlite3.rebuilding`) says a rebuild is
under way, and rows are committed a thousand at a time: an interrupted rebuild (Ctrl-C, a crash, a power cut)
goes on where it stopped, by the command or the daemon; a damaged half-built journal is set aside too.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autocaption import sidecar
from autocaption.atomic import write_atomic
from autocaption.config import Config
from autocaption.discover import walk_names
from autocaption.journal import DAMAGED_SUFFIX, JOURNAL_NAME, Journal, JournalDamaged, Restored
from autocaption.locks import AlreadyRunning, DaemonLock
from autocaption.paths import display

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebuilt:
    done: int
    queued: int
    set_aside: Path | None  # where the old journal went
    resumed: int = 0  # photos an interrupted rebuild had already entered (not read again)

    def line(self) -> str:
        kept = f"; the old journal is kept as {display(self.set_aside)}" if self.set_aside else ""
        went_on = f" (went on from an interrupted rebuild: {self.resumed} already in)" if self.resumed else ""
        return f"journal rebuilt from the sidecars: {self.done} described, {self.queued} queued{went_on}{kept}"


MARK_NAME = JOURNAL_NAME + ".rebuilding"  # a rebuild under way; holds where the old journal was set aside


def rebuild(config: Config) -> Rebuilt:
    """`autocaption rebuild`: takes the daemon's lock for its duration (a daemon would keep writing the old
    file, or start on a half-filled new one). An interrupted rebuild is resumed where it stopped."""
    lock = DaemonLock(config.state.dir)
    try:
        lock.acquire()
    except AlreadyRunning:
        pid = lock.holder()
        raise AlreadyRunning(
            f"state.dir: {display(config.state.dir)}: a daemon{f' (pid {pid})' if pid else ''} uses this journal; "
            "stop it first (it rebuilds a damaged journal by itself when it starts)"
        ) from None
    try:
        journal = resumed(config.state.dir) or start(config.state.dir)
        try:
            return refill(config, journal)
        finally:
            journal.close()
    finally:
        lock.release()


def start(state_dir: Path) -> Journal:
    """A new, empty journal for a rebuild. The mark is written first, naming where the old journal goes, then
    the old one is set aside (never deleted): from the mark on, an interruption anywhere (a full disk, a
    crash between two renames) is gone on with, never taken for a whole journal."""
    mark = state_dir / MARK_NAME
    earlier = _marked(state_dir)  # a rebuild that starts over still names the journal it first replaced
    target = aside_name(state_dir)
    write_atomic(mark, str(earlier or target or "").encode("utf-8", "surrogateescape"))
    if target is not None:
        _move(state_dir, target)
    return Journal(state_dir)


def interrupted(state_dir: Path) -> bool:
    return (state_dir / MARK_NAME).exists()


def resumed(state_dir: Path) -> Journal | None:
    """The journal of an interrupted rebuild, to go on with; None when there is none, or when it is damaged
    (then it is set aside too, and the rebuild starts over). An old journal the rebuild had not finished
    setting aside is set aside now."""
    if not interrupted(state_dir):
        return None
    target = _marked(state_dir)
    if target is not None and not target.exists():
        _move(state_dir, target)  # interrupted before (or while) the old journal was renamed
        return None
    if target is not None and not (state_dir / JOURNAL_NAME).exists():
        _move(state_dir, target)  # its -wal or -shm left behind by a crash between the renames
    return sound(state_dir, "the journal of the interrupted rebuild")


def sound(state_dir: Path, what: str = "the journal") -> Journal | None:
    """The journal, opened, when it is whole; None (the damage logged) when it is damaged, even past its first
    pages, which open fine and fail later, in a loop."""
    try:
        journal = Journal(state_dir)
    except JournalDamaged as exc:
        log.error("%s", exc)
        return None
    verdict = journal.integrity()
    if verdict == "ok":
        return journal
    journal.close()
    log.error("state.dir: %s fails SQLite's integrity check: %s", what, verdict)
    return None


def _marked(state_dir: Path) -> Path | None:
    try:
        text = (state_dir / MARK_NAME).read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return None
    return Path(text) if text else None


def aside_name(state_dir: Path) -> Path | None:
    """Where the journal would be set aside (`journal.sqlite3.damaged-<time>`), or None when there is none."""
    path = state_dir / JOURNAL_NAME
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{JOURNAL_NAME}{DAMAGED_SUFFIX}{stamp}")
    for n in itertools.count(2):  # two in one second: the second must not replace the first
        if not target.exists():
            break
        target = path.with_name(f"{JOURNAL_NAME}{DAMAGED_SUFFIX}{stamp}-{n}")
    return target


def _move(state_dir: Path, target: Path) -> None:
    """The journal's files that are still at their name go to `target`'s (none that is there is replaced)."""
    for suffix in ("", "-wal", "-shm"):
        source, moved = state_dir / (JOURNAL_NAME + suffix), target.with_name(target.name + suffix)
        if source.exists() and not moved.exists():
            os.replace(source, moved)


def refill(config: Config, journal: Journal) -> Rebuilt:
    """Enter every photo of the watched folders into the journal of a rebuild (see `start`): those with
    current sidecars as done, the others queued. Photos it already holds (entered before an interruption)
    are passed over without reading their sidecars; the mark is taken off at the end."""
    state_dir = journal.path.parent
    resuming = any(journal.counts().values())
    photos = _Photos(config, journal)
    done, queued = journal.restore(photos)
    aside = _marked(state_dir)
    (state_dir / MARK_NAME).unlink(missing_ok=True)
    return Rebuilt(done, queued, aside, photos.known if resuming else 0)


@dataclass
class _Photos:
    """Every photo of the watched folders the journal does not hold yet: a journal row for those whose
    sidecars are current, the bare path for the others (queued: the daemon decides what they need)."""

    config: Config
    journal: Journal
    known: int = 0  # photos passed over: the journal held them already (entered before an interruption)

    def __iter__(self) -> Iterator[Restored | Path]:
        config = self.config
        for watch in config.watch:
            if not watch.path.is_dir():
                continue
            for found in walk_names(watch.path, watch.path, watch.include, watch.exclude, recursive=watch.recursive):
                if not isinstance(found, tuple):
                    continue
                path, relative = Path(found[0]), found[1]
                if self.journal.knows(path):
                    self.known += 1
                    continue
                entry = _entry(config, path, relative)
                if entry is not None:
                    yield entry


def _entry(config: Config, path: Path, relative: str) -> Restored | Path | None:
    """The photo's journal row from its sidecar, its path when it is to be queued, None when it is gone."""
    rules = config.rules_for(relative)
    try:
        st = path.stat()
    except OSError:
        return None
    document = sidecar.locate(path).document
    current = bool(rules) and sidecar.is_current(document, st, rules, config.model.id)
    if not current or sidecar.unwritten(document or {}, path, config.writing(rules)) is not None:
        return path  # the daemon decides: nothing to do, describe it, or write it again
    assert document is not None
    texts, digest = sidecar.recorded(document, rules)
    return Restored(path, st, digest, config.fingerprint(rules), texts)
