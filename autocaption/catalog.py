"""What the journal knows, asked the way the review page and `autocaption search` ask: pages of images with
their answers, filtered by folder, status, rule and words, and full-text search ranked by relevance.

Images are known by their journal id (the row id), never by a path taken from a request: a page or an
API call can only reach photos the journal lists. Every query is bounded (a page, a limit), so a journal
of 100,000 photos answers as fast as one of 100.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocaption.config import Config
from autocaption.errors import ConfigError
from autocaption.journal import DONE, EDITED, FAILED, QUEUED, RETRY, Journal
from autocaption.paths import display, from_db
from autocaption.structure import Choice, Keywords

# What the page calls a status, and the journal's statuses behind it.
STATUSES = {"described": (DONE,), "failed": (FAILED,), "queued": (QUEUED, RETRY)}
MARK = ("\x02", "\x03")  # around matched words in search snippets: the CLI and the page each render them


@dataclass(frozen=True)
class Image:
    id: int
    path: Path
    status: str  # described, failed, queued
    error: str | None
    updated: float  # when the journal last changed it (seconds since the epoch)
    answers: dict[str, str]  # rule name -> the model's answer
    edited: str | None = None  # a person's correction (description, then keywords, a line each)

    @property
    def caption(self) -> str:
        """What the photo says now: the person's description first, else the first answer (rules by name)."""
        person = (self.edited or "").split("\n", 1)[0]
        return person or next(iter(self.answers.values()), "")


Wheres = tuple[tuple[str, str], ...]  # (rule, answer): photos whose structured answer is (or holds) it

# A query in parts: each part's tokens, and whether it is a word (its last token a prefix) or a quoted phrase.
Parts = list[tuple[list[str], bool]]
COUNT_CAP = 10_000  # matches counted exactly up to this many; past it a page says "10,000+"
RANKED = 10_000  # a search ranks at most this many matches, the newest (see Catalog.search)
SCANNED = 20_000  # matches a page of words reads at most per request (see Catalog._matching)
NARROW = 1_000  # a filter that leaves at most this many images is read from its own index (see Catalog._narrow)


@dataclass(frozen=True)
class Page:
    total: int  # matching images, at most COUNT_CAP (see `capped`)
    images: list[Image]
    capped: bool = False  # more than COUNT_CAP match: counting them all would read every match per page
    next: str | None = None  # where the next page starts (`after`), when there is one

    @property
    def total_text(self) -> str:
        return f"{self.total:,}+" if self.capped else f"{self.total:,}"


@dataclass(frozen=True)
class Hit:
    image: Image
    rule: str
    snippet: str  # the answer with the matched words between MARK[0] and MARK[1]
    rank: float


def match_expression(query: str) -> str | None:
    """Words as an FTS5 query: every word must occur (as a prefix, so "beac" finds "beach"); quotes keep a
    phrase. Anything else a user types is taken literally, never as FTS5 syntax. Prefixes of 1 to 6
    characters are indexed (journal migration 0009), so a common one is read lazily, newest first."""
    return " AND ".join('"' + " ".join(tokens) + '"' + ("*" if word else "") for tokens, word in _terms(query)) or None


def _terms(query: str) -> Parts:
    """(tokens, whether it is a word rather than a quoted phrase) of every part of a query that has any."""
    parts = []
    for phrase, word in re.findall(r'"([^"]*)"|(\S+)', query):
        tokens = re.findall(r"\w+", phrase or word)
        if tokens:
            parts.append((tokens, not phrase))
    return parts


def _display_status(status: str) -> str:
    return next((name for name, kinds in STATUSES.items() if status in kinds), status)


def _image(row: tuple[Any, ...], answers: dict[str, str]) -> Image:
    """An image from (rowid, path, status, last_error, updated_at) and its answers (a correction among them)."""
    edited = answers.pop(EDITED, None)
    return Image(row[0], Path(from_db(row[1])), _display_status(row[2]), row[3], row[4], answers, edited)


class Catalog:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def page(
        self, *, query: str = "", status: str = "", rule: str = "", folder: str = "", page: int = 1, per_page: int = 60,
        after: str = "", values: Wheres = (),
    ) -> Page:  # fmt: skip
        """One page of images, newest first, with the filters the page offers. `after` (a page's `next`)
        starts where that page ended, read from the index however deep (OFFSET reads and drops every row
        before the page); else `page` counts pages from the first. The count stops at COUNT_CAP.

        With words, "newest" is the newest matching answer: the full-text index is read backwards from it
        and stops at the page's end, so a word in every answer costs what a rare one does. Ordered by the
        images' time instead, every match had to be gathered before the first could be shown (1.2 s for a
        word of a million answers)."""
        expression = match_expression(query) if query else None
        if query and expression is None:
            return Page(0, [])  # words without letters or digits match nothing
        where, parameters = self._filters(status, rule, folder, values)
        offset = max(page, 1) - 1
        if expression is not None:
            narrow = self._narrow(status, rule, folder, NARROW)
            return self._matching(_query_parts(query), expression, where, parameters, per_page, offset, after, narrow)
        # Without words a narrow list costs one look-up per image: up to what a page counts (its total).
        narrow = self._narrow(status, rule, folder, COUNT_CAP)
        if narrow is not None:  # a few images: gathered from their index and sorted, not found by walking them all
            where += f" AND images.rowid IN ({narrow[0]})"
            parameters = [*parameters, *narrow[1]]
        counted = self.journal.rows(f"SELECT COUNT(*) FROM (SELECT 1 FROM images WHERE {where} LIMIT ?)",
                                    [*parameters, COUNT_CAP + 1])[0][0]  # fmt: skip
        cursor = _cursor(after)
        if cursor is not None:
            where += " AND (updated_at, rowid) < (?, ?)"
            parameters = [*parameters, *cursor]
        rows = self.journal.rows(
            f"SELECT rowid, path, status, last_error, updated_at FROM images WHERE {where}"
            " ORDER BY updated_at DESC, rowid DESC LIMIT ? OFFSET ?",
            [*parameters, per_page + 1, 0 if cursor is not None else offset * per_page],
        )
        more, rows = len(rows) > per_page, rows[:per_page]
        answers = self._answers([row[0] for row in rows])
        images = [_image(row, answers.get(row[0], {})) for row in rows]
        following = f"{rows[-1][4]!r}:{rows[-1][0]}" if more and rows else None
        return Page(min(int(counted), COUNT_CAP), images, capped=counted > COUNT_CAP, next=following)

    def _matching(
        self, parts: Parts, expression: str, where: str, parameters: list[object], per_page: int, offset: int,
        after: str, narrow: tuple[str, list[object]] | None,
    ) -> Page:  # fmt: skip
        """A page of the images with a matching answer, by their newest matching answer (see `page`); `next`
        is "a<answer rowid>": where the next page starts reading. Images of a narrow filter (`narrow`: an SQL
        list of at most NARROW ids) are each looked up in the index; else the index is read backwards, at most
        SCANNED matches a request: a page that reaches that mark is shorter, and its `next` goes on below it
        (a filter that leaves few of a common word's photos costs pages, never seconds)."""
        below = int(after[1:]) if re.fullmatch(r"a[0-9]{1,18}", after) else None
        start = 0 if below is not None else offset * per_page
        if narrow is not None:
            ids = [row[0] for row in self.journal.rows(
                f"SELECT images.rowid FROM images WHERE images.rowid IN ({narrow[0]}) AND {where}",
                [*narrow[1], *parameters])]  # fmt: skip
            ranked = sorted(self._newest_match(parts, ids).items(), key=lambda item: -item[1])
            counted, exhausted = len(ranked), True
            found = [(image, at) for image, at in ranked if below is None or at < below][start:]
            last_read = None
        else:
            counted, exhausted = self._count_matching(expression, where, parameters)
            found, last_read = self._read_matching(
                parts, expression, where, parameters, below, start + per_page + 1, after
            )
            found = found[start:]
        more, found = len(found) > per_page, found[:per_page]
        images = self._images([image for image, _ in found])
        following = f"a{found[-1][1]}" if more and found else f"a{last_read}" if last_read is not None else None
        return Page(min(counted, COUNT_CAP), [images[image] for image, _ in found if image in images],
                    capped=counted > COUNT_CAP or not exhausted, next=following)  # fmt: skip

    def _count_matching(self, expression: str, where: str, parameters: list[object]) -> tuple[int, bool]:
        """Images with a matching answer among the newest SCANNED matches (up to COUNT_CAP + 1), and whether
        those were all the matches (else the count is a floor: "…+")."""
        counted, read = self.journal.rows(
            "SELECT count(DISTINCT answers.image_id), (SELECT count(*) FROM (SELECT rowid FROM answers_fts"
            " WHERE answers_fts MATCH ? ORDER BY rowid DESC LIMIT ?)) FROM (SELECT rowid FROM answers_fts"
            " WHERE answers_fts MATCH ? ORDER BY rowid DESC LIMIT ?) AS matched JOIN answers ON answers.rowid ="
            f" matched.rowid JOIN images ON images.rowid = answers.image_id WHERE {where}",
            [expression, SCANNED + 1, expression, SCANNED, *parameters],
        )[0]  # fmt: skip
        return int(counted), int(read) <= SCANNED

    def _read_matching(
        self, parts: Parts, expression: str, where: str, parameters: list[object], below: int | None, wanted: int,
        after: str,
    ) -> tuple[list[tuple[int, int]], int | None]:  # fmt: skip
        """Up to `wanted` (image, its newest matching answer), newest first, read backwards from `below`; and
        where the reading stopped when it reached SCANNED matches first (None: it found what it wanted, or
        every match)."""
        found: list[tuple[int, int]] = []
        seen: set[int] = set()
        scanned, chunk = 0, min(max(wanted * 2, 128), SCANNED)
        while len(found) < wanted:
            bound, limits = ("AND rowid < ? ", [below]) if below is not None else ("", [])
            rows = self.journal.rows(
                f"SELECT answers.image_id, matched.rowid, images.rowid IS NOT NULL AND ({where}) FROM (SELECT rowid"
                f" FROM answers_fts WHERE answers_fts MATCH ? {bound}ORDER BY rowid DESC LIMIT ?) AS matched"
                " JOIN answers ON answers.rowid = matched.rowid LEFT JOIN images ON images.rowid = answers.image_id"
                " ORDER BY matched.rowid DESC",
                [*parameters, expression, *limits, chunk],
            )  # fmt: skip
            fresh = []
            for image, at, wanted_here in rows:  # each image where its newest match in this reading is
                if image not in seen:
                    seen.add(image)
                    if wanted_here:
                        fresh.append((image, at))
            if after:  # an image whose newest match lies above where this page starts was on an earlier page
                newest = self._newest_match(parts, [image for image, _ in fresh])
                fresh = [(image, at) for image, at in fresh if newest.get(image) == at]
            found += fresh
            scanned += len(rows)
            if len(rows) < chunk:
                return found, None
            below = rows[-1][1]
            if scanned >= SCANNED and len(found) < wanted:
                return found, below
            chunk = min(chunk * 2, SCANNED)
        return found, None

    def _newest_match(self, parts: Parts, ids: list[int]) -> dict[int, int]:
        """Each image's newest answer that matches, told from the answers' text as FTS5 tokenises it (a few
        hundred images a query: SQLite's limit on variables). Asking the index instead, image by image, gathers
        every match of a prefix it has no index for (1 letter, 7 or more) at each look-up: seconds a page."""
        found: dict[int, int] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for image, rowid, answer in self.journal.rows(
                f"SELECT image_id, rowid, answer FROM answers WHERE image_id IN ({marks})", part
            ):
                if rowid > found.get(image, -1) and _answers_match(answer, parts):
                    found[image] = rowid
        return found

    def get(self, image_id: int) -> Image | None:
        return self._images([image_id]).get(image_id)

    def search(self, query: str, *, rule: str = "", limit: int = 50) -> list[Hit]:
        """Answers matching every word, best first (FTS5's bm25). bm25 reads every match's entry, so a word in
        more than RANKED answers is ranked among its RANKED newest matches (found in rowid order, which FTS5
        stops early); the snippets are marked here, for the hits only (FTS5's highlight() would read every
        match again)."""
        expression = match_expression(query)
        if expression is None:
            return []
        parts = _query_parts(query)
        if rule and self._narrow("", rule, "", NARROW) is not None:
            return self._search_few(parts, rule, limit)
        if rule:  # the newest matches of that rule: a rule of a few folders is not crowded out by the others
            newest = self.journal.rows(
                "SELECT min(rowid), count(*) FROM (SELECT answers_fts.rowid FROM answers_fts JOIN answers"
                " ON answers.rowid = answers_fts.rowid WHERE answers_fts MATCH ? AND answers.rule = ?"
                " ORDER BY answers_fts.rowid DESC LIMIT ?)", [expression, rule, RANKED],
            )  # fmt: skip
        else:
            newest = self.journal.rows(
                "SELECT min(rowid), count(*) FROM (SELECT rowid FROM answers_fts WHERE answers_fts MATCH ?"
                " ORDER BY rowid DESC LIMIT ?)", [expression, RANKED],
            )  # fmt: skip
        floor = newest[0][0] if newest and newest[0][1] >= RANKED else None
        clauses, parameters = ["answers_fts MATCH ?"], [expression]
        if floor is not None:
            clauses.append("answers_fts.rowid >= ?")
            parameters.append(floor)
        if rule:
            clauses.append("answers.rule = ?")
            parameters.append(rule)
        rows = self.journal.rows(
            "SELECT answers.image_id, answers.rule, answers.answer, bm25(answers_fts)"
            " FROM answers_fts JOIN answers ON answers.rowid = answers_fts.rowid"
            f" WHERE {' AND '.join(clauses)} ORDER BY bm25(answers_fts) LIMIT ?",
            [*parameters, limit],
        )
        images = self._images([row[0] for row in rows])
        return [Hit(images[image_id], rule_name, _marked(answer, parts), float(rank))
                for image_id, rule_name, answer, rank in rows if image_id in images]  # fmt: skip

    def _search_few(self, parts: Parts, rule: str, limit: int) -> list[Hit]:
        """A rule of few answers (at most NARROW) searched from its own answers, read by the rule's index and
        matched as FTS5 tokenises them: walking the word's matches for that rule's few read them all (250 ms
        at a million answers). Ranked as bm25 ranks answers that all hold every word: more of the words, in a
        shorter answer, first (the rank is bm25's without the words' rarity, negative like FTS5's)."""
        found = []  # (image, answer, its tokens, each part's matches in it): every answer tokenised once
        for image_id, answer in self.journal.rows("SELECT image_id, answer FROM answers WHERE rule = ?", [rule]):
            folded = _folded_tokens(answer)
            counts = _part_counts(folded, parts)
            if all(counts):
                found.append((image_id, answer, len(folded), counts))
        average = sum(length for _, _, length, _ in found) / len(found) if found else 1.0
        ranked = sorted(((_bm25(counts, length, average), image_id, answer)
                         for image_id, answer, length, counts in found), key=lambda item: item[0])[:limit]  # fmt: skip
        images = self._images([image_id for _, image_id, _ in ranked])
        return [Hit(images[image_id], rule, _marked(answer, parts), rank)
                for rank, image_id, answer in ranked if image_id in images]  # fmt: skip

    def _images(self, ids: list[int]) -> dict[int, Image]:
        """The images of these ids, in two queries whatever their number."""
        if not ids:
            return {}
        marks = ",".join("?" * len(set(ids)))
        rows = self.journal.rows(
            f"SELECT rowid, path, status, last_error, updated_at FROM images WHERE rowid IN ({marks})", list(set(ids))
        )
        answers = self._answers([row[0] for row in rows])
        return {row[0]: _image(row, answers.get(row[0], {})) for row in rows}

    def _answers(self, ids: list[int]) -> dict[int, dict[str, str]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        found: dict[int, dict[str, str]] = {}
        for image_id, rule, answer in self.journal.rows(
            f"SELECT image_id, rule, answer FROM answers WHERE image_id IN ({marks}) ORDER BY rule", ids
        ):
            found.setdefault(image_id, {})[rule] = answer
        return found

    def _narrow(self, status: str, rule: str, folder: str, limit: int) -> tuple[str, list[object]] | None:
        """The images of a status, rule or folder filter that leaves at most `limit` of them, as an SQL list (and its
        parameters) read from that filter's own index; None when neither is that narrow. Walking the newest
        images (or matches) until a page is full costs little where most pass the filter, and reads them all
        where few do: 50 failed photos among a million took half a second a page."""
        if status in STATUSES:
            kinds = STATUSES[status]
            marks = ",".join("?" * len(kinds))
            counts = self.journal.counts()
            if sum(counts.get(kind, 0) for kind in kinds) <= limit:
                return f"SELECT rowid FROM images WHERE status IN ({marks})", list(kinds)
        if rule:
            (count,) = self.journal.rows("SELECT count(*) FROM (SELECT 1 FROM answers WHERE rule = ? LIMIT ?)",
                                         [rule, limit + 1])[0]  # fmt: skip
            if count <= limit:
                return "SELECT image_id FROM answers WHERE rule = ?", [rule]
        if folder:  # the paths under it are a range of the path's own index ("0" follows "/")
            folder = folder.rstrip("/")
            bounds: list[object] = [folder + "/", folder + "0"]
            (count,) = self.journal.rows("SELECT count(*) FROM (SELECT 1 FROM images WHERE path >= ? AND path < ?"
                                         " LIMIT ?)", [*bounds, limit + 1])[0]  # fmt: skip
            if count <= limit:
                return "SELECT rowid FROM images WHERE path >= ? AND path < ?", bounds
        return None

    def admits(self, ids: list[int], where: Wheres) -> set[int]:
        """Which of these images have every structured answer `where` asks for."""
        if not ids:
            return set()
        clauses, parameters = _answered(where)
        marks = ",".join("?" * len(ids))
        return {row[0] for row in self.journal.rows(
            f"SELECT rowid FROM images WHERE rowid IN ({marks}) AND {' AND '.join(clauses or ['1'])}",
            [*ids, *parameters])}  # fmt: skip

    @staticmethod
    def _filters(status: str, rule: str, folder: str, values: Wheres = ()) -> tuple[str, list[object]]:
        """Conditions on `images` (each read per row, never a set gathered first); words are `_matching`'s."""
        clauses, parameters = _answered(values)
        clauses.insert(0, "1")
        if status in STATUSES:
            kinds = STATUSES[status]
            clauses.append(f"images.status IN ({','.join('?' * len(kinds))})")
            parameters.extend(kinds)
        if folder:
            prefix = folder.rstrip("/") + "/"
            clauses.append("substr(images.path, 1, ?) = ?")
            parameters.extend([len(prefix), prefix])
        if rule:  # the answers' key (image_id, rule): one look-up per image
            clauses.append("EXISTS (SELECT 1 FROM answers AS ruled WHERE ruled.image_id = images.rowid"
                           " AND ruled.rule = ?)")  # fmt: skip
            parameters.append(rule)
        return " AND ".join(clauses), parameters


def _answered(where: Wheres) -> tuple[list[str], list[object]]:
    """`rule=value` conditions on images: that rule's answer is the value (a choice), or holds it among its
    items (a list, stored as "a, b, c"), letter case aside. Read by the answers' key (image_id, rule)."""
    clauses: list[str] = []
    parameters: list[object] = []
    for rule, value in where:
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("EXISTS (SELECT 1 FROM answers AS valued WHERE valued.image_id = images.rowid"
                       " AND valued.rule = ? AND (valued.answer = ? COLLATE NOCASE"
                       " OR ', ' || valued.answer || ', ' LIKE ? ESCAPE '\\'))")  # fmt: skip
        parameters += [rule, value, f"%, {escaped}, %"]
    return clauses, parameters


def wheres(config: Config, given: Sequence[str]) -> Wheres:
    """`--where blurry=yes` (or the API's `?blurry=yes`) checked against the rules: a rule with a choice or a
    list, and for a choice one of its options (spelled as the rule spells it)."""
    rules = {rule.name: rule for rule in config.rules}
    found = []
    for text in given:
        name, equals, value = text.partition("=")
        rule = rules.get(name.strip())
        if not equals or not value.strip():
            raise ConfigError(f"--where {text}: write RULE=ANSWER, e.g. blurry=yes")
        if rule is None:
            raise ConfigError(f"--where {text}: no rule {name!r} in {display(config.source)}")
        value = value.strip()
        if isinstance(rule.structure, Choice):
            option = next((o for o in rule.structure.options if o.casefold() == value.casefold()), None)
            if option is None:
                raise ConfigError(f"--where {text}: {name} answers one of {', '.join(rule.structure.options)}")
            value = option
        elif not isinstance(rule.structure, Keywords):
            raise ConfigError(f"--where {text}: rule {name} answers in free text or JSON; search its words instead")
        elif "," in value:
            raise ConfigError(f"--where {text}: one item at a time (an item has no comma); repeat --where for more")
        found.append((rule.name, value))
    return tuple(found)


def _folded(word: str) -> str:
    """A word as FTS5's default tokenizer (unicode61) compares it: case-folded, without diacritics."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))


_TOKEN = re.compile(r"[^\W_]+")  # unicode61's tokens: letters and digits (an underscore separates)


def _query_parts(query: str) -> Parts:
    """The query as match_expression gives it to FTS5, tokenised as FTS5 does: phrases of tokens, each a
    word's (its last token a prefix) or a quoted phrase's (exact)."""
    parts = []
    for terms, word in _terms(query):
        tokens = [_folded(token) for term in terms for token in _TOKEN.findall(term)]
        if tokens:
            parts.append((tokens, word))
    return parts


def _matches(folded: list[str], parts: Parts) -> Iterator[tuple[int, int, int]]:
    """(part, first token, tokens) of every run of the folded tokens that matches a part of the query: the
    part's tokens in order, exactly, the last one as a prefix where the part is a word."""
    for index, (wanted, prefix) in enumerate(parts):
        for start in range(len(folded) - len(wanted) + 1):
            window = folded[start : start + len(wanted)]
            if window[:-1] == wanted[:-1] and (
                window[-1].startswith(wanted[-1]) if prefix else window[-1] == wanted[-1]
            ):
                yield index, start, len(wanted)


def _folded_tokens(answer: str) -> list[str]:
    """An answer's tokens as FTS5's tokenizer compares them."""
    return [_folded(token) for token in _TOKEN.findall(answer)]


def _part_counts(folded: list[str], parts: Parts) -> list[int]:
    """How often each part of the query occurs among the folded tokens."""
    counts = [0] * len(parts)
    for index, _, _ in _matches(folded, parts):
        counts[index] += 1
    return counts


def _answers_match(answer: str, parts: Parts) -> bool:
    """Whether an answer holds every part of the query, as FTS5 would find it."""
    return all(_part_counts(_folded_tokens(answer), parts))


def _bm25(counts: list[int], length: int, average: float) -> float:
    """FTS5's bm25 (k1 1.2, b 0.75) of an answer of `length` tokens that holds each part of the query `counts`
    times, each part's rarity taken as equal."""
    scale = 1.2 * (0.25 + 0.75 * length / max(average, 1.0))
    return -sum(count * 2.2 / (count + scale) for count in counts)


def _marked(answer: str, parts: Parts) -> str:
    """The answer with each run of tokens that matches a part of the query marked, as highlight() marks
    FTS5's matches: the tokens in order, exactly, the last one as a prefix where the part is a word."""
    tokens = list(_TOKEN.finditer(answer))
    marked = [False] * len(tokens)
    for _, start, length in _matches([_folded(m[0]) for m in tokens], parts):
        marked[start : start + length] = [True] * length
    out, at = [], 0
    for match, hit in zip(tokens, marked, strict=True):
        if hit:
            out.append(f"{answer[at : match.start()]}{MARK[0]}{match[0]}{MARK[1]}")
            at = match.end()
    return "".join(out) + answer[at:]


def _cursor(after: str) -> tuple[float, int] | None:
    """A page's `next` ("<updated_at>:<rowid>") as a position in the index; None when there is none (or it
    is not one of ours: a request's text is never trusted to be)."""
    updated, _, rowid = after.partition(":")
    if not re.fullmatch(r"-?[0-9]{1,18}", rowid):  # within SQLite's 64-bit integers
        return None
    try:
        moment = float(updated)
    except ValueError:
        return None
    return (moment, int(rowid)) if math.isfinite(moment) else None


def search(config: Config, query: str, *, rule: str = "", limit: int = 50, where: Sequence[str] = ()) -> list[Hit]:
    """`autocaption search`: the journal opened read-only (the daemon may be writing it). With `where`
    (`blurry=yes`), each photo once: those whose answers hold every value, by the words when there are any
    (the best hit of each photo), else newest first."""
    names = [r.name for r in config.rules]
    if rule and rule not in names:
        raise ConfigError(f"--rule {rule}: no rule of that name in {display(config.source)} ({', '.join(names)})")
    valued = wheres(config, where)
    journal = Journal(config.state.dir, read_only=True)
    try:
        catalog = Catalog(journal)
        if not valued:
            return catalog.search(query, rule=rule, limit=limit)
        if not query.strip():
            page = catalog.page(rule=rule, values=valued, per_page=limit)
            return [Hit(image, valued[0][0], image.answers.get(valued[0][0], ""), 0.0) for image in page.images]
        hits = catalog.search(query, rule=rule, limit=RANKED)
        admitted = catalog.admits(sorted({hit.image.id for hit in hits}), valued)
        once: dict[int, Hit] = {}
        for hit in hits:  # best first: each photo's best hit is its first
            if hit.image.id in admitted:
                once.setdefault(hit.image.id, hit)
        return list(once.values())[:limit]
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"state.dir: {journal.path}: no search index yet ({exc}); run `autocaption process` or the daemon once"
        ) from None
    finally:
        journal.close()


def render_hits(hits: list[Hit], *, as_json: bool, bold: bool) -> str:
    """One block per hit (path, then rule and answer with the match marked), or JSON for scripts."""
    if as_json:
        return json.dumps(
            [{"id": hit.image.id, "path": display(hit.image.path), "rule": _label(hit.rule),
              "answer": hit.image.edited if hit.rule == EDITED else hit.image.answers.get(hit.rule),
              "rank": hit.rank, "status": hit.image.status,
              "snippet": hit.snippet.replace(MARK[0], "[").replace(MARK[1], "]")} for hit in hits],
            ensure_ascii=False, indent=2,
        )  # fmt: skip
    opening, closing = ("\x1b[1m", "\x1b[0m") if bold else ("[", "]")
    return "\n".join(
        f"{display(hit.image.path)}\n  {_label(hit.rule)}: "
        f"{hit.snippet.replace(MARK[0], opening).replace(MARK[1], closing).replace(chr(10), ' · ')}"
        for hit in hits
    )


def _label(rule: str) -> str:
    return "correction" if rule == EDITED else rule
