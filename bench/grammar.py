"""Structured rules: what a grammar costs, and the two grammar engines side by side (issue 19).

1. Compile: a `list` rule with a 5,000-term vocabulary and a `json` rule, for a 32,000-token byte-level BPE
   vocabulary (trained here on text from the installed packages: no tokenizer can be downloaded), with
   llguidance (what autocaption uses) and xgrammar (the other candidate; measured when it is installed).
   First compile, and a second one of the same rule (the engine keeps each rule's compiled matcher).
2. Masks per step: 12 and 60 branches, each mid-way through a list answer, all masks of a step filled
   together (llguidance: its thread pool; xgrammar: its batch matcher), averaged over the steps of an answer.
3. The decode step, end to end: the engine's tree decoding of 12 and 60 branches with and without their
   rules' structures, on llava-v1.6-mistral-7b's shapes with 2 of its 32 layers (random weights, CPU: the
   vocabulary of 32,064 and the hidden size are the 7B's, so the mask's share is not flattered by a tiny head).
   Ratio = constrained decode time / free decode time, in the same run.

Usage: python bench/grammar.py [--skip-step]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / ".cache-grammar"


def bpe_tokenizer() -> Any:
    """A 32,000-token byte-level BPE (GPT-2 style), trained once on the installed packages' text, kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    CACHE.mkdir(parents=True, exist_ok=True)
    saved = CACHE / "bpe-32k.json"
    if not saved.exists():
        import site

        files = sorted(str(p) for p in Path(site.getsitepackages()[0]).rglob("*.py"))[:4000]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tokenizer.train(files, trainer)
        tokenizer.save(str(saved))
    return PreTrainedTokenizerFast(tokenizer_file=str(saved), bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def vocabulary(count: int) -> list[str]:
    """`count` distinct keyword-like terms (one or two words, some in a hierarchy)."""
    rng = random.Random(1)
    syllables = ["ka", "lo", "mi", "ter", "sun", "bar", "ve", "no", "ri", "dal", "fen", "gor", "hu", "sel", "tan"]
    terms: set[str] = set()
    while len(terms) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).capitalize()
        if rng.random() < 0.2:
            word += " " + "".join(rng.choice(syllables) for _ in range(2))
        terms.add(word)
    return [f"Group{i % 40}|{term}" if i % 3 == 0 else term for i, term in enumerate(sorted(terms))]


def structures(terms: list[str]) -> dict[str, Any]:
    from autocaption.structure import JsonAnswer, Keywords, closed, vocabulary_lines

    return {
        "list, 5,000-term vocabulary": Keywords(min=5, max=30, vocabulary=vocabulary_lines(terms)),
        "list, free words": Keywords(min=5, max=30, words=2, exclude=("photo", "image")),
        "json": JsonAnswer(closed({"type": "object", "properties": {
            "light": {"enum": ["day", "night", "studio"]}, "people": {"type": "integer", "minimum": 0, "maximum": 50},
            "objects": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 5}},
            "required": ["light", "people"]})),
    }  # fmt: skip


def xgrammar_ebnf(structure: Any) -> str:
    """The same grammar in xgrammar's EBNF (the list kinds; JSON goes through its schema compiler)."""
    from autocaption.structure import WORD

    if structure.vocabulary is not None:
        items = " | ".join('"' + term.replace('"', '\\"') + '"' for term in sorted(structure.allowed_terms() or ()))
    else:
        word = WORD.replace(r"\p{L}\p{N}", "a-zA-Z0-9")
        items = f'word (" " word){{0,{structure.words - 1}}}\nword ::= {word.replace("{0,31}", "*")}'
    return f'root ::= item (", " item){{{structure.own_min - 1},{structure.own_max - 1}}}\nitem ::= {items}\n'


def compile_times(tokenizer: Any, cases: dict[str, Any]) -> None:
    import llguidance

    from autocaption.engine.grammar import Grammars

    print("\n## Compile (ms): first, and again (kept)")
    started = time.perf_counter()
    grammars = Grammars(tokenizer, 32000, {tokenizer.eos_token_id})
    print(f"llguidance tokenizer: {(time.perf_counter() - started) * 1e3:.0f} ms (once per model)")
    xgr = _xgrammar(tokenizer)
    for name, structure in cases.items():
        started = time.perf_counter()
        matcher = grammars.matcher(structure)
        matcher.compute_bitmask()  # llguidance builds its lexer lazily: the first mask is part of compiling
        first = time.perf_counter() - started
        started = time.perf_counter()
        grammars.matcher(structure).compute_bitmask()
        again = time.perf_counter() - started
        line = f"| {name} | llguidance {first * 1e3:.1f} / {again * 1e3:.2f}"
        if xgr is not None:
            compiler, _ = xgr
            started = time.perf_counter()
            compiled = _xgrammar_compile(compiler, structure)
            x_first = time.perf_counter() - started
            started = time.perf_counter()
            _xgrammar_compile(compiler, structure)
            x_again = time.perf_counter() - started
            line += f" | xgrammar {x_first * 1e3:.1f} / {x_again * 1e3:.2f}"
            del compiled
        print(line + " |")
    del llguidance


def _xgrammar(tokenizer: Any) -> tuple[Any, Any] | None:
    try:
        import xgrammar
    except ImportError:
        print("(xgrammar is not installed: pip install xgrammar to measure it too)")
        return None
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=32000)
    return xgrammar.GrammarCompiler(info, max_threads=os.cpu_count() or 1), info


def _xgrammar_compile(compiler: Any, structure: Any) -> Any:
    import json

    if structure.kind == "json":
        return compiler.compile_json_schema(json.dumps(structure.schema()), any_whitespace=False)
    return compiler.compile_grammar(xgrammar_ebnf(structure))


def mask_times(tokenizer: Any, cases: dict[str, Any], rows: int, steps: int = 40) -> None:
    """Per step: every branch's mask filled, then each branch takes one allowed token."""
    import llguidance.torch
    import numpy as np

    from autocaption.engine.grammar import Grammars

    grammars = Grammars(tokenizer, 32000, {tokenizer.eos_token_id})
    structure = cases["list, 5,000-term vocabulary"]
    rng = np.random.default_rng(0)
    masks = grammars.masks([structure] * rows, [400] * rows)
    took, grammar_only = [], []
    for _ in range(steps):
        started = time.perf_counter()
        live = [(matcher, row) for row, matcher in enumerate(masks.matchers) if not masks.ended[row]]
        llguidance.torch.fill_next_token_bitmask_par(grammars.executor, live, masks.mask)
        grammar_only.append(time.perf_counter() - started)
        started = time.perf_counter()
        bits = masks.fill().numpy().view(np.uint32)
        took.append(time.perf_counter() - started)
        chosen = []
        for row in range(rows):
            allowed = np.flatnonzero(np.unpackbits(bits[row].view(np.uint8), bitorder="little"))
            allowed = allowed[allowed != tokenizer.eos_token_id]
            chosen.append(int(rng.choice(allowed)) if len(allowed) else tokenizer.eos_token_id)
        masks.advance(chosen, [True] * rows)
    print(f"| llguidance, {rows} rows (list, 5,000 terms) | grammar {statistics.median(grammar_only) * 1e3:.2f} ms, "
          f"with the distinct-items guard {statistics.median(took) * 1e3:.2f} ms a step |")  # fmt: skip
    xgr = _xgrammar(tokenizer)
    if xgr is not None:
        import torch
        import xgrammar

        compiler, _ = xgr
        compiled = _xgrammar_compile(compiler, structure)
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        bitmask = xgrammar.allocate_token_bitmask(rows, 32000)
        took = []
        for _ in range(steps):
            started = time.perf_counter()
            for row, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, row)
            took.append(time.perf_counter() - started)
            for row, matcher in enumerate(matchers):
                words = bitmask[row].numpy().view(np.uint32)
                allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
                allowed = allowed[allowed != tokenizer.eos_token_id]
                if len(allowed) and not matcher.is_terminated():
                    matcher.accept_token(int(rng.choice(allowed)))
        del torch
        print(f"| xgrammar, {rows} rows (list, 5,000 terms) | grammar {statistics.median(took) * 1e3:.2f} ms a step |")


def step_overhead(rows_options: list[int]) -> None:
    """The engine's decode time with and without structures, same photos, same prompts, same run."""
    import torch
    from PIL import Image

    from autocaption.config import ModelConfig
    from autocaption.engine import Job, Prompt, load_engine
    from autocaption.structure import Choice, Keywords
    from tests.tinymodel import build_mistral_7b

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = build_mistral_7b(Path(folder) / "m", device="cpu", text_layers=2, vision_layers=1)
        engine: Any = load_engine(ModelConfig(id=str(model), batch_size=64, dtype="float32"))
        print("\n## The decode step, constrained / free (llava-v1.6-mistral-7b shapes, 2 of 32 layers, CPU)")
        print("| branches | free ms/step | constrained ms/step | of which the host's masks | step / (step - masks) |")
        for rows in rows_options:
            images = [Image.new("RGB", (336, 336), (i * 20 % 255, 80, 160)) for i in range(rows // 3)]
            rules = [Keywords(min=3, max=12, words=2), Choice(("yes", "no")), Keywords(min=2, max=6)]
            for structured in (False, True, False, True):  # twice each: the first pair warms up
                prompts = tuple(Prompt(f"Question {i}.", 24, structure=rule if structured else None)
                                for i, rule in enumerate(rules))  # fmt: skip
                engine.timings.clear()
                engine.describe([Job(image, prompts) for image in images])
                steps = max(engine.timings["decode steps"], 1)
                per_step = engine.timings["decode"] / steps * 1e3
                if structured:
                    constrained, masking = per_step, engine.timings["masks"] / steps * 1e3
                else:
                    free = per_step
            # The answers differ in length free and constrained (steps over a longer cache cost more), so the
            # masks' share is measured inside the constrained run: on a GPU it overlaps the forward.
            ratio = constrained / (constrained - masking)
            print(f"| {rows} | {free:.1f} | {constrained:.1f} | {masking:.2f} | {ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-step", action="store_true", help="compile and mask times only")
    args = parser.parse_args()
    from importlib.metadata import version

    import torch

    print(f"# bench/grammar.py — {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, llguidance {version('llguidance')}")  # fmt: skip
    tokenizer = bpe_tokenizer()
    cases = structures(vocabulary(5000))
    compile_times(tokenizer, cases)
    print("\n## Masks per step")
    for rows in (12, 60):
        mask_times(tokenizer, cases, rows)
    if not args.skip_step:
        step_overhead([12, 60])


if __name__ == "__main__":
    main()
