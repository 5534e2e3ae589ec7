"""The pipeline: for a batch of image files, decide what needs doing, read the pictures, ask the engine,
clean the answers and write the results. Per-file problems become `Failed` outcomes, never exceptions,
so one bad photo never stops the rest. `process` (one-shot) and the daemon both drive this class.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocaption import atomic, places, sidecar
from autocaption.config import Config, Rule
from autocaption.discover import Candidate
from autocaption.engine.base import Answer, Engine, EngineInfo, Job, PartlyAnswered, Prompt, skipped
from autocaption.errors import ConfigError, EngineError, ImageError, ServerUnreachable, WriteError
from autocaption.images import Picture, open_picture, position_of
from autocaption.locks import PhotoLocks
from autocaption.paths import display, text
from autocaption.placeholders import GIVEN
from autocaption.places import Place
from autocaption.structure import AnswerInvalid, Keywords, shown
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
    json_sidecar: Path | None = None  # where the results are (or, in a dry run, would be)
    earlier: bool = False  # answers recorded by an earlier run, written again (no model involved)
    edited: str | None = None  # a person's correction the photo carries (its sidecar's "edited"), for search


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    document: dict[str, Any] | None = None  # the current sidecar, when it is why nothing was needed


@dataclass(frozen=True)
class Failed:
    path: Path
    message: str  # one line, "path: reason"
    transient: bool = False  # worth retrying later (file still being written, GPU out of memory)
    stat: os.stat_result | None = None  # the photo after our write into it, when only a later step failed
    changed: bool = False  # the file changed under us (another program, or another autocaption, wrote it)


Outcome = Described | Skipped | Failed


@dataclass
class _Work:
    """One image on its way through a batch."""

    candidate: Candidate
    rules: tuple[Rule, ...]
    stat: os.stat_result
    found: sidecar.Sidecar
    picture: Picture
    prompts: tuple[str, ...]
    force: bool = False  # described again even if another process finished it meanwhile
    place: Place | None = None  # where it was taken, when a rule or `output.location` asks


@dataclass(frozen=True)
class Unwritten:
    """An image whose sidecar holds current answers that are not in the photo (the write failed, or its XMP
    sidecar is gone): they are written again from the sidecar, without the model."""

    candidate: Candidate
    rules: tuple[Rule, ...]
    stat: os.stat_result
    found: sidecar.Sidecar
    reason: str


def check_rules(config: Config, engine: EngineInfo) -> None:
    """What the configuration asks that this model cannot do: a system text for a template without one is
    an error naming the rule, never silently dropped."""
    if engine.system_role:
        return
    for rule in config.rules:
        if rule.system is not None:
            raise ConfigError(
                f"{rule.system_where or rule.name}: the chat template of {engine.model_id} has no system turn; "
                "move this text into the prompt, or choose a model whose template has one"
            )


def triage(
    config: Config,
    candidate: Candidate,
    *,
    force: bool,
    stat: os.stat_result | None = None,
    found: sidecar.Sidecar | None = None,
) -> Skipped | Unwritten | None:
    """Why this image needs no model (no rule matches it, its sidecar is current, or only the write into
    the photo is missing), or None when it must be described."""
    rules = config.rules_for(candidate.relative)
    if not rules:
        return Skipped(candidate.path, "no rule matches")
    outside = _outside(candidate)
    if outside:
        log.warning("%s", outside)
        return Skipped(candidate.path, outside)
    if force:
        return None
    try:
        stat = stat or candidate.path.stat()
    except OSError:
        return None  # let the read report it properly
    found = found or sidecar.locate(candidate.path)
    if found.document is None or not sidecar.is_current(found.document, stat, rules, config.model.id):
        return None
    reason = sidecar.unwritten(found.document, candidate.path, config.writing(rules))
    if reason is None:
        return Skipped(candidate.path, "already described", found.document)
    return Unwritten(candidate, rules, stat, found, reason)


def _outside(candidate: Candidate) -> str | None:
    """Why nothing may be written for this photo: reached through a symlinked folder, its folder really is
    outside the one it was found in, and its sidecars would land there (a symlinked file is different: its
    sidecars go beside the link, and the writer never rewrites a photo outside the folder)."""
    try:
        real, root = candidate.path.parent.resolve(), candidate.root.resolve()
    except OSError:
        return None  # the read reports it
    if real == root or root in real.parents:
        return None
    return (f"{display(candidate.path)}: its folder is {display(real)}, outside {display(candidate.root)} "
            "(through a symlink); left alone, nothing is written there")  # fmt: skip


def render_values(path: Path, picture: Picture) -> dict[str, str | None]:
    # Prompts are UTF-8 text: a name that is not UTF-8 is given with its bytes written \\xff.
    return {"file": text(path.name), "folder": text(path.parent.name), **picture.facts}


class Pipeline:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        force: bool = False,
        dry_run: bool = False,
        locks: PhotoLocks | None = None,
    ) -> None:
        check_rules(config, engine.info)
        self.config = config
        self.engine = engine
        self.force = force
        self.writer = ResultWriter(config, dry_run=dry_run, locks=locks, force=force)
        self.draft_side = engine.info.max_image_side if config.images.draft else None
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, for `-v` and the benchmarks

    def run(
        self, candidates: Sequence[Candidate], cancel: threading.Event | None = None, forced: Set[Path] = frozenset()
    ) -> list[Outcome]:
        """Describe a batch of images; one outcome per candidate, in order. `forced`: paths to describe even
        when their results are current (the review page's "describe again").

        Raises `Cancelled` when `cancel` is set during generation: nothing of the batch was written.
        """
        return self.finish(self.prepare(candidates, forced), cancel)

    def prepare(
        self, candidates: Sequence[Candidate], forced: Set[Path] = frozenset()
    ) -> list[_Work | Unwritten | Outcome]:
        """Read and decode the pictures (no model involved): may run on a prefetch thread."""
        started = time.perf_counter()
        prepared = [self._prepare(candidate, self.force or candidate.path in forced) for candidate in candidates]
        self.timings["read+decode"] += time.perf_counter() - started
        return prepared

    def finish(
        self, prepared: list[_Work | Unwritten | Outcome], cancel: threading.Event | None = None
    ) -> list[Outcome]:
        """Ask the engine about the prepared pictures and write the results; one outcome each, in order.

        The batch's folders are fsynced once each, when its last write is done and before this returns, so an
        outcome the caller records is durable.
        """
        work = [item for item in prepared if isinstance(item, _Work)]
        outcomes: list[Outcome] = []
        with atomic.batched_folder_syncs() as syncs:
            described = iter(self._describe(work, cancel) if work else [])
            for item in prepared:
                if isinstance(item, _Work):
                    outcomes.append(next(described))
                elif isinstance(item, Unwritten):
                    outcomes.append(self.writer.earlier(item))
                else:
                    outcomes.append(item)
        return [_unsynced(outcome, syncs.failed) for outcome in outcomes] if syncs.failed else outcomes

    def _prepare(self, candidate: Candidate, force: bool) -> _Work | Unwritten | Outcome:
        path = candidate.path
        rules = self.config.rules_for(candidate.relative)
        try:
            stat = path.stat()
            found = sidecar.locate(path)
            skip = triage(self.config, candidate, force=force, stat=stat, found=found)
            if skip:
                return skip
            picture = open_picture(path, max_pixels=self.config.images.max_pixels, draft_side=self.draft_side)
            after = path.stat()
        except FileNotFoundError:
            return Failed(path, f"{display(path)}: file disappeared before it could be read")
        except OSError as exc:
            return Failed(path, f"{display(path)}: cannot read: {exc.strerror or exc}")
        except ImageError as exc:
            return Failed(path, str(exc))
        if not _same_file(after, stat):
            return Failed(path, f"{display(path)}: changed while being read; will retry", transient=True, changed=True)
        values = render_values(path, picture)
        names = frozenset().union(*(rule.prompt.names for rule in rules))
        located = bool(names & places.NAMES) or self.config.output.location
        place = None
        if names & GIVEN or located:  # read from the photo's metadata only when asked
            given = self.writer.metadata.persons(path)
            values |= {"caption": given.caption, "keywords": ", ".join(given.keywords) or None}
            if located:
                place = self.writer.places.of(given.place, picture.position)
                values |= place.values()
        prompts = tuple(rule.prompt.render(values) for rule in rules)
        return _Work(candidate, rules, stat, found, picture, prompts, force, place)

    def _describe(self, work: list[_Work], cancel: threading.Event | None = None) -> list[Outcome]:
        asked = [_asked(item) for item in work]
        jobs = [Job(image=item.picture.image, prompts=_prompts(item, positions), jpeg=item.picture.jpeg)
                for item, positions in zip(work, asked, strict=True)]  # fmt: skip
        try:
            answers = [_all_answers(item, positions, got) for item, positions, got in
                       zip(work, asked, self.engine.describe(jobs, cancel), strict=True)]  # fmt: skip
        except ServerUnreachable:
            raise  # every image would wait for the same server: the caller decides (stop, or wait)
        except PartlyAnswered as exc:  # the answers received are written; the images that failed fail alone
            return [self._answered(item, _all_answers(item, asked[index], got)) if got is not None
                    else self._failed(item, exc.errors[index])
                    for index, (item, got) in enumerate(zip(work, exc.answers, strict=True))]  # fmt: skip
        except EngineError as exc:
            if len(work) > 1:  # find the one image that breaks the batch; the others still get done
                return [outcome for item in work for outcome in self._describe([item], cancel)]
            return [self._failed(work[0], exc)]
        return [self._answered(item, item_answers) for item, item_answers in zip(work, answers, strict=True)]

    def _answered(self, item: _Work, answers: Sequence[Answer]) -> Outcome:
        started = time.perf_counter()
        outcome = self.writer.answers(item, self.engine.info, answers)
        self.timings["write"] += time.perf_counter() - started
        return outcome

    @staticmethod
    def _failed(item: _Work, error: EngineError) -> Failed:
        path = item.candidate.path
        return Failed(path, f"{display(path)}: {error}", transient=error.transient)


class ResultWriter:
    """Writes answers into the photo (or its XMP sidecar) first, then the JSON sidecar, which records both.

    One writer at a time per photo (`PhotoLocks`, shared with other autocaption processes): under the lock
    the sidecar is read again, so a photo another process finished meanwhile is not written twice, and a
    photo that changed since it was read is left for a retry rather than captioned with stale answers.
    """

    def __init__(self, config: Config, *, dry_run: bool, locks: PhotoLocks | None, force: bool = False) -> None:
        self.config = config
        self.dry_run = dry_run
        self.locks = locks
        self.force = force
        self.metadata = MetadataWriter(config.output)
        self.places = places.Places()  # the geocoder, loaded by the first photo that needs a place named

    def answers(self, item: _Work, engine: EngineInfo, answers: Sequence[Answer]) -> Outcome:
        """Fresh answers from the model. An answer that does not satisfy its rule's structure fails the photo:
        nothing of it is written (the rules' answers go into the photo together or not at all)."""
        try:
            asked = zip(item.rules, item.prompts, answers, strict=True)
            results = tuple(_result(rule, prompt, answer) for rule, prompt, answer in asked)
        except AnswerInvalid as exc:
            path = item.candidate.path
            return Failed(path, f"{display(path)}: {exc}; nothing written")

        def document(found: sidecar.Sidecar, record: WriteRecord) -> dict[str, Any]:
            path = item.candidate.path
            return sidecar.build(path, item.picture, item.stat, engine, results, found.document, record)

        todo = _ToWrite(item.candidate, item.rules, item.stat, results, document, item.picture.sha256, force=item.force,
                        place=item.place)  # fmt: skip
        return self._locked(todo, item.found)

    def earlier(self, item: Unwritten) -> Outcome:
        """Answers an earlier run recorded in the sidecar, whose write into the photo is missing."""
        assert item.found.document is not None
        log.info("%s: %s; writing the recorded answers again", display(item.candidate.path), item.reason)
        results = sidecar.results_of(item.found.document, item.rules)

        def document(found: sidecar.Sidecar, record: WriteRecord) -> dict[str, Any]:
            assert found.document is not None  # checked under the lock
            return sidecar.with_written(found.document, record, record.stat or item.stat)

        sha256 = str(item.found.document["image"].get("sha256") or "")
        todo = _ToWrite(item.candidate, item.rules, item.stat, results, document, sha256, earlier=True,
                        place=self._recorded_place(item))  # fmt: skip
        return self._locked(todo, item.found)

    def _recorded_place(self, item: Unwritten) -> Place | None:
        """The place recorded with the answers, for `output.location`; named now for answers recorded before
        it was turned on (from the photo's EXIF: no decoding of its pixels)."""
        if not self.config.output.location:
            return None
        assert item.found.document is not None
        recorded = item.found.document["image"].get("place")
        if isinstance(recorded, dict):
            return Place(**{name: recorded.get(name) for name in ("city", "region", "country", "sublocation")})
        path = item.candidate.path
        return self.places.of(self.metadata.persons(path).place, position_of(path))

    def _locked(self, todo: _ToWrite, found: sidecar.Sidecar) -> Outcome:
        """Write under the photo's lock, after reading its sidecar again (none of this in a dry run)."""
        if self.dry_run or self.locks is None:
            return self._write(todo, found)
        try:
            with self.locks.hold(todo.candidate.path):
                found = sidecar.locate(todo.candidate.path)
                return self._stale(todo, found) or self._write(todo, found)
        except WriteError as exc:  # only the lock raises: every write failure below becomes an outcome
            return Failed(todo.candidate.path, str(exc), transient=exc.transient)

    def _stale(self, todo: _ToWrite, found: sidecar.Sidecar) -> Outcome | None:
        """Under the lock: another process finished this photo meanwhile, or it changed since it was read."""
        path = todo.candidate.path
        try:
            now = path.stat()
        except FileNotFoundError:
            return Failed(path, f"{display(path)}: file disappeared while being described")
        except OSError as exc:
            return Failed(path, f"{display(path)}: cannot read: {exc.strerror or exc}")
        current = sidecar.is_current(found.document, now, todo.rules, self.config.model.id)
        settings = self.config.writing(todo.rules)
        in_place = current and sidecar.unwritten(found.document or {}, path, settings) is None
        if in_place and not (self.force or todo.force):
            return Skipped(path, "described meanwhile by another autocaption process")
        if not _same_file(now, todo.stat) or (todo.earlier and not current):
            return Failed(path, f"{display(path)}: changed while being described; will retry", transient=True,
                          changed=True)  # fmt: skip
        return None

    def _corrections(
        self, path: Path, root: Path, document: Mapping[str, Any] | None, record: WriteRecord
    ) -> WriteRecord:
        """A person's corrections (the review page) written again where the photo no longer carries them (its
        XMP sidecar deleted, its metadata stripped by another program): its JSON sidecar keeps them. Not
        under `existing: overwrite`, which lets the model's answers replace a person's."""
        person = _correction((document or {}).get("edited"))
        if self.dry_run or person is None or self.config.output.existing == "overwrite" or self._carries(path, person):
            return record
        log.info("%s: a person's correction was no longer in the photo; written again", display(path))
        again = self.metadata.write(path, root, person)
        return dataclasses.replace(
            again, file=record.file if again.file == "unchanged" else again.file, reason=record.reason or again.reason,
            stat=again.stat or record.stat, sha256=again.sha256 or record.sha256,
            description=again.description if person.description is not None else record.description,
            keywords=again.keywords if person.keywords is not None else record.keywords,
            texts=tuple({**dict(record.texts), **dict(again.texts)}.items()),
        )  # fmt: skip

    def _carries(self, path: Path, person: Caption) -> bool:
        description, keywords = self.metadata.carried(path)
        alt = next((text for target, _, text in person.texts if target == "alt_text"), None)
        words = {word.casefold() for word in keywords}
        # (a person's keywords: still all there, beside the model's that later runs add)
        same_words = person.keywords is None or {word.casefold() for word in person.keywords} <= words
        return ((person.description is None or description == person.description) and same_words
                and (alt is None or self.metadata.carried_texts(path).get("alt_text") == alt))  # fmt: skip

    def _write(self, todo: _ToWrite, found: sidecar.Sidecar) -> Outcome:
        path = todo.candidate.path
        failure: WriteError | None = None
        try:
            located = todo.place if self.config.output.location else None  # (a `{place}` alone writes none)
            caption = caption_of(todo.results, located)
            record = self.metadata.write(path, todo.candidate.root, caption, dry_run=self.dry_run)
            record = self._corrections(path, todo.candidate.root, found.document, record)
        except WriteError as exc:
            failure = exc
            record = WriteRecord("failed", "not written", "not written", reason=str(exc))
        rewritten = record.stat is not None
        described = Described(
            path, 0 if todo.earlier else len(todo.results), sum(r.raw.seconds for r in todo.results),
            todo.results, record,
            stat=record.stat if rewritten else todo.stat,
            sha256=record.sha256 if rewritten else todo.sha256,
            fingerprint=self.config.fingerprint(todo.rules), json_sidecar=found.path, earlier=todo.earlier,
        )  # fmt: skip
        if found.foreign:
            log.warning("%s", found.notice())
        if self.dry_run:
            return described
        document = todo.document(found, record)
        if todo.place is not None:  # (for writing the answers again without the photo's pixels)
            document["image"]["place"] = dataclasses.asdict(todo.place)
        document["written"] = {**document.get("written", {}), "settings": self.config.writing(todo.rules)}
        described = dataclasses.replace(described, edited=sidecar.edited_text(document))
        try:
            sidecar.write(found, document)
        except WriteError as exc:
            failure = WriteError(f"{failure}; {exc}", transient=failure.transient) if failure else exc
        if failure:  # our write into the photo (if it happened) must not look like a new photo to the watcher
            return Failed(path, str(failure), transient=failure.transient, stat=record.stat)
        return described


@dataclass(frozen=True)
class _ToWrite:
    """Answers on their way into a photo and its JSON sidecar."""

    candidate: Candidate
    rules: tuple[Rule, ...]
    stat: os.stat_result  # the photo as it was read
    results: tuple[sidecar.RuleResult, ...]
    document: Callable[[sidecar.Sidecar, WriteRecord], dict[str, Any]]  # the JSON sidecar, given what was written
    sha256: str  # of the bytes that were described
    earlier: bool = False  # the answers come from an earlier run's sidecar
    force: bool = False  # written even if another process finished the photo meanwhile
    place: Place | None = None  # where it was taken (`output.location`, and placeholders)


def _asked(item: _Work) -> list[int]:
    """The positions of the rules the engine is asked: all but those gated by a rule that does not apply to
    this photo (its `match` leaves it out), whose gate's answer can never come."""
    asked: dict[str, int] = {}
    for index, rule in enumerate(item.rules):
        if rule.when is None or rule.when.rule in asked:
            asked[rule.name] = index
    return list(asked.values())


def _prompts(item: _Work, asked: list[int]) -> tuple[Prompt, ...]:
    position = {item.rules[index].name: at for at, index in enumerate(asked)}
    prompts = []
    for index in asked:
        rule, text = item.rules[index], item.prompts[index]
        after = position[rule.when.rule] if rule.when else None
        prompts.append(Prompt(text=text, max_new_tokens=rule.max_new_tokens, system=rule.system,
                              structure=rule.structure, after=after, gate=rule.when))  # fmt: skip
    return tuple(prompts)


def _all_answers(item: _Work, asked: list[int], answers: Sequence[Answer]) -> list[Answer]:
    """One answer per rule of the photo: the engine's, and "not asked" for the rules it was not asked."""
    given = dict(zip(asked, answers, strict=True))
    return [given.get(index) or skipped(f"{rule.when.rule if rule.when else '?'} does not apply to this photo")
            for index, rule in enumerate(item.rules)]  # fmt: skip


def _unsynced(outcome: Outcome, failed: Mapping[Path, str]) -> Outcome:
    """A described photo whose folder could not be fsynced is not durably written: retried, not recorded."""
    if not isinstance(outcome, Described):
        return outcome
    folders = [outcome.path.parent] + ([outcome.json_sidecar.parent] if outcome.json_sidecar else [])
    reason = next((failed[folder] for folder in folders if folder in failed), None)
    if reason is None:
        return outcome
    message = f"{display(outcome.path)}: written, but its folder could not be synced to disk ({reason}); will retry"
    return Failed(outcome.path, message, transient=True, stat=outcome.stat)


def _same_file(now: os.stat_result, before: os.stat_result) -> bool:
    return (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _result(rule: Rule, prompt: str, answer: Answer) -> sidecar.RuleResult:
    """A rule's answer as recorded: skipped, read into its structure's value, or cleaned free text."""
    if answer.skipped is not None:
        return sidecar.RuleResult(rule, prompt, "", answer)
    if rule.structure is None:
        return sidecar.RuleResult(rule, prompt, clean_answer(answer.text, strip_prefixes=rule.strip_prefixes), answer)
    try:
        value = rule.structure.read(answer.text)
    except AnswerInvalid as exc:
        raise AnswerInvalid(f"rule {rule.name}: {exc}") from None
    return sidecar.RuleResult(rule, prompt, shown(value), answer, value=value)


TEXTS = ("description", "title", "alt_text", "extended_description")  # the language-alternative targets


def _correction(edited: object) -> Caption | None:
    """A person's recorded correction ("edited" in the JSON sidecar) as a caption to write: only the fields
    they wrote (a correction recorded before that was listed: its description)."""
    if not isinstance(edited, dict):
        return None
    changed = set(edited.get("changed") or (["description"] if edited.get("description") else []))
    description = edited.get("description") if "description" in changed else None
    words = edited.get("keywords") if "keywords" in changed else None
    alt = edited.get("alt_text") if "alt_text" in changed else None
    description = description if isinstance(description, str) and description else None
    keywords = tuple(str(word) for word in words) if isinstance(words, list) else None
    texts = (("alt_text", "x-default", alt),) if isinstance(alt, str) and alt else ()
    if description is None and keywords is None and not texts:
        return None
    return Caption(description, keywords, asked=True, person=True, texts=texts)


def caption_of(results: Sequence[sidecar.RuleResult], place: Place | None = None) -> Caption:
    """The first `description` rule's answer and every `keywords` rule's words, in rule order; the texts of
    each other target and language (`_texts`); `place`, to be written where the photo has no location."""
    description = next((r.answer for r in results if "description" in r.rule.write and r.answer), None)
    keywords: dict[str, str] = {}
    paths: dict[str, str] = {}
    for result in results:
        if "keywords" in result.rule.write and result.skipped is None:
            words = result.value if isinstance(result.value, list) else split_keywords(result.answer)
            for word in map(str, words):
                if "|" in word:  # a free answer's `Places|Italy|Arezzo`: the leaf a keyword, the path a hierarchy
                    parts = [part.strip() for part in word.split("|") if part.strip()]
                    if not parts:
                        continue
                    word = parts[-1]
                    paths.setdefault("|".join(parts).casefold(), "|".join(parts))
                keywords.setdefault(word.casefold(), word)
            if isinstance(result.rule.structure, Keywords) and isinstance(result.value, list):
                paths.update((path.casefold(), path) for path in result.rule.structure.paths(result.value))
    return Caption(description, tuple(keywords.values()), asked=any(result.rule.write for result in results),
                   paths=tuple(paths.values()), texts=_texts(results), place=place)  # fmt: skip


def _texts(results: Sequence[sidecar.RuleResult]) -> tuple[tuple[str, str, str], ...]:
    """(target, language, text) of every text but the default description: a target's first answer is its
    x-default (and its language's alternative, where its rule names one); a later rule adds the alternative of
    its `language` (a later rule without one: the first answer stands, as for the description)."""
    texts: dict[tuple[str, str], tuple[str, str]] = {}  # (target, language folded) -> (language, text)
    for result in results:
        if result.skipped is not None or not result.answer:
            continue
        for target in TEXTS:
            if target not in result.rule.write:
                continue
            languages = [result.rule.language] if result.rule.language else []
            if not any(key[0] == target for key in texts):
                languages.insert(0, "x-default")
            for lang in languages:  # ("DE" and "de" are one language, as XMP's xml:lang has them)
                texts.setdefault((target, lang.casefold()), (lang, result.answer))
    texts.pop(("description", "x-default"), None)  # (Caption.description: the EXIF and IPTC captions follow it)
    return tuple((target, lang, text) for (target, _), (lang, text) in texts.items())
