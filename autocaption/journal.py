"""The journal: an SQLite database (WAL) in `state.dir` that makes the daemon idempotent and crash-safe.

One row per image path: what we last saw (size, mtime, content hash), the fingerprint of the rules and
model that produced its result, its status and attempts. The work queue is the set of rows whose
status is `queued` (or `retry` once their backoff has passed), so a kill -9 loses nothing: queued
work is simply still queued at the next start, and finished work is never redone.

Schema changes are named, append-only migrations: a released migration is never edited, only followed
by a new one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocaption.config import Config
from autocaption.discover import Candidate
from autocaption.errors import AutocaptionError, ConfigError
from autocaption.paths import db_key, display, from_db
from autocaption.pipeline import Described, Outcome, Skipped
from autocaption.sidecar import EDITED_RULE, recorded

QUEUED, RETRY, DONE, FAILED = "queued", "retry", "done", "failed"
# A described photo whose file a reconcile no longer found: not counted as done, still known by its content
# (a move while the daemon was stopped is recognised), done again when the same file is back (a remount).
GONE = "gone"
# The answers row of a person's correction (the review page): rule names cannot hold "~", so it never meets one.
EDITED = EDITED_RULE
JOURNAL_NAME = "journal.sqlite3"
DAMAGED_SUFFIX = ".damaged-"  # journal.sqlite3.damaged-20261202-101500: what a rebuild set aside
_SQLITE_FULL, _SQLITE_CORRUPT, _SQLITE_NOTADB = 13, 11, 26
RESTORE_BATCH = 1000  # a rebuild's rows per transaction: what an interruption can cost it


class JournalFull(AutocaptionError):
    """state.dir has no room for the journal's next write: transient, the daemon waits for space."""


class JournalDamaged(AutocaptionError):
    """The journal file is damaged (truncated, overwritten, not a database): rebuilt from the sidecars."""


def _translated(path: Path, exc: sqlite3.Error) -> AutocaptionError | None:
    """A full disk or a damaged file as one line that says what to do; None for anything else."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    text = str(exc)
    if code == _SQLITE_FULL or "database or disk is full" in text:
        return JournalFull(f"state.dir: {display(path.parent)}: no space left for the journal ({text})")
    # Only SQLite's own word for damage: "no such table" may be a reader racing the daemon's first start.
    damaged = code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or any(
        sign in text for sign in ("malformed", "not a database", "the file is empty")
    )
    if damaged:
        return JournalDamaged(
            f"state.dir: {display(path)}: the journal is damaged ({text}); rebuild it from the photos' sidecars "
            "with `autocaption rebuild --config <rules file>` (the damaged file is kept beside it; a daemon "
            "rebuilds it by itself when it starts)"
        )
    return None


def _statements(*statements: str) -> Callable[[sqlite3.Connection], None]:
    """A migration of statements that contain semicolons themselves (triggers)."""

    def run(db: sqlite3.Connection) -> None:
        for statement in statements:
            db.execute(statement)

    return run


def _answers_from_sidecars(db: sqlite3.Connection) -> None:
    """Fill the answers table (and its full-text index) from the JSON sidecars of images described before
    it existed. Once; a large library takes a few seconds per 10,000 photos."""
    from autocaption import sidecar

    rows = db.execute("SELECT rowid, path FROM images WHERE status = ?", (DONE,)).fetchall()
    for image_id, path in rows:
        document = sidecar.read(Path(from_db(path)))
        for rule, entry in (document or {}).get("rules", {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("answer"), str):
                db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (image_id, rule, entry["answer"]))


# The triggers that keep the full-text index in step with `answers`, as 0003 made them (0009 makes them again
# for its new index; 0003's own text stays as it was released).
ANSWERS_TRIGGERS = (
    "CREATE TRIGGER answers_insert AFTER INSERT ON answers BEGIN"
    " INSERT INTO answers_fts (rowid, answer) VALUES (new.rowid, new.answer); END",
    "CREATE TRIGGER answers_delete AFTER DELETE ON answers BEGIN"
    " INSERT INTO answers_fts (answers_fts, rowid, answer) VALUES ('delete', old.rowid, old.answer); END",
    "CREATE TRIGGER answers_update AFTER UPDATE ON answers BEGIN"
    " INSERT INTO answers_fts (answers_fts, rowid, answer) VALUES ('delete', old.rowid, old.answer);"
    " INSERT INTO answers_fts (rowid, answer) VALUES (new.rowid, new.answer); END",
)
Migration = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[tuple[str, Migration], ...] = (
    (
        "0001_images",
        """
        CREATE TABLE images (
            path TEXT PRIMARY KEY,
            size INTEGER,
            mtime_ns INTEGER,
            sha256 TEXT,
            fingerprint TEXT,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            next_attempt REAL NOT NULL DEFAULT 0,
            queued_at REAL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX images_queue ON images (status, next_attempt, queued_at);
        CREATE INDEX images_sha256 ON images (sha256);
        """,
    ),
    (
        "0002_done_log",
        """
        CREATE TABLE done_log (at REAL NOT NULL, answers INTEGER NOT NULL);
        CREATE INDEX done_log_at ON done_log (at);
        """,
    ),
    (
        # Every rule's answer per image (the images' rowid is their id for the review page), with a full-text
        # index kept in step by triggers, for `autocaption search` and the page's search box.
        "0003_answers",
        _statements(
            "CREATE TABLE answers (image_id INTEGER NOT NULL, rule TEXT NOT NULL, answer TEXT NOT NULL,"
            " PRIMARY KEY (image_id, rule))",
            "CREATE VIRTUAL TABLE answers_fts USING fts5(answer, content='answers',"
            " tokenize='unicode61 remove_diacritics 2')",
            "CREATE TRIGGER answers_insert AFTER INSERT ON answers BEGIN"
            " INSERT INTO answers_fts (rowid, answer) VALUES (new.rowid, new.answer); END",
            "CREATE TRIGGER answers_delete AFTER DELETE ON answers BEGIN"
            " INSERT INTO answers_fts (answers_fts, rowid, answer) VALUES ('delete', old.rowid, old.answer); END",
            "CREATE TRIGGER answers_update AFTER UPDATE ON answers BEGIN"
            " INSERT INTO answers_fts (answers_fts, rowid, answer) VALUES ('delete', old.rowid, old.answer);"
            " INSERT INTO answers_fts (rowid, answer) VALUES (new.rowid, new.answer); END",
            "CREATE TRIGGER images_delete AFTER DELETE ON images BEGIN"
            " DELETE FROM answers WHERE image_id = old.rowid; END",
            "CREATE INDEX images_updated ON images (updated_at)",
        ),
    ),
    ("0004_answers_from_sidecars", _answers_from_sidecars),
    # "Describe again" from the review page: the daemon describes such a row even if its sidecar is current.
    ("0005_force", "ALTER TABLE images ADD COLUMN force INTEGER NOT NULL DEFAULT 0"),
    # Answers replaced with INSERT OR REPLACE (up to 0005) left their old words in the index (a REPLACE's
    # delete fires no trigger): search found photos by words they no longer had. Rebuilt once from the table.
    ("0006_answers_fts_rebuild", "INSERT INTO answers_fts (answers_fts) VALUES ('rebuild')"),
    # Counts per status kept by triggers: `stats` (the daemon's status line, every 0.5 s) read 4 rows, not a
    # GROUP BY over every image (20 ms at 100,000 photos, under the lock the worker needs).
    (
        "0007_status_counts",
        _statements(
            "CREATE TABLE status_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
            "INSERT INTO status_counts SELECT status, COUNT(*) FROM images GROUP BY status",
            "CREATE TRIGGER images_count_insert AFTER INSERT ON images BEGIN"
            " INSERT INTO status_counts VALUES (new.status, 1) ON CONFLICT (status) DO UPDATE SET n = n + 1; END",
            "CREATE TRIGGER images_count_delete AFTER DELETE ON images BEGIN"
            " UPDATE status_counts SET n = n - 1 WHERE status = old.status; END",
            "CREATE TRIGGER images_count_update AFTER UPDATE OF status ON images"
            " WHEN old.status IS NOT new.status BEGIN"
            " UPDATE status_counts SET n = n - 1 WHERE status = old.status;"
            " INSERT INTO status_counts VALUES (new.status, 1) ON CONFLICT (status) DO UPDATE SET n = n + 1; END",
        ),
    ),
    # The queue's order served by an index: `due` sorted every queued row through a temporary B-tree for each
    # batch (19.8 ms a call at 100,000 queued; a rebuilt journal queues them all: O(N^2)).
    ("0008_queue_order", "CREATE INDEX images_queued ON images (status, queued_at)"),
    # Prefixes of 1 to 6 characters indexed: a search word is a prefix ("beac" finds "beach"), and FTS5 reads
    # a prefix it has no index for by gathering every answer of every word it begins first (27 ms for "the"
    # at a million answers, for each query of a page); an indexed one is read newest first and stops early.
    (
        "0009_answers_prefix_index",
        _statements(
            "DROP TRIGGER answers_insert",
            "DROP TRIGGER answers_delete",
            "DROP TRIGGER answers_update",
            "DROP TABLE answers_fts",
            "CREATE VIRTUAL TABLE answers_fts USING fts5(answer, content='answers',"
            " tokenize='unicode61 remove_diacritics 2', prefix='1 2 3 4 5 6')",
            "INSERT INTO answers_fts (answers_fts) VALUES ('rebuild')",
            *ANSWERS_TRIGGERS,
        ),
    ),
    # A rule's answers found by the rule (the review page's rule filter; a rare rule is read from here).
    ("0010_answers_by_rule", "CREATE INDEX answers_rule ON answers (rule, image_id)"),
)


@dataclass(frozen=True)
class Record:
    path: Path
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    fingerprint: str | None
    status: str
    attempts: int
    last_error: str | None

    def matches(self, st: os.stat_result) -> bool:
        return (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Restored:
    """A photo whose JSON sidecar holds current results, for a rebuilt journal."""

    path: Path
    stat: os.stat_result
    sha256: str | None
    fingerprint: str
    texts: Mapping[str, str | None]


def _record_done(
    db: sqlite3.Connection, key: str | bytes, st: os.stat_result, sha256: str | None, fingerprint: str,
    texts: Mapping[str, str | None] | None, now: float,
) -> None:  # fmt: skip
    db.execute(
        "INSERT INTO images (path, size, mtime_ns, sha256, fingerprint, status, attempts, last_error,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, NULL, ?) ON CONFLICT (path) DO UPDATE SET"
        " size = excluded.size, mtime_ns = excluded.mtime_ns,"
        " sha256 = COALESCE(excluded.sha256, images.sha256), fingerprint = excluded.fingerprint,"
        " status = excluded.status, attempts = 0, last_error = NULL, updated_at = excluded.updated_at,"
        " force = 0",
        (key, st.st_size, st.st_mtime_ns, sha256, fingerprint, DONE, now),
    )
    if texts:
        (image_id,) = db.execute("SELECT rowid FROM images WHERE path = ?", (key,)).fetchone()
        given = [(image_id, rule, text) for rule, text in texts.items() if text is not None]
        # A changed answer is deleted and inserted again, not updated in place: its new rowid makes it the newest
        # in the index (pages of words are in that order, catalog.Catalog.page), and both statements fire the
        # triggers that keep the index right (REPLACE would delete without firing one).
        db.executemany("DELETE FROM answers WHERE image_id = ? AND rule = ? AND answer IS NOT ?", given)
        db.executemany("INSERT INTO answers VALUES (?, ?, ?) ON CONFLICT (image_id, rule) DO NOTHING", given)
        db.executemany(
            "DELETE FROM answers WHERE image_id = ? AND rule = ?",
            [(image_id, rule) for rule, text in texts.items() if text is None],
        )


@dataclass(frozen=True)
class Stats:
    queued: int
    retrying: int
    done: int
    failed: int
    per_hour: int  # images finished in the last hour
    recent_errors: tuple[tuple[str, str], ...]  # (path, error), newest first


class Journal:
    """Thread-safe: one connection shared behind a lock (the worker, the settler and the main thread)."""

    def __init__(self, state_dir: Path, *, read_only: bool = False) -> None:
        """`read_only`: for `status` and dry runs, which must work on a state dir they cannot (or must not)
        write; the journal must exist then (see `exists`)."""
        self.path = state_dir / JOURNAL_NAME
        self.read_only = read_only
        self._lock = threading.RLock()
        self._immutable = False  # read as a file nobody writes: no -wal or -shm of ours is left behind
        if read_only:
            self._db, self._immutable = _open_read_only(self.path)
            return
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state.dir: {display(state_dir)}: cannot create: {exc.strerror or exc}") from None
        if self.path.is_file() and self.path.stat().st_size == 0:  # SQLite would take it for a new journal
            raise JournalDamaged(str(_translated(self.path, sqlite3.DatabaseError("the file is empty"))))
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            with self._reading():
                self._db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a power loss can drop the last commits (that work is redone), never corrupt.
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise ConfigError(f"state.dir: {display(self.path)}: cannot open the journal: {exc}") from None

    @staticmethod
    def exists(state_dir: Path) -> bool:
        return (state_dir / JOURNAL_NAME).is_file()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; a full disk or a damaged file comes out as one clear error."""
        with self._lock:
            if self._immutable and _wal_of(self.path).exists():  # a writer started: see its commits from now on
                self._db.close()
                self._db, self._immutable = _open_read_only(self.path)
            try:
                yield self._db
            except sqlite3.Error as exc:
                problem = _translated(self.path, exc)
                if problem is None:
                    raise
                if isinstance(problem, JournalDamaged) and not self.read_only:
                    self._keep_damaged_copy()
                raise problem from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._reading() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended it already
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _keep_damaged_copy(self) -> None:
        """Copy the damaged file (and its WAL) aside as found, once: closing this connection may checkpoint
        into it, and whoever looks into what happened should see it as it was."""
        if getattr(self, "_copied", False):
            return
        self._copied = True
        try:
            st = self.path.stat()
        except OSError:
            return
        for earlier in self.path.parent.glob(self.path.name + DAMAGED_SUFFIX + "*"):  # this damage, kept already
            with contextlib.suppress(OSError):
                if (earlier.stat().st_size, earlier.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal"):
            source = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(OSError):
                shutil.copy2(source, self.path.with_name(f"{self.path.name}{DAMAGED_SUFFIX}{stamp}{suffix}"))

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            applied = {row[0] for row in db.execute("SELECT name FROM migrations")}
            for name, migration in MIGRATIONS:
                if name in applied:
                    continue
                if isinstance(migration, str):
                    for statement in filter(str.strip, migration.split(";")):
                        db.execute(statement)
                else:
                    migration(db)
                db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))

    def integrity(self) -> str:
        """SQLite's quick_check: "ok", or its first complaints (for `doctor`)."""
        with self._reading() as db:
            rows = db.execute("PRAGMA quick_check(5)").fetchall()
        return "; ".join(str(row[0]) for row in rows)

    def applied_migrations(self) -> list[str]:
        with self._reading() as db:
            return [row[0] for row in db.execute("SELECT name FROM migrations ORDER BY name")]

    # --- reading ---------------------------------------------------------------------------------

    def rows(self, sql: str, parameters: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        """A read query (catalog.py asks the review page's questions through it)."""
        with self._reading():
            return self._db.execute(sql, tuple(parameters)).fetchall()

    def get(self, path: Path) -> Record | None:
        with self._reading():
            row = self._db.execute(
                "SELECT path, size, mtime_ns, sha256, fingerprint, status, attempts, last_error"
                " FROM images WHERE path = ?",
                (db_key(path),),
            ).fetchone()
        return _record(row) if row else None

    def snapshot(self) -> dict[str, tuple[int | None, int | None, str, str | None]]:
        """path -> (size, mtime_ns, status, fingerprint) for every row: one query for a whole reconcile."""
        with self._reading():
            rows = self._db.execute("SELECT path, size, mtime_ns, status, fingerprint FROM images").fetchall()
        return {from_db(row[0]): (row[1], row[2], row[3], row[4]) for row in rows}

    def moved_from(self, sha256: str, new_path: Path) -> Record | None:
        """A finished image with this content whose file is gone: `new_path` is where it moved to."""
        with self._reading():
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, sha256, fingerprint, status, attempts, last_error"
                " FROM images WHERE sha256 = ? AND status IN (?, ?) AND path != ?",
                (sha256, DONE, GONE, db_key(new_path)),
            ).fetchall()
        return next((_record(row) for row in rows if not os.path.lexists(from_db(row[0]))), None)

    def stats(self, now: float | None = None) -> Stats:
        now = time.time() if now is None else now
        with self._reading():
            counts = self._counts()
            per_hour = self._db.execute("SELECT COUNT(*) FROM done_log WHERE at > ?", (now - 3600,)).fetchone()[0]
            errors = []
            if counts.get(FAILED, 0) or counts.get(RETRY, 0):  # the failures, not every row by its update time
                errors = self._db.execute(
                    "SELECT path, last_error FROM images INDEXED BY images_queue"
                    " WHERE status IN (?, ?) AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 10",
                    (FAILED, RETRY),
                ).fetchall()
        return Stats(
            queued=counts.get(QUEUED, 0),
            retrying=counts.get(RETRY, 0),
            done=counts.get(DONE, 0),
            failed=counts.get(FAILED, 0),
            per_hour=per_hour,
            recent_errors=tuple((display(from_db(row[0])), row[1]) for row in errors),
        )

    # --- the queue -------------------------------------------------------------------------------

    def enqueue(self, paths: Iterable[Path], *, unchanged_too: bool = True) -> int:
        """Queue paths (new rows, or rows not already queued). Returns how many were newly queued.

        `unchanged_too=False` (what the watcher sends): a row that is done or failed for the very size and
        modification time the file has now is left as it is. Our own write into a photo fires the watcher
        too, and a photo that failed for good stays failed until `autocaption retry`."""
        now = time.time()
        count = 0
        with self._tx() as db:
            for path in paths:
                size = mtime_ns = None
                if not unchanged_too:
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue  # gone again: nothing to describe
                    size, mtime_ns = st.st_size, st.st_mtime_ns
                cursor = db.execute(
                    "INSERT INTO images (path, status, queued_at, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (path) DO UPDATE SET status = excluded.status, queued_at = excluded.queued_at,"
                    " next_attempt = 0, updated_at = excluded.updated_at WHERE images.status != ?"
                    # IS, not =: a row without a recorded stat (NULL) must be queued, not skipped as "NULL"
                    " AND NOT (? AND images.status IN (?, ?) AND images.size IS ? AND images.mtime_ns IS ?)",
                    (db_key(path), QUEUED, now, now, QUEUED, not unchanged_too, DONE, FAILED, size, mtime_ns),
                )
                count += cursor.rowcount
        return count

    def _counts(self) -> dict[str, int]:
        """Images per status: kept by triggers (0007); counted where a read-only journal predates them."""
        try:
            return dict(self._db.execute("SELECT status, n FROM status_counts").fetchall())
        except sqlite3.OperationalError:  # no such table: an older journal, opened read-only (`status`)
            return dict(self._db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())

    def due(self, limit: int, now: float | None = None) -> list[Path]:
        """The next paths to work on: queued ones first in arrival order, then retries whose time came. Each
        part is read in index order (images_queued, images_queue), never sorted."""
        now = time.time() if now is None else now
        with self._reading():
            rows = self._db.execute(
                "SELECT path FROM images WHERE status = ? ORDER BY queued_at LIMIT ?", (QUEUED, limit)
            ).fetchall()
            if len(rows) < limit:
                rows += self._db.execute(
                    "SELECT path FROM images WHERE status = ? AND next_attempt <= ? ORDER BY queued_at LIMIT ?",
                    (RETRY, now, limit - len(rows)),
                ).fetchall()
        return [Path(from_db(row[0])) for row in rows]

    def counts(self) -> dict[str, int]:
        """Images per status (kept by triggers: read, not counted)."""
        with self._reading():
            return self._counts()

    def pending(self) -> int:
        counts = self.counts()
        return counts.get(QUEUED, 0) + counts.get(RETRY, 0)

    # --- outcomes --------------------------------------------------------------------------------

    def done(
        self, path: Path, st: os.stat_result, sha256: str | None, fingerprint: str, answers: int = 0,
        texts: Mapping[str, str | None] | None = None,
    ) -> None:  # fmt: skip
        """The image is described (or needs nothing): `texts` are its rules' answers, for search (and under
        EDITED a person's correction; None there removes one that no longer applies)."""
        with self._tx() as db:
            _record_done(db, db_key(path), st, sha256, fingerprint, texts, time.time())
            if answers:
                db.execute("INSERT INTO done_log VALUES (?, ?)", (time.time(), answers))

    def restore(self, entries: Iterable[Restored | Path]) -> tuple[int, int]:
        """A rebuild's rows: a Restored photo is done (its sidecar holds current results), a bare path is
        queued. A transaction per RESTORE_BATCH, so an interrupted rebuild keeps what it committed (see
        rebuild.py). Returns (done, queued)."""
        done = queued = 0
        for batch in _batches(entries, RESTORE_BATCH):
            with self._tx() as db:
                now = time.time()
                for item in batch:
                    if isinstance(item, Restored):
                        _record_done(db, db_key(item.path), item.stat, item.sha256, item.fingerprint, item.texts, now)
                        done += 1
                    else:
                        queued += db.execute(
                            "INSERT INTO images (path, status, queued_at, updated_at) VALUES (?, ?, ?, ?)"
                            " ON CONFLICT (path) DO NOTHING",
                            (db_key(item), QUEUED, now, now),
                        ).rowcount
        return done, queued

    def knows(self, path: Path) -> bool:
        with self._reading():
            return self._db.execute("SELECT 1 FROM images WHERE path = ?", (db_key(path),)).fetchone() is not None

    def describe_again(self, path: Path) -> None:
        """Queue an image to be described even though its results are current (the review page's button)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE images SET status = ?, force = 1, attempts = 0, next_attempt = 0, queued_at = ?,"
                " updated_at = ? WHERE path = ?",
                (QUEUED, now, now, db_key(path)),
            )

    def forced(self, paths: Iterable[Path]) -> set[Path]:
        """Which of these were queued to be described again regardless of their results."""
        with self._reading():
            return {
                path for path in paths
                if self._db.execute("SELECT force FROM images WHERE path = ?", (db_key(path),)).fetchone() == (1,)
            }  # fmt: skip

    def failed(
        self, path: Path, error: str, *, transient: bool, max_attempts: int, backoff: float,
        st: os.stat_result | None = None,
    ) -> str:  # fmt: skip
        """Record a failure; transient ones are retried with exponential backoff until `max_attempts`. `st`: the
        file as it is after the attempt (our write may have changed it), so the watcher's event for that very
        file does not queue it again; its bytes were not described, so it has no fingerprint."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM images WHERE path = ?", (db_key(path),)).fetchone()
            attempts = (row[0] if row else 0) + 1
            status = RETRY if transient and attempts < max_attempts else FAILED
            delay = min(backoff * 2 ** (attempts - 1), 3600.0)
            db.execute(
                "INSERT INTO images (path, status, attempts, last_error, next_attempt, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET status = excluded.status,"
                " attempts = excluded.attempts, last_error = excluded.last_error,"
                " next_attempt = excluded.next_attempt, updated_at = excluded.updated_at",
                (db_key(path), status, attempts, error, now + delay, now),
            )
            if st is not None:
                db.execute(
                    "UPDATE images SET size = ?, mtime_ns = ?, fingerprint = NULL WHERE path = ?",
                    (st.st_size, st.st_mtime_ns, db_key(path)),
                )
        return status

    def gone(self, paths: Iterable[Path]) -> None:
        """Described photos whose files are gone from the watched folders (see GONE)."""
        with self._tx() as db:
            db.executemany("UPDATE images SET status = ? WHERE path = ? AND status = ?",
                           [(GONE, db_key(path), DONE) for path in paths])  # fmt: skip

    def forget(self, path: Path) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM images WHERE path = ?", (db_key(path),))

    def moved(self, old: Path, new: Path, st: os.stat_result) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM images WHERE path = ?", (db_key(new),))
            db.execute(
                "UPDATE images SET path = ?, size = ?, mtime_ns = ?, updated_at = ? WHERE path = ?",
                (db_key(new), st.st_size, st.st_mtime_ns, time.time(), db_key(old)),
            )

    def retry(self, paths: Iterable[Path] | None = None) -> int:
        """Re-queue failed images (all, or the given paths)."""
        now = time.time()
        with self._tx() as db:
            if paths is None:
                cursor = db.execute(
                    "UPDATE images SET status = ?, attempts = 0, next_attempt = 0, queued_at = ?, updated_at = ?"
                    " WHERE status IN (?, ?)",
                    (QUEUED, now, now, FAILED, RETRY),
                )
                return cursor.rowcount
            count = 0
            for path in paths:
                cursor = db.execute(
                    "UPDATE images SET status = ?, attempts = 0, next_attempt = 0, queued_at = ?, updated_at = ?"
                    " WHERE path = ? AND status IN (?, ?)",
                    (QUEUED, now, now, db_key(path), FAILED, RETRY),
                )
                count += cursor.rowcount
            return count

    def retry_at(self, given: Path) -> tuple[int, str | None]:
        """Re-queue the failed images at `given` (a photo) or under it (a folder): (how many, why none)."""
        spellings = dict.fromkeys([str(given.absolute()), str(given.resolve())])
        with self._reading():
            for spelling in spellings:
                row = self.get(Path(spelling))
                if row is not None:
                    if row.status not in (FAILED, RETRY):
                        return 0, f"{display(given)}: not failed (it is {row.status}); nothing to retry"
                    return self.retry([row.path]), None
            for spelling in spellings:
                prefix = spelling.rstrip("/") + "/"
                raw = os.fsencode(prefix)  # rows of names that are not UTF-8 are bytes (`db_key`)
                rows = self._db.execute(
                    "SELECT path, status FROM images WHERE substr(path, 1, ?) = ? OR substr(path, 1, ?) = ?",
                    (len(prefix), db_key(prefix), len(raw), raw),
                ).fetchall()
                if rows:
                    failed = [Path(from_db(path)) for path, status in rows if status in (FAILED, RETRY)]
                    if not failed:
                        return 0, f"{display(given)}: no failed images under it ({len(rows)} known)"
                    return self.retry(failed), None
        return 0, f"{display(given)}: not in the journal (never seen by autocaption with this state.dir)"


def record_outcome(journal: Journal, config: Config, candidate: Candidate, outcome: Outcome) -> str | None:
    """Book a pipeline outcome; returns the new status for failures (RETRY or FAILED), else None."""
    path = candidate.path
    if isinstance(outcome, Described):
        assert outcome.stat is not None and outcome.fingerprint is not None
        texts: dict[str, str | None] = {result.rule.name: result.answer for result in outcome.results}
        texts[EDITED] = outcome.edited  # None: a correction of the photo that was here before no longer applies
        journal.done(path, outcome.stat, outcome.sha256, outcome.fingerprint, outcome.answers, texts)
        return None
    if isinstance(outcome, Skipped):
        try:
            st = path.stat()
        except OSError:
            journal.forget(path)
            return None
        rules = config.rules_for(candidate.relative)
        # Results found current (written before a full journal or a rebuild): their answers are searchable too.
        texts, digest = recorded(outcome.document, rules) if outcome.document else ({}, None)
        journal.done(path, st, digest, config.fingerprint(rules), texts=texts)
        return None
    daemon = config.daemon
    return journal.failed(
        path, outcome.message, transient=outcome.transient, max_attempts=daemon.max_attempts,
        backoff=daemon.retry_seconds, st=outcome.stat,
    )  # fmt: skip


def _batches(items: Iterable[Restored | Path], size: int) -> Iterator[tuple[Restored | Path, ...]]:
    """itertools.batched (Python 3.12): a library's worth is never held in memory."""
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, size)):
        yield batch


def _wal_of(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _open_read_only(path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection that never writes, and whether it reads the file as immutable. A writer (the daemon) keeps a
    -wal file while it has the journal open: then `mode=ro` sees its latest commits. Without one nobody is
    writing, and `immutable=1` reads the file as it is — `mode=ro` would leave a -wal and a -shm file behind
    (and cannot open at all in a folder this user cannot write)."""
    if not path.is_file():
        raise ConfigError(f"state.dir: {display(path)}: no journal yet (neither the daemon nor process has run)")
    if path.stat().st_size == 0:
        raise JournalDamaged(str(_translated(path, sqlite3.DatabaseError("the file is empty"))))
    problem: sqlite3.Error | None = None
    modes = ("mode=ro", "immutable=1") if _wal_of(path).exists() else ("immutable=1",)
    for mode in modes:
        db = sqlite3.connect(f"{path.as_uri()}?{mode}", uri=True, check_same_thread=False, timeout=30)
        try:
            db.execute("SELECT COUNT(*) FROM images").fetchone()
            return db, mode == "immutable=1"
        except sqlite3.Error as exc:
            db.close()
            problem = exc
    assert problem is not None
    damaged = _translated(path, problem)
    if isinstance(damaged, JournalDamaged):
        raise damaged
    raise ConfigError(f"state.dir: {display(path)}: cannot read the journal: {problem}")


def _record(row: tuple[object, ...]) -> Record:
    path, size, mtime_ns, sha256, fingerprint, status, attempts, last_error = row
    return Record(
        Path(from_db(path)),
        size if isinstance(size, int) else None,
        mtime_ns if isinstance(mtime_ns, int) else None,
        sha256 if isinstance(sha256, str) else None,
        fingerprint if isinstance(fingerprint, str) else None,
        str(status),
        int(attempts) if isinstance(attempts, int) else 0,
        last_error if isinstance(last_error, str) else None,
    )
