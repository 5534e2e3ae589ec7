"""The daemon's and `process`'s costs at archive scale, through the real pipeline (issue 24.6).

Builds N small real JPEGs (folders of 1,000) and describes them with `autocaption process` and an instant
engine (every answer at once, so what is measured is everything but the model: walk, triage, decode, write
into the photo, JSON sidecar, journal). Then, on that tree and its journal:
- start-up reconcile (what the daemon does before it is ready) against a bare walk + stat, same tree;
- idle CPU of the real daemon (`Service`, real watchdog observer, the instant engine) over `--idle` seconds;
- journal rebuild from the sidecars (journal deleted first), checking every photo comes back described;
- search and pages of a word every photo's answer holds, and of a rare one.

Usage: python bench/scale.py [--sizes 10000,100000] [--idle 10]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autocaption import service as service_module  # noqa: E402
from autocaption.catalog import Catalog  # noqa: E402
from autocaption.config import Config, ModelConfig, parse  # noqa: E402
from autocaption.engine.base import Answer, EngineInfo, Job  # noqa: E402
from autocaption.journal import JOURNAL_NAME, Journal  # noqa: E402
from autocaption.process import process  # noqa: E402
from autocaption.rebuild import rebuild  # noqa: E402
from autocaption.service import Service, reconcile  # noqa: E402

SETTLE_SECONDS = 3.0
WORDS = ("harbour", "barn", "beach", "forest", "kitchen", "street", "garden", "mountain")


class InstantEngine:
    """Answers every prompt at once; a word per photo from WORDS, and "photo" in every answer."""

    def __init__(self, model: ModelConfig) -> None:
        self.info = EngineInfo(backend="instant", model_id=model.id, device="cpu", dtype="none", batch_images=16)
        self.timings: dict[str, float] = {}
        self.answered = 0

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        answers = []
        for job in jobs:
            self.answered += 1
            word = WORDS[self.answered % len(WORDS)]
            answers.append([Answer(f"A photo of a {word} number {self.answered}.", 10, 8, 0.0) for _ in job.prompts])
        return answers

    def close(self) -> None:
        pass


def build(root: Path, count: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "JPEG", quality=80)
    data = buffer.getvalue()
    for index in range(count):
        folder = root / f"{index // 1000:04d}"
        if index % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"IMG_{index:07d}.jpg").write_bytes(data)


def median_ms(call: Callable[[], object], calls: int = 7) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def walk_floor(root: Path) -> float:
    started = time.perf_counter()
    for folder, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(folder, name))
    return time.perf_counter() - started


def idle_cpu(config_path: Path, config: Config, seconds: float) -> tuple[float, float]:
    """(seconds from start to ready and reconciled, % of a core while idle): the real daemon on the tree."""
    service = Service(config_path, config, engine_factory=InstantEngine)
    reconciled = threading.Event()
    real = service_module.reconcile

    def observed(config: Config, journal: Journal) -> int:  # the daemon's own start-up reconcile, timed
        queued = real(config, journal)
        reconciled.set()
        return queued

    service_module.reconcile = observed  # type: ignore[assignment]
    result: dict[str, float] = {}
    started = time.perf_counter()

    def measure() -> None:
        reconciled.wait()
        result["ready"] = time.perf_counter() - started
        time.sleep(SETTLE_SECONDS)  # idle: after the start-up's last writes (the journal's checkpoint)
        cpu = time.process_time()
        time.sleep(seconds)
        result["idle"] = (time.process_time() - cpu) / seconds * 100
        service.stop.set()

    watcher = threading.Thread(target=measure, daemon=True)
    watcher.start()
    try:
        service.run()
    finally:
        service_module.reconcile = real  # type: ignore[assignment]
    watcher.join()
    return result["ready"], result["idle"]


def measure(size: int, idle: float) -> str:
    with tempfile.TemporaryDirectory(dir=ROOT / "bench", prefix=".scale-") as tmp:
        root, state = Path(tmp) / "photos", Path(tmp) / "state"
        build(root, size)
        text = (f"watch: [{{path: {str(root)!r}}}]\nstate: {{dir: {str(state)!r}}}\nmodel: {{id: instant}}\n"
                "rules: [{name: caption, prompt: Describe., write: [description]}]\n")  # fmt: skip
        config_path = Path(tmp) / "rules.yaml"
        config_path.write_text(text, encoding="utf-8")
        config = parse(text, config_path)

        summary = process(config, [root], engine_factory=InstantEngine)
        assert summary.images == size and not summary.failures, (summary.images, summary.failures[:3])
        rate = size / summary.seconds

        floor = walk_floor(root)
        journal = Journal(config.state.dir)
        started = time.perf_counter()
        queued = reconcile(config, journal)
        startup = time.perf_counter() - started
        journal.close()
        assert queued == 0, queued
        ready, cpu = idle_cpu(config_path, config, idle)
        hourly = cpu + startup / (config.daemon.reconcile_minutes * 60) * 100  # its periodic rescan, spread out

        for suffix in ("", "-wal", "-shm"):
            (state / (JOURNAL_NAME + suffix)).unlink(missing_ok=True)
        started = time.perf_counter()
        rebuilt = rebuild(config)
        rebuild_s = time.perf_counter() - started
        assert rebuilt.done == size and rebuilt.queued == 0, rebuilt

        journal = Journal(config.state.dir)
        catalog = Catalog(journal)
        common = median_ms(lambda: catalog.search("photo"))
        rare = median_ms(lambda: catalog.search(f"{size // 2}"))
        page = median_ms(lambda: catalog.page(per_page=100))
        page_common = median_ms(lambda: catalog.page(query="photo", per_page=100))
        journal.close()
    return (f"| {size:,} | {rate:.0f} | {startup:.2f} ({floor:.2f}) | {ready:.2f} | {cpu:.2f} % ({hourly:.2f} %) | "
            f"{rebuild_s:.1f} | {common:.1f} / {rare:.1f} | {page:.1f} / {page_common:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| photos | `process` photos/s (instant engine) | start-up reconcile s (walk+stat floor) "
          "| daemon start to idle s | daemon idle CPU, % of a core (with its hourly rescan) | rebuild s "
          "| search common / rare ms | page newest / of the common word ms |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        print(measure(size, args.idle), flush=True)


if __name__ == "__main__":
    main()
