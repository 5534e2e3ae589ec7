"""KV cache a decode step reads against what its tokens hold: the tree decoder's buckets (images per batch,
rounded slots) now against the buckets before issue 18 (1, 2, 4, 8, 16, 32 images; slots rounded to 512),
in the same run, on the same photos.

A step of a captured (bucketed) batch reads its bucket's whole static cache: padding rows, rounded slots,
and slots kept from the largest batch the bucket ever held (they only grow). Bytes, not time: what the
memory floor of a step is made of, so a CPU can measure it. The photos' token counts are real: the
llava-v1.6 processor geometry (CLIP 336 px, patch 14, five pinpoints) on the corpus photos' real sizes,
their rules rendered with the real chat template. Bytes per slot are llava-v1.6-mistral-7b's in bf16
(32 layers x 8 KV heads x 128 x 2 x 2 = 131,072); weights 15.1 GB.

Usage: python bench/padding.py [--photos 20] [--rules 3] [--new-tokens 48] [--photos-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BYTES_PER_SLOT = 131072
WEIGHTS = 15.1e9
BEFORE = ((1, 2, 4, 8, 16, 32), 512)  # images per batch, slot rounding, as they were
RULES = ["Describe this photo in one sentence.", "List keywords for this photo, comma separated.",
         "What is the main colour?", "Is there a person in this photo?"]  # fmt: skip


@dataclass(frozen=True)
class Photo:
    prefix: int  # tokens through the image's last token
    branches: tuple[int, ...]  # each rule's tokens after the prefix


def measured_photos(count: int, rules: int, folder: Path | None) -> list[Photo]:
    from autocaption.config import ModelConfig
    from autocaption.engine import Job, Prompt, load_engine
    from autocaption.images import open_picture
    from bench.throughput import photos
    from tests.tinymodel import build_geometry

    with tempfile.TemporaryDirectory() as tmp:
        engine = load_engine(ModelConfig(id=str(build_geometry(Path(tmp) / "model"))))
        prompts = tuple(Prompt(text, 48) for text in RULES[:rules])
        found = []
        for path in photos(count, folder):
            picture = open_picture(path, max_pixels=10**9, draft_side=1008)
            (unit,) = engine._units([Job(picture.image, prompts)])  # type: ignore[attr-defined]
            inputs = unit.prepared()
            found.append(Photo(len(inputs.prefix), tuple(len(branch) for branch in inputs.branches)))
        engine.close()
    return found


class Buckets:
    """The decoder's bucketing of one configuration, with its states' slots kept across batches."""

    def __init__(self, images: tuple[int, ...], rounding: int) -> None:
        self.images, self.rounding = images, rounding
        self.slots: dict[tuple[int, int], int] = {}

    def read(self, batch: list[Photo], new_tokens: int) -> tuple[int, int]:
        """(slots a step reads, slots the batch's tokens hold on average over its steps)."""
        width = max(len(photo.branches) for photo in batch)
        needed = max(p.prefix for p in batch) + max(sum(p.branches) for p in batch) + width * (new_tokens - 1)
        rows = next((bucket for bucket in self.images if bucket >= len(batch)), -(-len(batch) // 32) * 32)
        slots = max(-(-needed // self.rounding) * self.rounding, self.slots.get((rows, width), 0))
        self.slots[(rows, width)] = slots
        steps = new_tokens - 1
        held = sum(p.prefix + sum(p.branches) + len(p.branches) * (steps + 1) / 2 for p in batch)
        return rows * slots, int(held)


def scenario(name: str, batches: list[list[Photo]], new_tokens: int) -> None:
    from autocaption.engine.tree import IMAGE_BUCKETS, SLOT_BUCKET

    results = []
    for images, rounding in (BEFORE, (IMAGE_BUCKETS, SLOT_BUCKET)):
        buckets = Buckets(images, rounding)
        read = held = 0
        worst = 0.0
        for batch in batches:
            r, h = buckets.read(batch, new_tokens)
            read, held, worst = read + r, held + h, max(worst, r / h)
        results.append((read / held, worst, (WEIGHTS + read / len(batches) * BYTES_PER_SLOT)
                        / (WEIGHTS + held / len(batches) * BYTES_PER_SLOT)))  # fmt: skip
    (before, before_worst, before_step), (now, now_worst, now_step) = results
    print(f"{name}: KV read / held {before:.2f}x -> {now:.2f}x (worst batch {before_worst:.2f}x -> {now_worst:.2f}x); "
          f"a step's bytes (weights + KV) over its floor {before_step:.3f}x -> {now_step:.3f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--rules", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--photos-dir", type=Path)
    args = parser.parse_args()
    photos = measured_photos(args.photos, args.rules, args.photos_dir)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    prefixes = sorted(photo.prefix for photo in photos)
    print(f"{len(photos)} photos, {args.rules} rules, {args.new_tokens} new tokens; prefixes "
          f"{prefixes[0]}..{prefixes[-1]} tokens; before: images {BEFORE[0]}, slots by {BEFORE[1]}")  # fmt: skip
    scenario(f"process, one batch of {len(photos)}", [photos], args.new_tokens)
    for size in (5, 12, 17, 25):
        scenario(f"batches of {size:2} (fresh states)", [photos[:size]], args.new_tokens)
    every = [[photos[i % len(photos)] for i in range(n)] for n in range(1, 33)]
    scenario("every batch size 1..32, in that order (states kept)", every, args.new_tokens)
    rng = random.Random(18)
    daemon = [[rng.choice(photos) for _ in range(rng.randint(1, 8))] for _ in range(200)]
    scenario("daemon: 200 batches of 1..8 arriving photos", daemon, args.new_tokens)


if __name__ == "__main__":
    main()
