"""`autocaption process`: describe every image under the given paths once, then report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from autocaption.config import Config, ModelConfig
from autocaption.discover import Candidate, Unreadable, scan
from autocaption.engine import Engine, load_engine
from autocaption.errors import ServerUnreachable
from autocaption.images import not_an_image
from autocaption.journal import DONE, Journal, record_outcome
from autocaption.locks import PhotoLocks
from autocaption.pipeline import Failed, Outcome, Pipeline, ResultWriter, Skipped, Unwritten, triage
from autocaption.report import Progress, Summary, report_unreadable

EngineFactory = Callable[[ModelConfig], Engine]
log = logging.getLogger(__name__)


def process(
    config: Config,
    paths: Sequence[Path],
    *,
    force: bool = False,
    dry_run: bool = False,
    stale: bool = False,
    engine_factory: EngineFactory | None = None,
) -> Summary:
    """Describe every image under `paths`; with `dry_run` nothing is written and `summary.planned`
    says what would have been. With `stale`, only images the journal says were described by other
    rules or another model (under `paths`, or every watched folder) are described again."""
    started = time.perf_counter()
    summary = Summary()
    candidates: list[Candidate] = []
    seen: set[Path] = set()
    if stale and not paths:
        paths = [watch.path for watch in config.watch]
    for found in scan(paths, config):
        if isinstance(found, Unreadable):
            summary.failures.append(report_unreadable(found.path, found.reason))
        elif found.path not in seen:
            seen.add(found.path)
            candidates.append(found)
    # A dry run touches nothing, the state dir included: it reads the journal (for --stale) only if it exists.
    if not dry_run:
        journal: Journal | None = Journal(config.state.dir)
    else:
        journal = Journal(config.state.dir, read_only=True) if Journal.exists(config.state.dir) else None
    locks = None if dry_run else PhotoLocks(config.state.dir)
    try:
        if stale:  # the sidecars then say what is needed: the model, or only writing the answers again
            candidates = _stale(config, journal, candidates, summary)
        pending: list[Candidate] = []
        unwritten: list[Unwritten] = []
        for candidate in candidates:
            triaged = triage(config, candidate, force=force)
            # Whether the model loads at all waits on one image among them: until one is found, files that are
            # none are told from their headers (after it, the pipeline names them as it reads them: no second
            # open of every photo).
            refused = not_an_image(candidate.path) if triaged is None and not pending else None
            if refused is not None:
                log.error("%s", refused)
                _book(summary, journal, config, candidate, Failed(candidate.path, refused))
            elif triaged is None:
                pending.append(candidate)
            elif isinstance(triaged, Unwritten):
                unwritten.append(triaged)
            else:
                summary.add(triaged)
        writer = ResultWriter(config, dry_run=dry_run, locks=locks)
        for item in unwritten:  # answers recorded earlier, not yet in the photo: no model needed
            _book(summary, journal, config, item.candidate, writer.earlier(item))
        if pending:  # a re-run with nothing to do never pays for loading the model
            try:
                _describe(config, pending, force, dry_run, locks, engine_factory, summary, journal)
            except ServerUnreachable as exc:  # every other photo would wait for the same server
                summary.stopped = str(exc)
    finally:
        if journal is not None:
            journal.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _book(summary: Summary, journal: Journal | None, config: Config, candidate: Candidate, outcome: Outcome) -> None:
    summary.add(outcome)
    if journal is not None and not journal.read_only:
        record_outcome(journal, config, candidate, outcome)


def _stale(config: Config, journal: Journal | None, candidates: list[Candidate], summary: Summary) -> list[Candidate]:
    stale = []
    for candidate in candidates:
        record = journal.get(candidate.path) if journal is not None else None
        current = config.fingerprint(config.rules_for(candidate.relative))
        if record is not None and record.status == DONE and record.fingerprint not in (None, current):
            stale.append(candidate)
        else:
            summary.add(Skipped(candidate.path, "not stale"))
    return stale


def _changed_meanwhile(outcome: Outcome) -> bool:
    return isinstance(outcome, Failed) and outcome.changed


def _describe(
    config: Config,
    pending: list[Candidate],
    force: bool,
    dry_run: bool,
    locks: PhotoLocks | None,
    engine_factory: EngineFactory | None,
    summary: Summary,
    journal: Journal | None,
) -> None:
    engine = (engine_factory or partial(load_engine, cache_dir=config.state.dir / "torch-compile"))(config.model)
    try:
        pipeline = Pipeline(config, engine, force=force, dry_run=dry_run, locks=locks)
        progress = Progress(len(pending))
        progress.draw()
        step = engine.info.batch_images
        chunks = [pending[start : start + step] for start in range(0, len(pending), step)]
        again: list[Candidate] = []
        # The next chunk is read and decoded on a prefetch thread while the model works on this one.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as prefetch:
            upcoming = prefetch.submit(pipeline.prepare, chunks[0])
            for index, chunk in enumerate(chunks):
                prepared = upcoming.result()
                if index + 1 < len(chunks):
                    upcoming = prefetch.submit(pipeline.prepare, chunks[index + 1])
                outcomes = pipeline.finish(prepared)
                again.extend(c for c, o in zip(chunk, outcomes, strict=True) if _changed_meanwhile(o))
                for candidate, outcome in zip(chunk, outcomes, strict=True):
                    if not _changed_meanwhile(outcome):
                        _book(summary, journal, config, candidate, outcome)
                progress.advance([o for o in outcomes if not _changed_meanwhile(o)])
        # Photos another process (a running daemon) wrote while they were described here: a one-shot run has
        # nobody to "retry later", so they are read and described once more now.
        for start in range(0, len(again), step):
            chunk = again[start : start + step]
            outcomes = pipeline.run(chunk)
            for candidate, outcome in zip(chunk, outcomes, strict=True):
                _book(summary, journal, config, candidate, outcome)
            progress.advance(outcomes)
        progress.clear()
        summary.stages = {**pipeline.timings, **engine.timings}
    finally:
        engine.close()
