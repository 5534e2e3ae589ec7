"""Throughput of `autocaption process` against the naive LLaVA-NeXT loop, as whole processes.

Builds locally a random-weight LLaVA-NeXT with the real llava-v1.6 vision geometry (CLIP 336 px,
patch 14, the five pinpoints: a 4:3 photo makes ~2,300 image tokens) and a small language model,
then alternates, on the same 20 corpus photos with the same rules and max_new_tokens 48:
  (a) the naive loop of the tutorials: open the photo at full size, and for every rule run the
      processor and `generate` on one prompt;
  (b) `autocaption process --force` (batched, one prefill per image, drafted JPEG decoding, prefetch).
Both decode exactly max_new_tokens (the model has no reachable end-of-sequence), start-up included.
Also: autocaption with 1 rule against 4 rules. Usage: python bench/throughput.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared/corpus/jpg"
RULES = [
    "Describe this photo in one sentence.",
    "List keywords for this photo, comma separated.",
    "What is the main colour?",
    "Is there a person in this photo?",
]
MAX_NEW_TOKENS = 48

NAIVE = r"""
import sys, time
from pathlib import Path
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
model_dir, rules, photos = sys.argv[1], sys.argv[2].split("|"), sys.argv[5:]
processor = AutoProcessor.from_pretrained(model_dir)
model = LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval()
for photo in photos:
    image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    for rule in rules:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rule}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=int(sys.argv[4]), do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
"""


def photos() -> list[Path]:
    large = sorted((CORPUS / "large").glob("*.jpg"))
    small = sorted((CORPUS / "gps").glob("*.jpg")) + sorted((CORPUS / "exif-org").glob("*.jpg"))
    return large + small[: 20 - len(large)]


def build_model(directory: Path) -> Path:
    from tests.tinymodel import build_geometry

    build_geometry(directory)
    config = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    config["eos_token_id"] = None  # fixed answer length: both sides decode exactly max_new_tokens
    (directory / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS of the child (MB) and its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return seconds, peak, result.stderr


def config_file(base: Path, model: Path, rules: list[str], name: str) -> Path:
    lines = [f"model: {{id: {str(model)!r}, batch_size: 12}}", f"state: {{dir: {str(base / 'state')!r}}}",
             "output: {embed: false, xmp_sidecar: never}", "rules:"]  # fmt: skip
    lines += [f"  - {{name: r{i}, prompt: {rule!r}, max_new_tokens: {MAX_NEW_TOKENS}}}" for i, rule in enumerate(rules)]
    path = base / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = build_model(base / "model")
        work = base / "photos"
        work.mkdir()
        for photo in photos():
            shutil.copy(photo, work / photo.name)
        files = sorted(str(p) for p in work.glob("*.jpg"))
        three = config_file(base, model, RULES[:3], "three.yaml")
        one = config_file(base, model, RULES[:1], "one.yaml")
        four = config_file(base, model, RULES, "four.yaml")
        ours = [sys.executable, "-m", "autocaption", "-v", "process", "--force", "--config"]
        results: dict[str, list[float]] = {"naive": [], "autocaption": [], "1 rule": [], "4 rules": []}
        peaks: dict[str, float] = {}
        stages = ""
        for _ in range(args.rounds):  # alternate, so both sides see the same machine state
            seconds, peak, _ = timed(
                [sys.executable, "-c", NAIVE, str(model), "|".join(RULES[:3]), "-", str(MAX_NEW_TOKENS), *files], env
            )
            results["naive"].append(seconds)
            peaks["naive"] = peak
            seconds, peak, log = timed([*ours, str(three), str(work)], env)
            results["autocaption"].append(seconds)
            peaks["autocaption"] = peak
            stages = next((line for line in log.splitlines() if "stages:" in line), "")
            results["1 rule"].append(timed([*ours, str(one), str(work)], env)[0])
            results["4 rules"].append(timed([*ours, str(four), str(work)], env)[0])
    best = {name: min(values) for name, values in results.items()}
    n = len(files)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{n} photos (3 large), 3 rules, max_new_tokens {MAX_NEW_TOKENS}; best of {args.rounds} whole-process runs")
    print(
        f"(a) naive loop:   {best['naive']:7.1f} s  {n / best['naive']:.3f} images/s  peak RSS {peaks['naive']:.0f} MB"
    )
    print(f"(b) autocaption:  {best['autocaption']:7.1f} s  {n / best['autocaption']:.3f} images/s  "
          f"peak RSS {peaks['autocaption']:.0f} MB")  # fmt: skip
    print(f"speed-up (b)/(a): {best['naive'] / best['autocaption']:.2f}x")
    print(f"autocaption {re.sub(r'^.*stages: ', 'stages: ', stages)}")
    print(f"1 rule {best['1 rule']:.1f} s, 4 rules {best['4 rules']:.1f} s: 4 rules cost "
          f"{best['4 rules'] / best['1 rule']:.2f}x of 1 rule")  # fmt: skip


if __name__ == "__main__":
    main()
