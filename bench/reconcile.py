"""Time and peak memory to reconcile a tree of already-journaled files at daemon start.

Builds N empty `*.jpg` files in 100 folders, records each as done in a fresh journal (bulk insert),
then times `autocaption.service.reconcile` against the floor of a bare `os.walk` + `stat` of the
same tree, in the same run. Usage: python bench/reconcile.py [--files 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import tempfile
import time
import tracemalloc
from pathlib import Path

from autocaption.config import parse
from autocaption.journal import DONE, Journal
from autocaption.service import reconcile


def build(root: Path, files: int) -> list[Path]:
    paths = []
    for i in range(files):
        folder = root / f"{i % 100:02d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"IMG_{i:06d}.jpg"
        path.touch()
        paths.append(path)
    return paths


def journal_all(state: Path, config_fingerprint: str, paths: list[Path]) -> None:
    Journal(state).close()  # schema
    db = sqlite3.connect(state / "journal.sqlite3")
    now = time.time()
    rows = []
    for path in paths:
        st = path.stat()
        rows.append((str(path), st.st_size, st.st_mtime_ns, None, config_fingerprint, DONE, 0, None, 0, None, now))
    db.executemany("INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        started = time.perf_counter()
        paths = build(root, args.files)
        config = parse(f"watch: [{{path: {str(root)!r}}}]\nstate: {{dir: state}}\nrules: [{{name: a, prompt: b}}]",
                       Path(tmp) / "rules.yaml")  # fmt: skip
        journal_all(config.state.dir, config.fingerprint(config.rules), paths)
        print(f"built {args.files} files and journal in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        count = 0
        for folder, _, files in os.walk(root):
            for name in files:
                os.stat(os.path.join(folder, name))
                count += 1
        floor = time.perf_counter() - started

        journal = Journal(config.state.dir)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats

            with cProfile.Profile() as profiler:
                queued = reconcile(config, journal)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
        else:
            queued = reconcile(config, journal)
        seconds = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()  # a second, untimed pass: tracemalloc slows allocation-heavy code a lot
        reconcile(config, journal)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        journal.close()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"walk+stat floor: {floor:.2f} s for {count} files")
    print(f"reconcile:       {seconds:.2f} s ({seconds / floor:.1f}x floor), queued {queued} (expected 0)")
    print(f"peak Python allocations during reconcile: {peak / 1e6:.1f} MB; "
          f"process max RSS {rss_after / 1024:.0f} MB (before: {rss_before / 1024:.0f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
