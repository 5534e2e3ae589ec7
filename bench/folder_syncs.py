"""What batching the folder fsyncs saves on the write path (issue 24.5).

Each photo gets what the pipeline writes for it: the caption into the photo (lossless writer, atomic replace),
an XMP sidecar and a JSON sidecar, three atomic writes, each file fsynced before its rename. The baseline
fsyncs the folder after every write (as before); the batched run fsyncs each folder once per batch of
`--batch` photos (as the pipeline now does). Both run in the same process on the same disk, alternating, on
copies of ../shared/corpus/jpg/gps/DSCN0012.jpg. Usage: python bench/folder_syncs.py [--photos N] [--batch B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from autocaption import atomic
from autocaption.config import OutputConfig
from autocaption.writers.metadata import Caption, MetadataWriter

PHOTO = Path(__file__).resolve().parents[2] / "shared/corpus/jpg/gps/DSCN0012.jpg"


@contextlib.contextmanager
def no_batch() -> Iterator[None]:
    yield


def write_all(folder: Path, batch: int, batched: bool) -> float:
    writer = MetadataWriter(OutputConfig(existing="overwrite", xmp_sidecar="always"))
    photos = sorted(folder.glob("*.jpg"))
    started = time.perf_counter()
    for first in range(0, len(photos), batch):
        with atomic.batched_folder_syncs() if batched else no_batch():
            for photo in photos[first : first + batch]:
                writer.write(photo, folder, Caption(f"A caption for {photo.name}.", ("bench", "fsync")))
                atomic.write_atomic(photo.with_name(photo.name + ".json"), json.dumps({"photo": photo.name}).encode())
    return time.perf_counter() - started


def fresh(root: Path, photos: int) -> Path:
    folder = Path(tempfile.mkdtemp(dir=root))
    for index in range(photos):
        shutil.copyfile(PHOTO, folder / f"p{index:04d}.jpg")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=Path(__file__).resolve().parent, help="a folder on the disk to measure"
    )
    args = parser.parse_args()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-") as root:
        for _ in range(args.rounds):
            for batched in (False, True):
                folder = fresh(Path(root), args.photos)
                seconds[batched].append(write_all(folder, args.batch, batched))
                shutil.rmtree(folder)
    per_write, batched = (statistics.median(seconds[mode]) for mode in (False, True))
    print(f"machine: {platform.node()} {platform.machine()}, python {platform.python_version()}, disk of {args.dir}")
    print(f"{args.photos} photos, 3 atomic writes each, batches of {args.batch}, median of {args.rounds} rounds")
    print(f"folder fsync per write : {per_write:.3f} s  {args.photos / per_write:7.1f} photos/s")
    print(f"folder fsync per batch : {batched:.3f} s  {args.photos / batched:7.1f} photos/s")
    print(f"ratio (per write / per batch): {per_write / batched:.2f}x")


if __name__ == "__main__":
    main()
