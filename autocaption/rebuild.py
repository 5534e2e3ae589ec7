"""`autocaption rebuild`: a new journal from the photos' JSON sidecars, when the journal was lost or damaged.

One walk of the watched folders, no model: a photo whose sidecar holds current answers for its rules is
done again, with its answers (search), a person's correction and its content hash (moves are recognised)
taken from the sidecar — the photo is not hashed again; every other photo is queued for the daemon. The old
file is set aside (`journal.sqlite3.damaged-<time>`), never deleted. The daemon does the same by itself
when it starts on a damaged journal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from autocaption import sidecar
from autocaption.config import Config
from autocaption.discover import walk_names
from autocaption.journal import DAMAGED_SUFFIX, JOURNAL_NAME, Journal, Restored
from autocaption.locks import AlreadyRunning, DaemonLock
from autocaption.paths import display

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebuilt:
    done: int
    queued: int
    set_aside: Path | None  # where the old journal went

    def line(self) -> str:
        kept = f"; the old journal is kept as {display(self.set_aside)}" if self.set_aside else ""
        return f"journal rebuilt from the sidecars: {self.done} described, {self.queued} queued{kept}"


def rebuild(config: Config) -> Rebuilt:
    """`autocaption rebuild`: refused while a daemon holds the state dir (it would keep writing the old file)."""
    pid = DaemonLock(config.state.dir).holder()
    if pid is not None:
        raise AlreadyRunning(f"state.dir: {display(config.state.dir)}: a daemon (pid {pid}) uses this journal; "
                             "stop it first (it rebuilds a damaged journal by itself when it starts)")  # fmt: skip
    aside = set_aside(config.state.dir)
    journal = Journal(config.state.dir)
    try:
        return refill(config, journal, aside)
    finally:
        journal.close()


def set_aside(state_dir: Path) -> Path | None:
    """Rename the journal and its WAL files out of the way; the name of the old journal, or None."""
    path = state_dir / JOURNAL_NAME
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{JOURNAL_NAME}{DAMAGED_SUFFIX}{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(JOURNAL_NAME + suffix)
        if source.exists():
            os.replace(source, target.with_name(target.name + suffix))
    return target


def refill(config: Config, journal: Journal, aside: Path | None) -> Rebuilt:
    queued: list[Path] = []
    done = journal.restore(_current(config, queued))
    return Rebuilt(done, journal.enqueue(queued), aside)


def _current(config: Config, queued: list[Path]) -> Iterator[Restored]:
    """Photos whose sidecars are current, as journal rows; the others are added to `queued`."""
    for watch in config.watch:
        if not watch.path.is_dir():
            continue
        for found in walk_names(watch.path, watch.path, watch.include, watch.exclude, recursive=watch.recursive):
            if not isinstance(found, tuple):
                continue
            path, relative = Path(found[0]), found[1]
            rules = config.rules_for(relative)
            try:
                st = path.stat()
            except OSError:
                continue
            document = sidecar.locate(path).document
            current = bool(rules) and sidecar.is_current(document, st, rules, config.model.id)
            if not current or sidecar.unwritten(document or {}, path, config.writing(rules)) is not None:
                queued.append(path)  # the daemon decides: nothing to do, describe it, or write it again
                continue
            assert document is not None
            texts, digest = sidecar.recorded(document, rules)
            yield Restored(path, st, digest, config.fingerprint(rules), texts)
