"""Time to write one caption into a 3264x2448 camera JPEG (../shared/corpus/jpg/large/jolla.jpg).

Compares autocaption's lossless writer (EXIF IFD0 append + XMP segment, atomic replace with fsync)
against the naive piexif recipe (load -> set ImageDescription -> dump -> insert) written the same
atomic way, in the same run. Usage: python bench/write_caption.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import piexif

from autocaption.atomic import replace_faithfully
from autocaption.config import OutputConfig
from autocaption.writers.metadata import Caption, MetadataWriter

PHOTO = Path(__file__).resolve().parents[2] / "shared/corpus/jpg/large/jolla.jpg"


def naive(path: Path, text: str) -> None:
    exif = piexif.load(str(path))
    exif["0th"][piexif.ImageIFD.ImageDescription] = text.encode("utf-8")
    out = io.BytesIO()
    piexif.insert(piexif.dump(exif), path.read_bytes(), out)
    replace_faithfully(path, out.getvalue())


def ours(path: Path, text: str) -> None:
    MetadataWriter(OutputConfig(existing="overwrite")).write(path, path.parent, Caption(text, ("a", "b")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PHOTO.name
        shutil.copy(PHOTO, path)
        path.chmod(0o644)
        times: dict[str, list[float]] = {"naive piexif": [], "autocaption": []}
        for i in range(args.repeat):  # alternate so both see the same disk and cache state
            for name, write in (("naive piexif", naive), ("autocaption", ours)):
                start = time.perf_counter()
                write(path, f"A caption, take {i}: Café – 東京の夜")
                times[name].append(time.perf_counter() - start)
    print(f"machine: {platform.node()} {platform.machine()} Python {platform.python_version()}")
    print(f"file: {PHOTO.name} ({PHOTO.stat().st_size / 1e6:.2f} MB), {args.repeat} writes each")
    base = statistics.median(times["naive piexif"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:14s} median {median * 1000:7.2f} ms  ({median / base:.2f}x naive)")


if __name__ == "__main__":
    main()
