"""Seconds per answer of each tiny family model (tests/families.py), in-process after a warm-up batch: the
engine's own cost per family on the CPU, start-up and imports excluded. Tiny models (32 px images, 2
layers), so this compares the paths and the per-family overhead, not what a real checkpoint costs.

Usage: python bench/families.py [--photos 8] [--rounds 3]
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
CORPUS = ROOT.parent / "shared/corpus/jpg"
PROMPTS = ("Describe this photo in one sentence.", "Keywords for this photo, comma separated.", "Which decade?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from autocaption.config import ModelConfig
    from autocaption.engine import Job, Prompt, load_engine
    from autocaption.engine.families import FAMILIES as KNOWN
    from autocaption.engine.families import missing_packages
    from autocaption.images import open_picture
    from tests.families import FAMILIES, build

    sources = (sorted((CORPUS / "gps").glob("*.jpg")) + sorted((CORPUS / "camera").glob("*.jpg")))[: args.photos]
    prompts = tuple(Prompt(text, 24) for text in PROMPTS)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip
    print(f"{len(sources)} photos x {len(prompts)} rules, up to 24 tokens each; median of {args.rounds} batches")
    with tempfile.TemporaryDirectory() as tmp:
        for name in FAMILIES:
            if missing_packages(KNOWN[name]):
                print(f"  {name:16} skipped: needs {', '.join(missing_packages(KNOWN[name]))}")
                continue
            folder = build(name, Path(tmp) / name)
            engine = load_engine(ModelConfig(id=str(folder), batch_size=len(sources) * len(prompts)))
            side = engine.info.max_image_side
            jobs = [Job(open_picture(path, max_pixels=10**9, draft_side=side).image, prompts) for path in sources]
            engine.describe(jobs)  # warm-up
            times = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                answers = engine.describe(jobs)
                times.append(time.perf_counter() - started)
            count = sum(len(per_image) for per_image in answers)
            tokens = sum(answer.new_tokens for per_image in answers for answer in per_image)
            path = "tree" if getattr(engine, "share_prefix", False) else "batched"
            per_answer = statistics.median(times) / count
            print(f"  {name:16} {path:8} {per_answer * 1000:6.1f} ms per answer ({tokens} tokens in {count} answers)")
            engine.close()


if __name__ == "__main__":
    main()
