"""The remote engine (through `transformers serve` on loopback) against the in-process engine, on the
same tiny local model, images and prompts, in the same run. Usage: python bench/remote.py [--photos 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autocaption.config import ModelConfig  # noqa: E402
from autocaption.engine import Job, Prompt, load_engine  # noqa: E402
from autocaption.images import open_picture  # noqa: E402
from tests.test_remote import Server  # noqa: E402
from tests.tinymodel import build_tiny  # noqa: E402

PROMPTS = (Prompt("Describe this photo.", 24), Prompt("Keywords, comma separated.", 16))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=20)
    args = parser.parse_args()
    import tempfile

    corpus = ROOT.parent / "shared/corpus/jpg"
    files = sorted((corpus / "gps").glob("*.jpg")) + sorted((corpus / "exif-org").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model")
        server = Server(model, Path(tmp) / "serve.log")
        server.start()
        try:
            local = load_engine(ModelConfig(id=str(model), batch_size=8))
            remote = load_engine(ModelConfig(engine="openai", base_url=server.base_url, id=str(model),
                                             max_image_side=64))  # fmt: skip
            jobs = [Job(open_picture(f, max_pixels=10**9, draft_side=64).image, PROMPTS) for f in files[: args.photos]]
            results = {}
            for name, engine in (("in-process", local), ("remote", remote), ("in-process", local), ("remote", remote)):
                started = time.perf_counter()
                engine.describe(jobs)
                results[name] = min(results.get(name, 1e9), time.perf_counter() - started)
            same = [[a.text for a in per] for per in local.describe(jobs)] == [
                [a.text for a in per] for per in remote.describe(jobs)
            ]
            remote.close()
        finally:
            server.kill()
    n = len(jobs)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; tiny model, {n} photos x 2 prompts")
    for name, seconds in results.items():
        print(f"{name:10s} {seconds:6.2f} s  {n / seconds:6.1f} images/s")
    print(f"remote / in-process time: {results['remote'] / results['in-process']:.2f}x; identical answers: {same}")


if __name__ == "__main__":
    main()
