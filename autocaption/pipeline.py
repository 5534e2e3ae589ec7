"""The pipeline: for a batch of image files, decide what needs doing, read the pictures, ask the engine,
clean the answers and write the results. Per-file problems become `Failed` outcomes, never exceptions,
so one bad photo never stops the rest. `process` (one-shot) and the daemon both drive this class.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autocaption import sidecar
from autocaption.config import Config, Rule
from autocaption.discover import Candidate
from autocaption.engine.base import Answer, Engine, Job, Prompt
from autocaption.errors import EngineError, ImageError, ServerUnreachable, WriteError
from autocaption.images import Picture, open_picture
from autocaption.paths import display
from autocaption.textclean import clean_answer
from autocaption.writers.metadata import Caption, MetadataWriter, WriteRecord
from autocaption.writers.policy import split_keywords

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Described:
    path: Path
    answers: int
    seconds: float
    results: tuple[sidecar.RuleResult, ...] = ()
    written: WriteRecord | None = None
    stat: os.stat_result | None = None  # the photo as it is now (after any write into it)
    sha256: str | None = None  # of the photo as it is now
    fingerprint: str | None = None  # of the rules and model that produced the result


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class Failed:
    path: Path
    message: str  # one line, "path: reason"
    transient: bool = False  # worth retrying later (file still being written, GPU out of memory)


Outcome = Described | Skipped | Failed


@dataclass
class _Work:
    """One image on its way through a batch."""

    candidate: Candidate
    rules: tuple[Rule, ...]
    stat: os.stat_result
    existing: dict[str, object] | None
    picture: Picture
    prompts: tuple[str, ...]


def triage(
    config: Config,
    candidate: Candidate,
    *,
    force: bool,
    stat: os.stat_result | None = None,
    existing: dict[str, object] | None = None,
) -> Skipped | None:
    """Why this image needs no work (no rule matches it, or its sidecar is current), or None."""
    rules = config.rules_for(candidate.relative)
    if not rules:
        return Skipped(candidate.path, "no rule matches")
    if force:
        return None
    try:
        stat = stat or candidate.path.stat()
    except OSError:
        return None  # let the read report it properly
    if existing is None:
        existing = sidecar.read(candidate.path)
    return Skipped(candidate.path, "already described") if sidecar.is_current(existing, stat, rules) else None


def render_values(path: Path, picture: Picture) -> dict[str, str | None]:
    return {"file": path.name, "folder": path.parent.name, **picture.facts}


class Pipeline:
    def __init__(self, config: Config, engine: Engine, *, force: bool = False, dry_run: bool = False) -> None:
        self.config = config
        self.engine = engine
        self.force = force
        self.dry_run = dry_run
        self.metadata = MetadataWriter(config.output)
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, for `-v` and the benchmarks

    def run(self, candidates: Sequence[Candidate], cancel: threading.Event | None = None) -> list[Outcome]:
        """Describe a batch of images; one outcome per candidate, in order.

        Raises `Cancelled` when `cancel` is set during generation: nothing of the batch was written.
        """
        return self.finish(self.prepare(candidates), cancel)

    def prepare(self, candidates: Sequence[Candidate]) -> list[_Work | Outcome]:
        """Read and decode the pictures (no model involved): may run on a prefetch thread."""
        started = time.perf_counter()
        prepared = [self._prepare(candidate) for candidate in candidates]
        self.timings["read+decode"] += time.perf_counter() - started
        return prepared

    def finish(self, prepared: list[_Work | Outcome], cancel: threading.Event | None = None) -> list[Outcome]:
        """Ask the engine about the prepared pictures and write the results; one outcome each, in order."""
        work = [item for item in prepared if isinstance(item, _Work)]
        described = iter(self._describe(work, cancel) if work else [])
        return [next(described) if isinstance(item, _Work) else item for item in prepared]

    def _prepare(self, candidate: Candidate) -> _Work | Outcome:
        path = candidate.path
        rules = self.config.rules_for(candidate.relative)
        try:
            stat = path.stat()
            existing = sidecar.read(path)
            skip = triage(self.config, candidate, force=self.force, stat=stat, existing=existing)
            if skip:
                return skip
            picture = open_picture(
                path, max_pixels=self.config.images.max_pixels, draft_side=self.engine.info.max_image_side
            )
            after = path.stat()
        except FileNotFoundError:
            return Failed(path, f"{display(path)}: file disappeared before it could be read")
        except OSError as exc:
            return Failed(path, f"{display(path)}: cannot read: {exc.strerror or exc}")
        except ImageError as exc:
            return Failed(path, str(exc))
        if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            return Failed(path, f"{display(path)}: changed while being read; will retry", transient=True)
        values = render_values(path, picture)
        prompts = tuple(rule.prompt.render(values) for rule in rules)
        return _Work(candidate, rules, stat, existing, picture, prompts)

    def _describe(self, work: list[_Work], cancel: threading.Event | None = None) -> list[Outcome]:
        jobs = [
            Job(
                image=item.picture.image,
                prompts=tuple(
                    Prompt(text=text, max_new_tokens=rule.max_new_tokens, system=rule.system)
                    for rule, text in zip(item.rules, item.prompts, strict=True)
                ),
            )
            for item in work
        ]
        try:
            answers = self.engine.describe(jobs, cancel)
        except ServerUnreachable:
            raise  # every image would wait for the same server: the caller decides (stop, or wait)
        except EngineError as exc:
            if len(work) > 1:  # find the one image that breaks the batch; the others still get done
                return [outcome for item in work for outcome in self._describe([item], cancel)]
            path = work[0].candidate.path
            return [Failed(path, f"{display(path)}: {exc}", transient=exc.transient)]
        started = time.perf_counter()
        outcomes = [self._write(item, item_answers) for item, item_answers in zip(work, answers, strict=True)]
        self.timings["write"] += time.perf_counter() - started
        return outcomes

    def _write(self, item: _Work, answers: Sequence[Answer]) -> Outcome:
        """Into the photo (or its XMP sidecar) first, then the JSON sidecar, which records both."""
        path = item.candidate.path
        results = tuple(
            sidecar.RuleResult(rule, prompt, clean_answer(answer.text, strip_prefixes=rule.strip_prefixes), answer)
            for rule, prompt, answer in zip(item.rules, item.prompts, answers, strict=True)
        )
        failure = None
        try:
            record = self.metadata.write(path, item.candidate.root, caption_of(results), dry_run=self.dry_run)
        except WriteError as exc:
            failure = str(exc)
            record = WriteRecord("failed", "not written", "not written", reason=failure)
        seconds = sum(r.raw.seconds for r in results)
        rewritten = record.stat is not None
        described = Described(
            path, len(results), seconds, results, record,
            stat=record.stat if rewritten else item.stat,
            sha256=record.sha256 if rewritten else item.picture.sha256,
            fingerprint=self.config.fingerprint(item.rules),
        )  # fmt: skip
        if self.dry_run:
            return described
        document = sidecar.build(path, item.picture, item.stat, self.engine.info, results, item.existing, record)
        try:
            sidecar.write(path, document)
        except WriteError as exc:
            failure = f"{failure}; {exc}" if failure else str(exc)
        return Failed(path, failure) if failure else described


def caption_of(results: Sequence[sidecar.RuleResult]) -> Caption:
    """The first `description` rule's answer and every `keywords` rule's words, in rule order."""
    description = next((r.answer for r in results if "description" in r.rule.write and r.answer), None)
    keywords: dict[str, str] = {}
    for result in results:
        if "keywords" in result.rule.write:
            for word in split_keywords(result.answer):
                keywords.setdefault(word.casefold(), word)
    return Caption(description, tuple(keywords.values()))
