"""The journal at archive scale (issue 24), at small N: what keeps the daemon's status line, the queue and the
failures list from reading every row. The bench (bench/scale.py) shows the growth; these show the means."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from autocaption.config import Config
from autocaption.journal import (
    ANSWERS_TRIGGERS,
    DONE,
    FAILED,
    GONE,
    JOURNAL_NAME,
    MIGRATIONS,
    QUEUED,
    RETRY,
    Journal,
    Restored,
)
from tests.conftest import RunCli
from tests.test_daemon import FAST_RULES, photo


def counted(journal: Journal) -> dict[str, int]:
    """The counts as a GROUP BY over every row gives them: what the kept counts must equal."""
    rows = journal.rows("SELECT status, COUNT(*) FROM images GROUP BY status")
    return dict(rows)


def kept(journal: Journal) -> dict[str, int]:
    return {status: n for status, n in journal.rows("SELECT status, n FROM status_counts") if n}


def test_counts_kept_by_triggers_equal_a_full_count_through_every_kind_of_change(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    paths = [tmp_path / f"p{i:02d}.jpg" for i in range(20)]
    for path in paths:
        path.write_bytes(b"x" * 10)
    assert journal.enqueue(paths) == 20 and kept(journal) == counted(journal) == {QUEUED: 20}
    for path in paths[:8]:
        journal.done(path, path.stat(), "sha", "fp", answers=1)
    journal.failed(paths[8], "busy", transient=True, max_attempts=3, backoff=60)
    journal.failed(paths[9], "not an image", transient=False, max_attempts=3, backoff=60)
    journal.gone(paths[:2])
    journal.forget(paths[2])
    journal.moved(paths[3], tmp_path / "moved.jpg", paths[3].stat())
    journal.describe_again(paths[4])
    journal.enqueue(paths[5:7])  # done rows queued again
    journal.retry()
    journal.done(paths[10], paths[10].stat(), None, "fp")  # queued -> done twice (an upsert)
    journal.done(paths[10], paths[10].stat(), None, "fp")
    assert kept(journal) == counted(journal)
    assert set(counted(journal)) <= {QUEUED, DONE, FAILED, RETRY, GONE}
    stats = journal.stats()
    assert (stats.queued, stats.retrying, stats.done, stats.failed) == tuple(
        counted(journal).get(status, 0) for status in (QUEUED, RETRY, DONE, FAILED)
    )
    assert journal.pending() == stats.queued + stats.retrying


def test_a_journal_made_before_the_kept_counts_gets_them_from_its_rows(tmp_path: Path) -> None:
    """Migration 0007 on a journal of 0001..0006 with rows in it: the counts start right, and stay right."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "journal.sqlite3", isolation_level=None)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, migration in MIGRATIONS[:6]:
        if callable(migration):
            migration(db)
        else:
            for statement in filter(str.strip, migration.split(";")):
                db.execute(statement)
        db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
    for i in range(5):
        db.execute("INSERT INTO images (path, status, updated_at) VALUES (?, ?, 0)", (f"/p{i}", DONE if i else FAILED))
    db.close()
    journal = Journal(state)
    assert journal.applied_migrations() == [name for name, _ in MIGRATIONS]
    assert kept(journal) == counted(journal) == {DONE: 4, FAILED: 1}
    assert journal.stats().failed == 1


def test_the_queue_and_the_failures_are_read_in_index_order_never_sorted(tmp_path: Path) -> None:
    """`due` sorted every queued row through a temporary B-tree for each batch (O(N^2) over a rebuilt
    journal's queue); the status line's failures list scanned every row by update time."""
    journal = Journal(tmp_path / "state")
    paths = [tmp_path / f"q{i:03d}.jpg" for i in range(30)]
    journal.enqueue(paths)
    journal.failed(paths[0], "busy", transient=True, max_attempts=3, backoff=0)
    assert journal.due(5) == paths[1:6]  # queued first, in arrival order
    assert journal.due(40, now=time.time() + 1)[-1] == paths[0]  # then the retries whose time came
    plans = [
        journal.rows(f"EXPLAIN QUERY PLAN {sql}", parameters)
        for sql, parameters in (
            ("SELECT path FROM images WHERE status = ? ORDER BY queued_at LIMIT ?", (QUEUED, 5)),
            ("SELECT path FROM images WHERE status = ? AND next_attempt <= ? ORDER BY queued_at LIMIT ?",
             (RETRY, 0, 5)),
            ("SELECT path, last_error FROM images INDEXED BY images_queue WHERE status IN (?, ?)"
             " AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 10", (FAILED, RETRY)),
        )
    ]  # fmt: skip
    queued_plan = " ".join(str(row[-1]) for row in plans[0])
    assert "images_queued" in queued_plan and "TEMP B-TREE" not in queued_plan
    assert all("SCAN images" not in " ".join(str(row[-1]) for row in plan) for plan in plans)


def described_journal(tmp_path: Path, count: int) -> Journal:
    """`count` described photos whose answers share words ("fox" in every third, "snow" in all)."""
    from autocaption.journal import Restored

    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"x")
    journal = Journal(tmp_path / "state")
    answers = ("a fox in the snow", "snow on a roof", "snow, snow and more snow")
    journal.restore(
        Restored(tmp_path / f"p{i:04d}.jpg", probe.stat(), f"{i:064x}", "fp", {"caption": answers[i % 3]})
        for i in range(count)
    )
    return journal


def test_pages_read_from_the_index_however_deep_and_counts_stop_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocaption import catalog
    from autocaption.catalog import Catalog

    monkeypatch.setattr(catalog, "COUNT_CAP", 100)
    journal = described_journal(tmp_path, 250)
    pages, after = [], ""
    while True:  # every photo once, newest first, by `next` alone
        page = Catalog(journal).page(per_page=40, after=after)
        pages.append(page)
        if page.next is None:
            break
        after = page.next
    seen = [image.id for page in pages for image in page.images]
    by_offset = [image.id for n in range(1, 8) for image in Catalog(journal).page(per_page=40, page=n).images]
    assert seen == by_offset and len(seen) == len(set(seen)) == 250
    assert pages[0].total == 100 and pages[0].capped and pages[0].total_text == "100+"
    fox = Catalog(journal).page(query="fox", per_page=40)
    assert (fox.total, fox.capped) == (84, False)  # every third of 250
    plan = " ".join(str(row[-1]) for row in journal.rows(
        "EXPLAIN QUERY PLAN SELECT rowid FROM images WHERE 1 AND (updated_at, rowid) < (?, ?)"
        " ORDER BY updated_at DESC, rowid DESC LIMIT 41", (1e12, 10**9)))  # fmt: skip
    assert "images_updated" in plan and "TEMP B-TREE" not in plan


def test_search_ranks_every_match_but_reads_and_highlights_only_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same hits, in the same order, as ranking, joining and highlighting every match did; past RANKED
    matches, the best of the newest RANKED."""
    from autocaption import catalog
    from autocaption.catalog import MARK, Catalog

    journal = described_journal(tmp_path, 300)
    hits = Catalog(journal).search("snow", limit=7)
    every = journal.rows(
        "SELECT answers.image_id, bm25(answers_fts) FROM answers_fts JOIN answers ON answers.rowid = answers_fts.rowid"
        " WHERE answers_fts MATCH ? ORDER BY bm25(answers_fts), answers_fts.rowid", ['"snow"*'],
    )  # fmt: skip
    assert len(every) == 300 and len(hits) == 7
    assert [hit.rank for hit in hits] == [rank for _, rank in every[:7]]
    assert all(f"{MARK[0]}snow{MARK[1]}" in hit.snippet and hit.image.answers["caption"] for hit in hits)
    assert {hit.image.id for hit in Catalog(journal).search("fox", rule="caption", limit=500)} == {
        image_id for (image_id,) in journal.rows("SELECT image_id FROM answers WHERE answer LIKE '%fox%'")
    }
    assert Catalog(journal).search("fox", rule="keywords") == []

    monkeypatch.setattr(catalog, "RANKED", 60)
    newest = journal.rows(
        "SELECT answers.image_id, bm25(answers_fts) FROM answers_fts JOIN answers ON answers.rowid = answers_fts.rowid"
        " WHERE answers_fts MATCH ? AND answers_fts.rowid >= (SELECT min(rowid) FROM (SELECT rowid FROM answers_fts"
        " WHERE answers_fts MATCH ? ORDER BY rowid DESC LIMIT 60)) ORDER BY bm25(answers_fts)", ['"snow"*', '"snow"*'],
    )  # fmt: skip
    bounded = Catalog(journal).search("Snow", limit=7)
    assert len(newest) == 60 and [hit.rank for hit in bounded] == [rank for _, rank in newest[:7]]
    assert {hit.image.id for hit in bounded} <= {image_id for image_id, _ in newest}
    assert all(f"{MARK[0]}snow{MARK[1]}" in hit.snippet for hit in bounded)


def test_a_rules_search_ranks_that_rules_newest_matches_and_odd_cursors_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocaption import catalog
    from autocaption.catalog import Catalog
    from autocaption.journal import Restored

    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"x")
    journal = Journal(tmp_path / "state")
    old = [Restored(tmp_path / f"o{i}.jpg", probe.stat(), None, "fp", {"ocr": "a dog sign"}) for i in range(5)]
    new = [Restored(tmp_path / f"n{i}.jpg", probe.stat(), None, "fp", {"keywords": "dog, park"}) for i in range(20)]
    journal.restore([*old, *new])
    monkeypatch.setattr(catalog, "RANKED", 10)
    assert len(Catalog(journal).search("dog", rule="ocr")) == 5  # not crowded out by the newer keywords answers
    for after in ("1:99999999999999999999", "nan:1", "inf:-1", "x:y", "1.5", ""):
        assert len(Catalog(journal).page(per_page=50, after=after).images) == 25


@pytest.mark.parametrize(
    ("query", "answer", "marked"),
    [('"red fox"', "A red fox by a redwood; a fox terrier", "A [red] [fox] by a redwood; a fox terrier"),
     ("don't", "Don't touch the tiny tree", "[Don]'[t] touch the tiny tree"),
     ("cafe", "Café au lait", "[Café] au lait"),
     ("red", "redwood red_car", "[redwood] [red]_car")],
)  # fmt: skip
def test_snippets_mark_what_fts5_matched(query: str, answer: str, marked: str) -> None:
    from autocaption.catalog import MARK, _marked, _query_parts

    assert _marked(answer, _query_parts(query)).replace(MARK[0], "[").replace(MARK[1], "]") == marked


def test_an_interrupted_rebuild_goes_on_where_it_stopped_by_the_command_or_the_daemon(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocaption import journal as journal_module
    from autocaption import rebuild as rebuild_module
    from autocaption.config import load
    from autocaption.process import process
    from autocaption.service import open_journal

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    (folder / "new.jpg").write_bytes(photo(9))  # no sidecar yet: queued
    config_path = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(folder)!r}}}]")
    config = load(config_path)
    assert not process(config, sorted(folder.glob("p*.jpg"))).failures
    monkeypatch.setattr(journal_module, "RESTORE_BATCH", 2)
    entered: list[Path] = []
    real_entry = rebuild_module._entry

    def interrupted(config: Config, path: Path, relative: str) -> Restored | Path | None:
        if len(entered) == 3:  # two committed, the third in an open batch: lost with the interruption
            raise KeyboardInterrupt
        entered.append(path)
        return real_entry(config, path, relative)

    mark = config.state.dir / rebuild_module.MARK_NAME
    for finish in ("command", "daemon", "damaged"):
        entered.clear()
        monkeypatch.setattr(rebuild_module, "_entry", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rebuild_module.rebuild(config)
        monkeypatch.setattr(rebuild_module, "_entry", real_entry)
        aside = Path(mark.read_text(encoding="utf-8"))
        assert rebuild_module.interrupted(config.state.dir) and aside.name.startswith(JOURNAL_NAME + ".damaged-")
        half = Journal(config.state.dir)
        assert half.stats().done + half.pending() == 2  # what was committed before the interruption
        half.close()
        if finish == "damaged":  # the half-built journal is damaged too: set aside, and the rebuild starts over
            (config.state.dir / JOURNAL_NAME).write_bytes(b"not a database at all" * 100)
        if finish == "command":
            done = run_cli("rebuild", "--config", config_path)
            assert done.returncode == 0, done.stderr
            said = done.stdout.strip()
            assert "(went on from an interrupted rebuild: 2 already in)" in said and said.endswith(
                f"; the old journal is kept as {aside}"), said  # fmt: skip
            described, queued = map(int, re.findall(r"(\d+) described, (\d+) queued", said)[0])
            assert described + queued == 4, said
            journal = Journal(config.state.dir)
        else:
            journal = open_journal(config)  # the daemon's start: goes on with it rather than start half-filled
        assert not rebuild_module.interrupted(config.state.dir)
        assert journal.stats().done == 5 and journal.pending() == 1, finish
        assert all(journal.get(path) is not None for path in folder.glob("*.jpg"))
        assert all(record.sha256 for path in folder.glob("p*.jpg") if (record := journal.get(path)))
        journal.close()
    # each set aside, none replaced: the three rebuilds' old journals and the damaged half-built one
    assert len(list(config.state.dir.glob(JOURNAL_NAME + ".damaged-*[0-9]"))) == 4


def oracle(journal: Journal, status: str = "", rule: str = "", folder: str = "") -> list[int]:
    """The images a page without words lists, newest first, as a plain query over every row finds them."""
    sql, parameters = "SELECT rowid FROM images WHERE 1", []
    if status:
        sql += " AND status = 'done'"
    if rule:
        sql, parameters = sql + " AND rowid IN (SELECT image_id FROM answers WHERE rule = ?)", [*parameters, rule]
    if folder:
        sql, parameters = sql + " AND substr(path, 1, ?) = ?", [*parameters, len(folder) + 1, folder + "/"]
    return [row[0] for row in journal.rows(sql + " ORDER BY updated_at DESC, rowid DESC", parameters)]


@pytest.mark.parametrize(("narrow", "scanned"), [(1_000, 20_000), (0, 20_000), (0, 5), (10_000, 5)])
def test_pages_of_words_read_the_index_backwards_each_image_once_however_deep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, narrow: int, scanned: int
) -> None:
    """A page of a common word ordered by the images' time gathered every match first (1.2 s at a million);
    now by each image's newest matching answer, read backwards from the index and stopped at the page's end.
    An image matched by two answers is on one page only, filters still apply, and deep pages by `next` equal
    pages by number. The same whichever way a filter is read (`narrow`: from its own index, or walked) and
    however few matches a request may read (`scanned`: pages then come shorter, and `next` goes on)."""
    from autocaption import catalog
    from autocaption.catalog import Catalog

    monkeypatch.setattr(catalog, "COUNT_CAP", 50)
    monkeypatch.setattr(catalog, "NARROW", narrow)
    monkeypatch.setattr(catalog, "SCANNED", scanned)
    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"x")
    journal = Journal(tmp_path / "state")
    journal.restore(
        Restored(tmp_path / ("a" if i % 4 else "b") / f"p{i:03d}.jpg", probe.stat(), None, "fp",
                 {"caption": "snow and a fox" if i % 3 == 0 else "snow", "keywords": "fox" if i % 2 else "sky"})
        for i in range(120)
    )  # fmt: skip
    journal.done(tmp_path / "a" / "p001.jpg", probe.stat(), None, "fp", texts={"caption": "a fox again"})
    fox = {image_id for (image_id,) in journal.rows(
        "SELECT DISTINCT image_id FROM answers WHERE answers.rowid IN"
        " (SELECT rowid FROM answers_fts WHERE answers_fts MATCH 'fox')")}  # fmt: skip
    newest = dict(journal.rows(
        "SELECT image_id, max(rowid) FROM answers WHERE rowid IN (SELECT rowid FROM answers_fts WHERE answers_fts"
        " MATCH 'fox') GROUP BY image_id"))  # fmt: skip
    for filters in ({}, {"folder": str(tmp_path / "a")}, {"rule": "keywords", "status": "described"},
                    {"rule": "caption"}, {"status": "described", "folder": str(tmp_path / "b")}):  # fmt: skip
        pages, after = [], ""
        while True:
            page = Catalog(journal).page(query="fox", per_page=7, after=after, **filters)
            pages.append(page)
            if page.next is None:
                break
            after = page.next
        seen = [image.id for page in pages for image in page.images]
        expected = sorted(fox, key=lambda i: -newest[i])
        if "folder" in filters:
            expected = [i for i in expected if str(Catalog(journal).get(i).path).startswith(filters["folder"] + "/")]
            assert 0 < len(expected) < len(fox)
        assert seen == expected, filters  # each once, newest matching answer first
        walked = narrow == 0 or not {"rule", "status", "folder"} & filters.keys()  # read backwards from the index
        if scanned < 100 and walked:
            assert any(len(page.images) < 7 and page.next for page in pages)  # shorter pages that go on
            continue
        by_number = [image.id for n in range(1, len(pages) + 1)
                     for image in Catalog(journal).page(query="fox", per_page=7, page=n, **filters).images]  # fmt: skip
        assert by_number == seen, filters
        without_words = [image.id for image in Catalog(journal).page(per_page=500, **filters).images]
        assert without_words == oracle(journal, **filters), filters  # a narrow filter read from its own index
    first = Catalog(journal).page(query="fox", per_page=7)
    assert first.images[0].path == tmp_path / "a" / "p001.jpg"  # answered again last: newest
    assert first.capped and (first.total == 50 or scanned < 100) and len(fox) > 50
    rare = Catalog(journal).page(query="again", per_page=7)
    assert (rare.total, rare.capped, [i.id for i in rare.images]) == (1, False, [first.images[0].id])
    assert Catalog(journal).page(query="fox", per_page=7, after="a1").images == []  # nothing below the first answer
    for odd in ("a", "a-1", "ax", "a" + "9" * 30):  # not ours: the first page
        assert [i.id for i in Catalog(journal).page(query="fox", per_page=7, after=odd).images] == [
            i.id for i in first.images]


def test_search_prefixes_are_indexed_and_an_older_journal_finds_the_same_after_the_migration(tmp_path: Path) -> None:
    """FTS5 reads a prefix it has no index for by gathering every answer of every word it begins first (27 ms
    for "the" at a million answers, for each query of a page): migration 0009 indexes prefixes of 1 to 6
    characters. A journal made before it finds the same photos after it, prefixes and plurals included."""
    from autocaption.catalog import Catalog

    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"x")
    journal = Journal(tmp_path / "state")
    answers = ["the dog on the grass", "two dogs in a theatre", "a sunset at the harbour", "Café crème"]
    journal.restore(Restored(tmp_path / f"p{i}.jpg", probe.stat(), None, "fp", {"caption": text})
                    for i, text in enumerate(answers))  # fmt: skip
    queries = ["the", "dog", "dogs", "thea", "sun", "harbour", "harb", "cafe", '"the dog"', "d", "dog the"]
    after = {query: [hit.image.path.name for hit in Catalog(journal).search(query)] for query in queries}
    (definition,) = journal.rows("SELECT sql FROM sqlite_master WHERE name = 'answers_fts'")[0]
    assert "prefix='1 2 3 4 5 6'" in definition
    assert set(after["dog"]) == set(after["d"]) == {"p0.jpg", "p1.jpg"} and after["dogs"] == ["p1.jpg"]
    assert after["thea"] == ["p1.jpg"] and after["cafe"] == ["p3.jpg"] and after["harb"] == ["p2.jpg"]
    journal.close()
    # the same journal as it was before 0009: an FTS table without the prefix index
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    for statement in MIGRATIONS_BEFORE_0009:
        db.execute(statement)
    db.execute("DELETE FROM migrations WHERE name = '0009_answers_prefix_index'")
    db.commit()
    db.close()
    migrated = Journal(tmp_path / "state")
    (definition,) = migrated.rows("SELECT sql FROM sqlite_master WHERE name = 'answers_fts'")[0]
    assert "prefix='1 2 3 4 5 6'" in definition
    assert {query: [hit.image.path.name for hit in Catalog(migrated).search(query)] for query in queries} == after
    assert migrated.rows("INSERT INTO answers_fts (answers_fts) VALUES ('integrity-check')") == []


MIGRATIONS_BEFORE_0009 = (  # the index as 0003 made it
    "DROP TRIGGER answers_insert",
    "DROP TRIGGER answers_delete",
    "DROP TRIGGER answers_update",
    "DROP TABLE answers_fts",
    "CREATE VIRTUAL TABLE answers_fts USING fts5(answer, content='answers', tokenize='unicode61 remove_diacritics 2')",
    "INSERT INTO answers_fts (answers_fts) VALUES ('rebuild')",
    *ANSWERS_TRIGGERS,
)


def test_a_rebuild_interrupted_before_the_old_journal_was_set_aside_loses_nothing(
    make_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark is written first, naming where the old journal goes: a full disk refuses the mark before
    anything moved, and a crash between the mark and the renames (or between two renames) is finished by the
    next start: the old journal ends where the mark says, with its -wal, and the rebuild goes on."""
    from autocaption import rebuild as rebuild_module
    from autocaption.config import load
    from autocaption.process import process
    from autocaption.service import open_journal

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1))
    config = load(make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(folder)!r}}}]"))
    assert not process(config, [folder]).failures
    state = config.state.dir
    old = (state / JOURNAL_NAME).read_bytes()

    def full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rebuild_module, "write_atomic", full)
    with pytest.raises(OSError, match="No space"):
        rebuild_module.rebuild(config)
    assert (state / JOURNAL_NAME).read_bytes() == old and not rebuild_module.interrupted(state)  # nothing moved
    monkeypatch.undo()

    target = rebuild_module.aside_name(state)
    assert target is not None
    (state / rebuild_module.MARK_NAME).write_text(str(target), encoding="utf-8")  # the crash: marked, not moved
    (state / (JOURNAL_NAME + "-wal")).write_bytes(b"frames of the old journal")
    journal = open_journal(config)
    assert target.read_bytes() == old and target.with_name(target.name + "-wal").read_bytes() == (
        b"frames of the old journal")  # fmt: skip
    assert journal.stats().done == 1 and not rebuild_module.interrupted(state)
    journal.close()


def test_a_rule_of_few_answers_is_searched_from_its_own_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`search --rule ocr` walked every match of the word to find that rule's few (250 ms at a million
    answers): a rule of at most NARROW answers is searched from its own answers, and finds what the index
    finds, best first."""
    from autocaption import catalog
    from autocaption.catalog import Catalog

    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"x")
    journal = Journal(tmp_path / "state")
    journal.restore(Restored(tmp_path / f"p{i:03d}.jpg", probe.stat(), None, "fp", {"caption": "snow on a roof"})
                    for i in range(200))  # fmt: skip
    signs = ["a sign saying snow", "snow snow snow", "a long sign by the road saying that snow is expected", "no"]
    journal.restore(Restored(tmp_path / f"s{i}.jpg", probe.stat(), None, "fp", {"ocr": text})
                    for i, text in enumerate(signs))  # fmt: skip
    few = Catalog(journal).search("snow", rule="ocr")
    assert [hit.image.path.name for hit in few] == ["s1.jpg", "s0.jpg", "s2.jpg"]  # densest first, "no" not at all
    assert all(hit.rank < 0 and hit.rule == "ocr" and f"{catalog.MARK[0]}snow" in hit.snippet for hit in few)
    monkeypatch.setattr(catalog, "NARROW", 0)  # the same rule walked through the index: the same photos
    walked = Catalog(journal).search("snow", rule="ocr")
    assert sorted(hit.image.path.name for hit in walked) == sorted(hit.image.path.name for hit in few)
    assert Catalog(journal).search("sign", rule="ocr", limit=1)[0].image.path.name == "s0.jpg"
