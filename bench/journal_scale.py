"""The journal's per-call costs at archive scale: what the daemon asks it every 0.5 s (its status line) and
for every batch (the queue), now against the queries it ran before issue 24, on the same journal, in the same
run. The journal is filled through its own API (`restore`, `enqueue`, `failed`), with real files' stats.

Usage: python bench/journal_scale.py [--sizes 10000,100000,1000000] [--calls 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD_COUNTS = "SELECT status, COUNT(*) FROM images GROUP BY status"
OLD_DUE = (
    "SELECT path FROM images WHERE status = 'queued' OR (status = 'retry' AND next_attempt <= ?)"
    " ORDER BY status = 'retry', queued_at LIMIT 12"
)
OLD_SEARCH = (  # every match highlighted and joined, then sorted; each hit then read on its own (Catalog.get)
    "SELECT answers.image_id, answers.rule, highlight(answers_fts, 0, '[', ']'), bm25(answers_fts)"
    " FROM answers_fts JOIN answers ON answers.rowid = answers_fts.rowid"
    " WHERE answers_fts MATCH ? ORDER BY bm25(answers_fts) LIMIT 50"
)
OLD_PAGE_COUNT = (  # every match counted for the page's total
    "SELECT COUNT(*) FROM images WHERE 1 AND rowid IN (SELECT answers.image_id FROM answers_fts"
    " JOIN answers ON answers.rowid = answers_fts.rowid WHERE answers_fts MATCH ?)"
)
WORDS = ("a fox in the snow by the harbour", "snow on the roof of the barn", "children on a beach in the sun")
OLD_ERRORS = (
    "SELECT path, last_error FROM images WHERE status IN ('failed', 'retry') AND last_error IS NOT NULL"
    " ORDER BY updated_at DESC LIMIT 10"
)


def median_ms(call: object, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def fill(journal: object, folder: Path, done: int, queued: int) -> None:
    from autocaption.journal import Restored

    probe = folder / "probe.jpg"
    probe.write_bytes(b"x")
    st = probe.stat()
    entries = (
        Restored(folder / f"d{i:07d}.jpg", st, f"{i:064x}", "fp", {"caption": WORDS[i % 3]}) for i in range(done)
    )
    journal.restore(entries)  # type: ignore[attr-defined]
    journal.enqueue(folder / f"q{i:07d}.jpg" for i in range(queued))  # type: ignore[attr-defined]


def measure(size: int, calls: int) -> str:
    """One table row: a journal of `size` described photos, and one of `size` queued ones."""
    from autocaption.catalog import Catalog
    from autocaption.journal import Journal

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        done, queue = Journal(folder / "state-done"), Journal(folder / "state-queued")
        fill(done, folder, size, 0)
        fill(queue, folder, 0, size)
        now = time.time()
        stats_old = median_ms(lambda: done.rows(OLD_COUNTS), calls)
        stats_new = median_ms(done.stats, calls)  # the whole call: counts, rate, failures list
        due_old = median_ms(lambda: queue.rows(OLD_DUE, (now,)), calls)
        due_new = median_ms(lambda: queue.due(12, now), calls)
        errors_old = median_ms(lambda: done.rows(OLD_ERRORS), calls)
        catalog = Catalog(done)

        def old_search() -> None:
            for row in done.rows(OLD_SEARCH, ['"the"*']):
                catalog.get(row[0])

        def old_rows() -> None:  # the page's rows, as before (and now): the newest 100 of the matches
            catalog.page(query="the", per_page=100)

        search_old = median_ms(old_search, max(calls // 5, 3))
        search_new = median_ms(lambda: catalog.search("the"), max(calls // 5, 3))
        page_old = median_ms(lambda: (done.rows(OLD_PAGE_COUNT, ['"the"*']), old_rows()), max(calls // 5, 3))
        page_new = median_ms(lambda: catalog.page(query="the", per_page=100), max(calls // 5, 3))
        done.close()
        queue.close()
    return (f"| {size:,} | {stats_old + errors_old:.2f} / {stats_new:.3f} | {(stats_old + errors_old) * 0.2:.2f} % / "
            f"{stats_new * 0.2:.3f} % | {due_old:.2f} / {due_new:.3f} | {search_old:.1f} / {search_new:.1f} | "
            f"{page_old:.1f} / {page_new:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| photos | status line (counts + failures list) old / new ms | idle CPU at 2 calls/s old / new "
          "| queue (due 12, all queued) old / new ms | search a word every photo has, 50 hits, old / new ms "
          "| a page of that word's photos old / new ms |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        print(measure(size, args.calls))


if __name__ == "__main__":
    main()
