"""The review page on a journal of 100,000 photos: the first page, a page of 100 through the API with its
100 thumbnails, and searches, warm (each measured as the median of several calls after a first one);
and thumbnail generation per photo, cold, for a small and a large camera JPEG.

The journal is filled directly (100,000 rows with two answers each, from a small vocabulary so searches
match thousands of rows); the newest 100 rows point at real corpus photos so their thumbnails exist.
Requests go through Flask's test client: the routes, queries, templates and thumbnail cache, without the
network. Targets: each page and search under 0.5 s on 2 cores.

Usage: python bench/web.py [--images 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared/corpus/jpg"
WORDS = [
    "fox", "snow", "beach", "sunset", "mountain", "lake", "city", "street", "portrait", "dog", "cat", "garden",
    "family", "birthday", "car", "boat", "forest", "river", "bridge", "church", "market", "night", "rain",
    "flowers", "children", "wedding",
]  # fmt: skip
TOKEN = "bench-token-0123456789"


def median_seconds(call: Callable[[], object], repeat: int = 7) -> float:
    call()  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fill(journal: object, count: int, photos: list[Path]) -> None:
    db = journal._db  # type: ignore[attr-defined]  # a benchmark may fill the tables directly
    rng = random.Random(0)
    now = time.time()
    db.execute("BEGIN")
    rows = []
    for index in range(count):
        real = index - (count - len(photos))  # the newest rows are real photos
        path = str(photos[real]) if real >= 0 else f"/photos/{index // 1000:03d}/IMG_{index:06d}.jpg"
        rows.append((path, 1000 + index, int(now * 1e9), "done", now - (count - index)))
    db.executemany("INSERT INTO images (path, size, mtime_ns, status, updated_at) VALUES (?, ?, ?, ?, ?)", rows)
    answers = []
    for image_id in range(1, count + 1):
        answers.append((image_id, "caption", " ".join(rng.choices(WORDS, k=12)).capitalize() + "."))
        answers.append((image_id, "keywords", ", ".join(rng.sample(WORDS, 5))))
    db.executemany("INSERT INTO answers VALUES (?, ?, ?)", answers)
    db.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()

    from autocaption.config import parse
    from autocaption.journal import Journal
    from autocaption.review import THUMBNAIL, Review
    from autocaption.web.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sources = sorted((CORPUS / "gps").glob("*.jpg")) + sorted((CORPUS / "exif-org").glob("*.jpg"))
        folder = base / "photos"
        folder.mkdir()
        photos = []
        for index in range(100):
            target = folder / f"photo_{index:03d}.jpg"
            shutil.copyfile(sources[index % len(sources)], target)
            photos.append(target)
        config = parse(f"state: {{dir: {str(base / 'state')!r}}}\nrules: [{{name: caption, prompt: x}}]\n",
                       base / "rules.yaml")  # fmt: skip
        journal = Journal(config.state.dir)
        started = time.perf_counter()
        fill(journal, args.images, photos)
        filled = time.perf_counter() - started
        client = create_app(config, Review(config, journal), TOKEN).test_client()
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def get(url: str) -> bytes:
            response = client.get(url, headers=headers)
            assert response.status_code == 200, (url, response.status_code)
            return bytes(response.data)

        first_page = median_seconds(lambda: get("/"))
        api_page = median_seconds(lambda: get("/api/images?per_page=100"))
        ids = [image["id"] for image in client.get("/api/images?per_page=100", headers=headers).json["images"]]
        started = time.perf_counter()
        for image_id in ids:
            get(f"/thumbnails/{image_id}.jpg")  # cold: made and cached
        thumbnails_cold = time.perf_counter() - started
        thumbnails_warm = median_seconds(lambda: [get(f"/thumbnails/{i}.jpg") for i in ids], repeat=3)
        search_page = median_seconds(lambda: get("/?q=fox+beach"))
        search_api = median_seconds(lambda: get("/api/images?q=sunset&per_page=100"))
        total = client.get("/api/images?q=fox+beach", headers=headers).json["total"]
        from autocaption.catalog import Catalog

        catalog = Catalog(journal)
        search_cli = median_seconds(lambda: catalog.search("wedding children", limit=50))
        review = Review(config, journal)
        cold = {}
        for name, source in (("small", CORPUS / "gps/DSCN0010.jpg"), ("large", CORPUS / "large/jolla.jpg")):
            target = folder / f"cold_{name}.jpg"
            shutil.copyfile(source, target)
            journal.done(target, target.stat(), None, "fp", texts={"caption": "x"})
            image_id = journal.rows("SELECT rowid FROM images WHERE path = ?", [str(target)])[0][0]
            started = time.perf_counter()
            review.preview(image_id, THUMBNAIL)
            cold[name] = (time.perf_counter() - started, source)
        journal.close()

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"journal: {args.images:,} photos, 2 answers each (filled in {filled:.1f} s)")
    print(f"first page (HTML, 60 cards):            {first_page * 1000:7.1f} ms")
    print(f"API page of 100:                        {api_page * 1000:7.1f} ms")
    print(f"100 thumbnails, warm (cached):          {thumbnails_warm * 1000:7.1f} ms  "
          f"(cold, made: {thumbnails_cold:.2f} s)")  # fmt: skip
    print(f"search page 'fox beach' ({total:,} hits): {search_page * 1000:7.1f} ms")
    print(f"API search 'sunset', page of 100:       {search_api * 1000:7.1f} ms")
    print(f"search 'wedding children' (CLI's query): {search_cli * 1000:7.1f} ms")
    for name, (seconds, source) in cold.items():
        print(f"thumbnail of {source.name} ({name}), cold:  {seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
