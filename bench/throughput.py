"""Throughput of `autocaption process` against the naive LLaVA-NeXT loop, as whole processes.

Builds locally a random-weight LLaVA-NeXT with the real llava-v1.6 vision geometry (CLIP 336 px,
patch 14, the five pinpoints: a 4:3 photo makes ~2,300 image tokens) and a small language model,
then alternates, on the same 20 corpus photos with the same rules and max_new_tokens 48:
  (a) the naive loop of the tutorials: open the photo at full size, and for every rule run the
      processor and `generate` on one prompt;
  (b) `autocaption process --force` (batched, one prefill per image, drafted JPEG decoding, prefetch).
Both decode exactly max_new_tokens (the model has no reachable end-of-sequence: the same effect as
min_new_tokens = max_new_tokens), start-up included. Also: autocaption with 1 rule against 4 rules.

On a GPU, `--device cuda --shape mistral-7b` builds the true llava-v1.6-mistral-7b shapes with random
weights in bf16 (15 GB written to a temp folder; nothing downloaded) and reports decode tokens/s
against the HBM limit (weight bytes / bandwidth per step) and peak GPU memory.

`--family NAME` takes one of the tiny models of tests/families.py instead (llava, llava_onevision, qwen2_vl,
qwen2_5_vl, qwen3_vl, gemma3, idefics3, smolvlm, llava_next), and also times autocaption with the tree path
switched off (`share_prefix: false`), so the tree and the batched paths can be compared on the CPU.

The steady-state lines are a bucket's later batches only (no compile, no graph capture in them):
milliseconds per decode step against three memory floors (bytes a step reads over the bandwidth): the
weights alone; the weights and the KV cache the batch's tokens hold (what a step must read); the weights and
the bucket's whole padded state (what the step does read: padding rows and rounded slots included).

Every setting of the config's `model:` section can be set: `--model graphs=false --model max_batch_tokens=65536`
(values in YAML; the same keys, checked by the same parser, as rules.yaml).

Usage: python bench/throughput.py [--rounds 2] [--family NAME] [--batch-size 12|auto] [--photos-dir DIR]
           [--device cuda --shape mistral-7b [--hbm-tbps 3.35]] [--compile] [--no-rule-counts]
           [--model KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
from transformers import AutoModelForImageTextToText, AutoProcessor
model_dir, rules, device = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
new_tokens, nested, photos = int(sys.argv[4]), sys.argv[5] == "nested", sys.argv[6:]
dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
processor = AutoProcessor.from_pretrained(model_dir)
model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
for photo in photos:
    image = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    for rule in rules:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rule}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        bos = processor.tokenizer.bos_token
        inputs = processor(images=[[image]] if nested else image, text=prompt, return_tensors="pt",
                           add_special_tokens=not (bos and prompt.startswith(bos))).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
if device.startswith("cuda"):
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", file=sys.stderr)
"""


def photos(count: int, folder: Path | None) -> list[Path]:
    """The corpus's large photos first, then small ones; or the JPEGs of `folder` (on a GPU machine the
    corpus may not be beside the checkout: copy some photos there and pass --photos-dir)."""
    if folder is not None:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if len(found) < count:
            raise SystemExit(f"--photos-dir {folder}: {len(found)} JPEGs, {count} wanted")
        return found[:count]
    large = sorted((CORPUS / "large").glob("*.jpg"))
    small = sorted((CORPUS / "gps").glob("*.jpg")) + sorted((CORPUS / "exif-org").glob("*.jpg"))
    return (large + small)[:count]


def build_model(directory: Path, args: argparse.Namespace) -> Path:
    from tests.families import build
    from tests.tinymodel import build_geometry, build_mistral_7b

    if args.family:
        build(args.family, directory)
    elif args.shape == "mistral-7b":
        build_mistral_7b(directory, device=args.device, text_layers=args.text_layers, vision_layers=args.vision_layers)
    else:
        build_geometry(directory)
    config = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    config["eos_token_id"] = None  # fixed answer length: both sides decode exactly max_new_tokens
    (directory / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS of this child alone (MB, from wait4) and its stderr."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN is the max of all)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        log = stderr.read()
    if child.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{log[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, log


def peak_gpu(log: str) -> str:
    return next((line.split("peak GPU memory ")[1] for line in log.splitlines() if "peak GPU memory" in line), "n/a")


def model_settings(model: Path, args: argparse.Namespace, *, share_prefix: bool) -> str:
    """The config's `model:` mapping, in YAML flow style: the bench's own flags, then every --model KEY=VALUE."""
    settings = {"id": repr(str(model)), "batch_size": args.batch_size, "device": args.device,
                "share_prefix": str(share_prefix).lower(), "compile": str(args.compile).lower()}  # fmt: skip
    for item in args.model:
        key, _, value = item.partition("=")
        settings[key.strip()] = value.strip()
    return "{" + ", ".join(f"{key}: {value}" for key, value in settings.items()) + "}"


def config_file(
    base: Path, model: Path, rules: list[str], name: str, args: argparse.Namespace, *, share_prefix: bool = True
) -> Path:
    lines = [
        f"model: {model_settings(model, args, share_prefix=share_prefix)}",
        f"state: {{dir: {str(base / 'state')!r}}}",
        "output: {embed: false, xmp_sidecar: never}",
        "rules:",
    ]
    lines += [
        f"  - {{name: r{i}, prompt: {rule!r}, max_new_tokens: {args.max_new_tokens}}}" for i, rule in enumerate(rules)
    ]
    path = base / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--shape", choices=["small-lm", "mistral-7b"], default="small-lm")
    parser.add_argument("--family", help="a tiny model of tests/families.py instead of --shape")
    parser.add_argument("--text-layers", type=int, default=32, help="mistral-7b only: fewer for a smoke test")
    parser.add_argument("--vision-layers", type=int, default=24, help="mistral-7b only")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--batch-size", default="12", help="prompts per batch, or auto")
    parser.add_argument("--photos-dir", type=Path, help="take the JPEGs of this folder instead of the corpus")
    parser.add_argument("--compile", action="store_true", help="model.compile: true (inductor)")
    parser.add_argument("--no-rule-counts", action="store_true", help="skip the 1-rule and 4-rule runs")
    parser.add_argument("--compare-paths", action="store_true", help="also time share_prefix: false (--family does)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="GPU memory bandwidth (H100 SXM 3.35)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="any model: setting of the config, e.g. graphs=false, max_batch_tokens=65536")  # fmt: skip
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = build_model(base / "model", args)
        weight_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        work = base / "photos"
        work.mkdir()
        for photo in photos(args.photos, args.photos_dir):
            shutil.copy(photo, work / photo.name)
        files = sorted(str(p) for p in work.glob("*.jpg"))
        three = config_file(base, model, RULES[:3], "three.yaml", args)
        check = subprocess.run([sys.executable, "-m", "autocaption", "check", "--config", str(three)],
                               capture_output=True, text=True, env=env)  # fmt: skip
        if check.returncode != 0:  # a misspelt --model key: the config's own error, before anything runs
            raise SystemExit(check.stdout + check.stderr)
        one = config_file(base, model, RULES[:1], "one.yaml", args)
        four = config_file(base, model, RULES, "four.yaml", args)
        batched = config_file(base, model, RULES[:3], "batched.yaml", args, share_prefix=False)
        ours = [sys.executable, "-m", "autocaption", "-v", "process", "--force", "--config"]
        results: dict[str, list[float]] = {"naive": [], "autocaption": [], "1 rule": [], "4 rules": []}
        compare = args.family or args.compare_paths
        if compare:
            results["batched path"] = []
        from autocaption.engine.families import FAMILIES

        nested = "nested" if args.family and FAMILIES[args.family].nested_images else "flat"
        peaks: dict[str, float] = {}
        stages = ""
        gpu = {"naive": "n/a", "autocaption": "n/a"}
        for _ in range(args.rounds):  # alternate, so both sides see the same machine state
            naive = [sys.executable, "-c", NAIVE, str(model), "|".join(RULES[:3]), args.device]
            seconds, peak, naive_log = timed([*naive, str(args.max_new_tokens), nested, *files], env)
            results["naive"].append(seconds)
            peaks["naive"] = peak
            seconds, peak, log = timed([*ours, str(three), str(work)], env)
            results["autocaption"].append(seconds)
            peaks["autocaption"] = peak
            stages = next((line for line in log.splitlines() if "stages:" in line), "")
            gpu = {"naive": peak_gpu(naive_log), "autocaption": peak_gpu(log)}
            if not args.no_rule_counts:
                results["1 rule"].append(timed([*ours, str(one), str(work)], env)[0])
                results["4 rules"].append(timed([*ours, str(four), str(work)], env)[0])
            if compare:
                results["batched path"].append(timed([*ours, str(batched), str(work)], env)[0])
    best = {name: min(values) for name, values in results.items() if values}
    n = len(files)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{f'family {args.family}' if args.family else f'shape {args.shape}'} on {args.device}, "
          f"weights {weight_bytes / 1e9:.2f} GB, batch_size {args.batch_size}")  # fmt: skip
    print(f"{n} photos, 3 rules, max_new_tokens {args.max_new_tokens}; best of {args.rounds} whole-process runs")
    for name, values in results.items():
        print(f"  {name} runs: {', '.join(f'{v:.1f} s' for v in values)}")
    print(
        f"(a) naive loop:   {best['naive']:7.1f} s  {n / best['naive']:.3f} images/s  peak RSS {peaks['naive']:.0f} MB"
    )
    print(f"(b) autocaption:  {best['autocaption']:7.1f} s  {n / best['autocaption']:.3f} images/s  "
          f"peak RSS {peaks['autocaption']:.0f} MB")  # fmt: skip
    print(f"speed-up (b)/(a): {best['naive'] / best['autocaption']:.2f}x")
    print(f"autocaption {re.sub(r'^.*stages: ', 'stages: ', stages)} (last run; stages overlap)")
    stage = dict(re.findall(r"(?:^|, )([a-z+ A-Z]+?) ([0-9.]+)(?: s)?(?=,|$)", re.sub(r"^.*stages: ", "", stages)))
    tokens = n * 3 * args.max_new_tokens
    if "decode" in stage:  # the stage called "decode", not "read+decode"
        decode = float(stage["decode"])
        print(f"decode: {tokens / decode:.0f} tokens/s over {tokens} tokens ({decode:.2f} s, "
              f"{stage.get('decode steps', '?')} steps)")  # fmt: skip
    if float(stage.get("steady steps", 0)):
        steps = float(stage["steady steps"])
        per_step = float(stage["steady decode"]) / steps
        print(f"steady state (each bucket's later batches): {per_step * 1000:.2f} ms per step over {steps:.0f} steps; "
              f"memory floors at {args.hbm_tbps} TB/s:")  # fmt: skip
        for name, kv in (("weights only", 0.0), ("+ tokens held", float(stage.get("steady KV held GB", 0))),
                         ("+ the whole padded state", float(stage["steady KV read GB"]))):  # fmt: skip
            read = weight_bytes + kv * 1e9 / steps  # bytes one step reads
            floor = read / (args.hbm_tbps * 1e12)
            print(f"  {name:<26} {read / 1e9:6.2f} GB per step, floor {floor * 1000:6.2f} ms: "
                  f"step {per_step / floor:.2f}x the floor ({100 * floor / per_step:.0f}% of bandwidth)")  # fmt: skip
    print(f"images/hour with 3 rules: {3600 * n / best['autocaption']:.0f} (naive {3600 * n / best['naive']:.0f})")
    print(f"peak GPU memory: naive {gpu['naive']}, autocaption {gpu['autocaption']}")
    if "1 rule" in best:
        print(f"1 rule {best['1 rule']:.1f} s, 4 rules {best['4 rules']:.1f} s: 4 rules cost "
              f"{best['4 rules'] / best['1 rule']:.2f}x of 1 rule")  # fmt: skip
    if "batched path" in best:
        print(f"batched path (share_prefix: false) {best['batched path']:.1f} s: the default path is "
              f"{best['batched path'] / best['autocaption']:.2f}x as fast")  # fmt: skip


if __name__ == "__main__":
    main()
