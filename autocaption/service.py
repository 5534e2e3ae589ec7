"""`autocaption run`: the daemon. Watchers feed the journal's queue; one worker thread drains it
through the pipeline with the model kept resident; the main thread handles signals, sd_notify and
periodic reconciles.

Threads: watchdog's dispatcher (enqueue into the settler only), the settler (decides when files are
complete, writes them to the journal queue), the worker (the only user of the model), and the main
thread. Signals only set events; all work happens in the threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from autocaption import rebuild as rebuilding
from autocaption import sidecar
from autocaption.atomic import write_atomic
from autocaption.config import Config, ModelConfig, Rule, WatchConfig, load
from autocaption.discover import Candidate, relative_path, walk_names
from autocaption.engine import Cancelled, Engine, load_engine
from autocaption.engine.servers import ServerPool
from autocaption.errors import AutocaptionError, ExitCode, ServerUnreachable
from autocaption.journal import FAILED, GONE, QUEUED, RETRY, Journal, JournalFull, record_outcome
from autocaption.locks import POLLED_FILE, SERVERS_FILE, WAITING_FILE, DaemonLock, PhotoLocks
from autocaption.notify import Notifier
from autocaption.paths import display
from autocaption.pipeline import Described, Failed, Outcome, Pipeline
from autocaption.plural import counted
from autocaption.watch import RAISE_LIMIT, Settler, Watchers
from autocaption.writers.metadata import MetadataWriter

log = logging.getLogger("autocaption")

EngineFactory = Callable[[ModelConfig], Engine]
# How often the watched folders themselves are looked at: one that appeared (a NAS mounted late) or was
# deleted and created again is (re)armed within this time.
FOLDER_CHECK_SECONDS = 2.0


def reconcile(config: Config, journal: Journal) -> int:
    """Queue every image under the watched folders without an up-to-date result; mark the described photos
    that are gone from them (deleted, moved or unmounted while nobody watched) GONE, so `done` counts photos
    that exist and a move is still recognised. Returns how many were queued."""
    known = journal.snapshot()
    missing: list[Path] = []
    seen: set[str] = set()
    for watch in config.watch:
        if not watch.path.is_dir():
            log.debug("watch: %s: folder does not exist; nothing to reconcile", display(watch.path))
            continue
        root = watch.path
        for found in walk_names(
            root, root, watch.include, watch.exclude, recursive=watch.recursive, on_temp=remove_stale_temp
        ):
            if isinstance(found, tuple):
                seen.add(found[0])
                if not _settled(config, found, known.get(found[0])):
                    missing.append(Path(found[0]))
        prefix = str(root).rstrip("/") + "/"
        gone = [path for path in known if path.startswith(prefix) and path not in seen and _gone(path)]
        journal.gone(Path(path) for path in gone)
    return journal.enqueue(missing)


def _gone(path: str) -> bool:
    """No file by that name (an unreadable folder is not a deleted photo)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temp(path: str, *, older_than: float = 3600.0) -> None:
    """A temp file of ours older than an hour was left by a killed write (the photo itself is intact:
    the rename never happened). Nothing in flight is that old: our writes take milliseconds."""
    try:
        if time.time() - os.stat(path).st_mtime > older_than:
            os.unlink(path)
            log.info("%s: removed a temp file left by an interrupted write", display(path))
    except OSError as exc:
        log.debug("%s: %s", display(path), exc)


def _settled(
    config: Config, found: tuple[str, str], row: tuple[int | None, int | None, str, str | None] | None
) -> bool:
    """Nothing to do for this file: already queued, failed for good, or done for its current bytes."""
    if row is None:
        return False
    size, mtime_ns, status, fingerprint = row
    if status == GONE:
        return False  # back (a disk mounted again): the worker finds it unchanged and books it done
    if status in (QUEUED, RETRY, FAILED):
        return True  # already waiting, or failed for good until `autocaption retry`
    try:
        st = os.stat(found[0])
    except OSError:
        return True
    if (size, mtime_ns) != (st.st_size, st.st_mtime_ns):
        return False
    return not config.daemon.redo_stale or fingerprint == config.fingerprint(config.rules_for(found[1]))


class Worker:
    """Drains the journal queue through the pipeline. The only thread that touches the model."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.heartbeat = time.monotonic()
        self.wake = threading.Event()
        self.full = 0.0  # seconds to wait before trying a full state.dir again

    def run(self) -> None:
        service = self.service
        outage = 0.0  # seconds to wait before trying an unreachable server again
        while not service.stop.is_set():
            self.heartbeat = time.monotonic()
            paths = service.journal.due(service.pipeline.engine.info.batch_images)
            if not paths:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self.work(paths)
            except Cancelled:
                log.info("stopping: the batch in flight was abandoned; it stays queued")
                return
            except JournalFull as exc:
                # Nothing is lost: what was written is found current next time; the rest stays queued.
                self.full = min(max(self.full * 2, 5.0), 60.0)
                service.waiting = f"waiting for space: {exc}"
                log.warning("%s; waiting for space, trying again in %.0f s", exc, self.full)
                self._pause(self.full)
                continue
            except ServerUnreachable as exc:
                # The images stay queued (no attempt is counted): the server, not the photo, is at fault.
                outage = min(max(outage * 2, 5.0), 60.0)
                service.waiting = f"waiting for the server: {exc}"
                log.warning("%s; images stay queued, trying again in %.0f s", exc, outage)
                self._pause(outage)
                continue
            if outage:
                log.info("the server answers again; resuming")
                outage, service.waiting = 0.0, ""
            if self.full:
                log.info("state.dir has space again; resuming")
                self.full, service.waiting = 0.0, ""

    def _pause(self, seconds: float) -> None:
        """Wait without looking stuck: the heartbeat keeps the systemd watchdog fed."""
        deadline = time.monotonic() + seconds
        while not self.service.stop.is_set() and time.monotonic() < deadline:
            self.heartbeat = time.monotonic()
            self.service.stop.wait(min(1.0, deadline - time.monotonic()))

    def work(self, paths: Sequence[Path]) -> None:
        service = self.service
        config, journal = service.config, service.journal
        todo: list[Candidate] = []
        forced = journal.forced(paths)  # "describe again" from the review page
        for path in paths:
            candidate = service.candidate(path)
            try:
                st = path.stat()
            except OSError:
                journal.forget(path)  # deleted (or renamed) before we got to it
                continue
            if service._watch_of(path) is None and path not in forced:
                journal.forget(path)  # its folder is no longer watched (a reload): not ours to describe now
                continue
            rules = config.rules_for(candidate.relative)
            fingerprint = config.fingerprint(rules)
            record = journal.get(path)
            if not rules:
                journal.done(path, st, None, fingerprint)
            elif (
                path not in forced
                and record
                and record.fingerprint
                and record.matches(st)
                and (record.fingerprint == fingerprint or not config.daemon.redo_stale)
            ):
                journal.done(path, st, None, record.fingerprint)  # our own write, or nothing changed
            else:
                if record is None or record.fingerprint is None:
                    service.follow_move(path, st)  # carries its results along; the pipeline then skips it
                todo.append(candidate)
        if todo:
            outcomes = service.pipeline.run(todo, cancel=service.stop, forced=forced)
            for candidate, outcome in zip(todo, outcomes, strict=True):
                service.record(candidate, outcome)


class Service:
    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        engine_factory: EngineFactory | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        # Compiled decode steps (model.compile) are kept under state.dir: a restart does not compile again.
        self.engine_factory = engine_factory or partial(load_engine, cache_dir=config.state.dir / "torch-compile")
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.reconcile_requested = threading.Event()
        self.journal: Journal  # opened in `run`, once this process holds the state dir
        self.daemon_lock = DaemonLock(config.state.dir)
        self.photo_locks = PhotoLocks(config.state.dir)
        self.settler = Settler(self._settled)
        self.worker = Worker(self)
        self.pipeline: Pipeline
        self.watchers: Watchers | None = None
        self.waiting = ""  # why work waits (a full state.dir), for the status line
        self.crashed: str | None = None  # the thread that died, which ends the daemon

    # --- helpers used by the worker ---------------------------------------------------------------

    def candidate(self, path: Path) -> Candidate:
        watch = self._watch_of(path)
        root = watch.path if watch else path.parent
        return Candidate(path, relative_path(path, root), root)

    def _watch_of(self, path: Path) -> WatchConfig | None:
        return next((w for w in self.config.watch if w.path == path or w.path in path.parents), None)

    def _settled(self, candidates: list[Candidate]) -> None:
        try:
            queued = self.journal.enqueue((c.path for c in candidates), unchanged_too=False)
        except JournalFull as exc:
            # The next reconcile finds them (new or changed files), once there is space again.
            log.warning("%s; %s queued once there is space", exc, counted(len(candidates), "new photo"))
            self.waiting = f"waiting for space: {exc}"
            self.reconcile_requested.set()
            return
        if queued:
            self.worker.wake.set()

    def follow_move(self, path: Path, st: os.stat_result) -> None:
        """A new path whose content we described elsewhere, now gone: a move, when its results exist (beside
        the old path, or already beside the new one). They are carried over, so the pipeline finds them
        current and skips the model. Without results (the photo and its sidecars were deleted, then the same
        bytes added again) it is no move: the pipeline describes it like any new photo."""
        try:
            digest = sidecar.hash_file(path)
        except OSError:
            return
        old = self.journal.moved_from(digest, path)
        if old is None:
            return
        source, target = sidecar.locate(old.path), sidecar.locate(path)
        if not (sidecar.describes(target.document, digest) or sidecar.describes(source.document, digest)):
            self.journal.forget(old.path)  # its file and its results are gone: describe it as new
            return
        if not sidecar.describes(target.document, digest):  # else they were moved together with the photo
            self._carry(old.path, path, source, target)
        self.journal.moved(old.path, path, st)  # keeps the content hash: the next move is recognised too

    def _carry(self, old: Path, new: Path, source: sidecar.Sidecar, target: sidecar.Sidecar) -> None:
        moves = [(source.path, target.path)]
        xmp = sidecar.xmp_sidecar_of(source.document or {}, old)
        if xmp is not None:
            moves.append((xmp, MetadataWriter(self.config.output).sidecar_path(new)))
        for before, after in moves:
            if before.exists() and not after.exists():
                try:
                    shutil.move(before, after)
                except OSError as exc:
                    log.warning("%s: could not move sidecar along: %s", display(before), exc.strerror or exc)
        sidecar.rename_image(new)
        log.info("%s: moved from %s; its results came along", display(new), display(old))

    def record(self, candidate: Candidate, outcome: Outcome) -> None:
        status = record_outcome(self.journal, self.config, candidate, outcome)
        if isinstance(outcome, Described) and outcome.earlier:
            log.info("%s: recorded answers written", display(candidate.path))
        elif isinstance(outcome, Described):
            log.info("%s: described (%d answers, %.1f s)", display(candidate.path), outcome.answers, outcome.seconds)
        elif isinstance(outcome, Failed):
            if status == RETRY:
                log.warning("%s (will retry)", outcome.message)
            else:
                log.error("%s", outcome.message)

    # --- lifecycle --------------------------------------------------------------------------------

    def run(self) -> int:
        self.daemon_lock.acquire()  # before the model is loaded: a second daemon stops at once
        try:
            self.journal = open_journal(self.config)
            try:
                return self._run()
            finally:
                self.journal.close()
        finally:
            self.daemon_lock.release()

    def _run(self) -> int:
        engine = self.engine_factory(self.config.model)
        self.pipeline = Pipeline(self.config, engine, locks=self.photo_locks)
        previous = self._install_signals()
        threads: list[threading.Thread] = []
        try:
            self.watchers = Watchers(self.config.watch, self.settler, self.reconcile_requested.set)
            self.watchers.start()
            threads = [
                threading.Thread(target=self._guarded(self.settler.run, self.stop), name="settler", daemon=True),
                threading.Thread(target=self._guarded(self.worker.run), name="worker", daemon=True),
            ]
            for thread in threads:
                thread.start()
            self.reconcile_requested.set()  # at start: whatever arrived while we were not running
            self.notifier.ready(self._status())
            folders, rules = counted(len(self.config.watch), "folder"), counted(len(self.config.rules), "rule")
            log.info("ready: %s watched, %s", folders, rules)
            self._main_loop()
        finally:
            self.stop.set()
            self.notifier.stopping()
            if self.watchers:
                self.watchers.stop()
            for thread in threads:
                thread.join(timeout=60)
            engine.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.crashed:
            log.critical("stopped: the %s thread died; exiting so that the service manager restarts autocaption",
                         self.crashed)  # fmt: skip
            return ExitCode.CRASHED
        log.info("stopped")
        return ExitCode.OK

    def _guarded(self, target: Callable[..., None], *args: object) -> Callable[[], None]:
        """A thread's work; if it dies, the whole daemon stops (and the watchdog pings with it) rather than
        say "running" while nothing is described any more."""

        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:
                log.exception("the %s thread died: %s", threading.current_thread().name, exc)
                self.crashed = threading.current_thread().name
                self.stop.set()

        return run

    def _install_signals(self) -> dict[signal.Signals, Any]:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reload_requested.set()

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # embedded in another program (or a test): its owner handles signals
        for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _main_loop(self) -> None:
        interval = self.config.daemon.reconcile_minutes * 60
        next_reconcile = time.monotonic() + interval if interval else float("inf")
        next_folder_check = time.monotonic() + FOLDER_CHECK_SECONDS
        last_status = ""
        while not self.stop.wait(0.5):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()
            if time.monotonic() >= next_folder_check and self.watchers is not None:
                next_folder_check = time.monotonic() + FOLDER_CHECK_SECONDS
                if self.watchers.check():  # a folder appeared or was replaced: what is in it now?
                    self.reconcile_requested.set()
            if self.reconcile_requested.is_set() or time.monotonic() >= next_reconcile:
                self.reconcile_requested.clear()
                next_reconcile = time.monotonic() + interval if interval else float("inf")
                try:
                    queued = reconcile(self.config, self.journal)
                except JournalFull as exc:
                    self.waiting = f"waiting for space: {exc}"
                    next_reconcile = time.monotonic() + 10  # and again, until there is space
                    queued = 0
                else:
                    if self.waiting.startswith("waiting for space") and not self.worker.full:
                        self.waiting = ""
                if queued:
                    log.info("reconcile: %s queued", counted(queued, "image"))
                    self.worker.wake.set()
            self._keepalive()
            status = self._status()
            if status != last_status:
                self.notifier.status(status)
                self._tell_waiting()
                last_status = status

    def _keepalive(self) -> None:
        """WATCHDOG=1 only while the worker's heartbeat is fresh: a stuck worker gets us restarted."""
        interval = self.notifier.watchdog_interval
        if interval is not None and time.monotonic() - self.worker.heartbeat < 2 * interval:
            self.notifier.watchdog()

    def _tell_waiting(self) -> None:
        """Why the daemon waits, and which folders it can only poll, for `autocaption status` and `doctor` in
        another process (a full disk may refuse it)."""
        for name, said in (
            (WAITING_FILE, self.waiting),
            (POLLED_FILE, self._polled()),
            (SERVERS_FILE, self._servers()),
        ):
            path = self.config.state.dir / name
            try:
                if said:
                    write_atomic(path, (said + "\n").encode("utf-8"))
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.debug("%s: %s", display(path), exc)

    def _polled(self) -> str:
        polled = self.watchers.polled_folders if self.watchers is not None else 0
        if not polled:
            return ""
        return f"{counted(polled, 'folder')} polled, not watched: the inotify watch limit is reached; {RAISE_LIMIT}"

    def _servers(self) -> str:
        """Which of several inference servers are up (nothing for one server, or the in-process engine)."""
        pipeline: Pipeline | None = getattr(self, "pipeline", None)  # (none before the model is loaded)
        pool = getattr(pipeline.engine, "pool", None) if pipeline is not None else None
        return pool.summary() if isinstance(pool, ServerPool) and len(pool.servers) > 1 else ""

    def _status(self) -> str:
        stats = self.journal.stats()
        notes = "".join(f"; {note}" for note in (self.waiting, self._polled(), self._servers()) if note)
        return (
            f"{stats.queued + stats.retrying} queued, {stats.per_hour} images/hour, "
            f"{stats.done} done, {stats.failed} failed{notes}"
        )

    def _reload(self) -> None:
        """SIGHUP: new rules and outputs without reloading the model; a bad file changes nothing."""
        self.notifier.reloading()
        try:
            new = load(self.config_path)
            if new.model != self.config.model:
                log.warning("model settings changed: they take effect at the next restart")
                new = replace(new, model=self.config.model)
            if new.state != self.config.state:
                log.warning("state.dir changed: it takes effect at the next restart")
                new = replace(new, state=self.config.state)
            pipeline = Pipeline(new, self.pipeline.engine, locks=self.photo_locks)  # checks the rules
        except AutocaptionError as exc:
            log.error("configuration not reloaded, the old rules stay in force: %s", exc)
            self.notifier.ready(self._status())
            return
        watches_changed = new.watch != self.config.watch
        before = [self.config.fingerprint(rules) for rules in _rule_sets(self.config)]
        answers_changed = [new.fingerprint(rules) for rules in _rule_sets(new)] != before
        self.config = new
        self.pipeline = pipeline
        if watches_changed and self.watchers is not None:
            # Folders that do not exist yet are waited for, never fatal: the daemon keeps every watch it can.
            self.watchers.update(new.watch)
            self.reconcile_requested.set()
        if answers_changed and new.daemon.redo_stale:  # photos described under the old rules are stale now
            self.reconcile_requested.set()
        log.info("configuration reloaded: %s", counted(len(new.rules), "rule"))
        self.notifier.ready(self._status())


def _rule_sets(config: Config) -> list[tuple[Rule, ...]]:
    """Each rule alone: enough to tell whether any rule, the model or the output changed on a reload."""
    return [(rule,) for rule in config.rules]


def open_journal(config: Config) -> Journal:
    """The daemon's journal. A damaged one is set aside and rebuilt from the sidecars (no model involved), so an
    unattended service comes back by itself; the old file is kept. An interrupted rebuild is gone on with."""
    state = config.state.dir
    if rebuilding.interrupted(state):
        log.warning("state.dir: a rebuild of the journal was interrupted; going on with it")
        journal = rebuilding.resumed(state) or rebuilding.start(state)
    else:
        whole = rebuilding.sound(state)
        if whole is not None:
            return whole
        journal = rebuilding.start(state)
    log.warning("%s", rebuilding.refill(config, journal).line())
    return journal


def run(config_path: Path, *, engine_factory: EngineFactory | None = None) -> int:
    return Service(config_path, load(config_path), engine_factory=engine_factory).run()
