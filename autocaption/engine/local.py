"""The in-process engine: any image-text-to-text checkpoint through transformers, loaded once and kept
resident on the GPU (AMD ROCm or NVIDIA) or the CPU.

Two ways to decode, both greedy and equal to a plain one-image, one-prompt `generate`:
- the tree path (families.py says which families): each image's vision tower and prompt prefix run
  once, and every rule of that image continues from that one KV cache as a branch of a token tree;
- the batched path: left-padded batches of (image, rule) pairs through `generate`.

Loading (loading.py), packing requests into batches (packing.py) and what runs a decode step (runners.py)
each have a module of their own; this one decodes. The engine package alone imports torch and transformers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from autocaption.config import ModelConfig
from autocaption.engine import compat, loading
from autocaption.engine.base import Answer, Cancelled, EngineInfo, Job, Prompt, flattened, next_round, skipped
from autocaption.engine.families import Family
from autocaption.engine.grammar import BranchMasks, GrammarProcessor, Grammars
from autocaption.engine.loading import DTYPES, render
from autocaption.engine.memory import BatchPlan
from autocaption.engine.packing import TreeInputs, Unit, halves, pack
from autocaption.engine.packing import rows as batch_rows
from autocaption.engine.runners import StepRunners, first_line
from autocaption.engine.tree import TREE_ATTENTION, TREE_ATTENTION_MATH, Prefilled, TreeDecoder
from autocaption.errors import EngineError, ModelUnavailable

log = logging.getLogger(__name__)

SLOW_ON_CPU = 5e9  # parameters above which the first CPU batch reports how slow it was


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the daemon is asked to stop (SIGTERM)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class LocalEngine:
    """`Engine` on a transformers image-text-to-text model: greedy decoding, the prompts of each image as
    branches over its one prefill (tree.py) where the family allows, else left-padded batches."""

    def __init__(
        self, model: Any, processor: Any, info: EngineInfo, config: ModelConfig, family: Family, plan: BatchPlan
    ) -> None:
        self.model = model
        self.processor = processor  # used on the preprocessing thread only (a fast tokenizer is not shareable)
        self.tokenizer = copy.deepcopy(processor.tokenizer)  # the model thread's own, for decoding
        self.info = info
        self.family = family
        self.batch_size = plan.prompts
        self.max_images = plan.images
        # After a GPU out-of-memory error batches are packed smaller, and grow back (doubling) after
        # `grow_after` batches in a row went through: a spike (a huge panorama) does not shrink them forever.
        self.rows_limit = plan.prompts
        self.grow_after = 16
        self._since_out_of_memory = 0  # batches in a row that went through without being split
        self.max_batch_tokens = config.max_batch_tokens
        # Branches of a token tree need a 4D attention mask, which sdpa and eager take; flash_attention_2
        # only knows padding, so with it every prompt is prefilled on its own (the batched path).
        attention = model.config._attn_implementation
        self.share_prefix = (
            config.share_prefix and family.tree and attention in (TREE_ATTENTION, TREE_ATTENTION_MATH, "eager")
        )
        self.image_id = _image_token_id(model.config)
        self.cache_argument = compat.cache_argument(model)
        takes = inspect.signature(model.forward).parameters
        self._keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self.timings: dict[str, float] = defaultdict(float)
        self.device = torch.device(info.device.split(" ", 1)[0])
        # A decode step is ~2,000 small kernels launched from Python: on a GPU the launches, not the memory,
        # set its time. So each bucket's step is captured once as a CUDA/HIP graph and replayed (one launch
        # per step); `compile` also fuses it with inductor (GPU and CPU; compiled once per bucket, cached
        # under state.dir). Both need fixed shapes: the tree decoder pads batches up to buckets.
        self.runners = StepRunners(self.device, compile=config.compile, graphs=config.graphs)
        self.dtype = DTYPES[info.dtype]
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        self._preprocessor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")
        text_config = model.config.get_text_config()
        window, self.window_limit = _windows(text_config)
        # On a GPU the host reads whether a batch's answers all ended two steps behind the device, so it never
        # waits for it; on the CPU every op waits anyway, and a wasted step costs most there.
        lag = 2 if self.device.type == "cuda" else 0
        self.tree = TreeDecoder(
            pad_id=self.pad_id, eos_ids=self.eos_ids, dtype=self.dtype, device=self.device, sliding_window=window,
            make_runner=self.runners, bucketed=self.runners.bucketed, budget_bytes=plan.kv_budget,
            groups=_query_groups(text_config) if attention in (TREE_ATTENTION, TREE_ATTENTION_MATH) else 1, lag=lag,
        )  # fmt: skip
        self.runners.on_bucketing = self.tree.set_bucketed
        parameters = sum(parameter.numel() for parameter in model.parameters())
        self._report_cpu_speed = self.device.type == "cpu" and parameters >= SLOW_ON_CPU
        self.parameters = parameters
        self._grammars: Grammars | None = None  # made with the first rule that has a structure
        path = "tree decoding (each image's rules share its prefill)" if self.share_prefix else "batched decoding"
        reason = family.why_batched or ("prefix sharing needs attn_implementation sdpa" if family.tree else "")
        log.info("%s (%s): %s%s", info.model_id, family.label, path, f" — {reason}" if not self.share_prefix else "")
        log.info("%s%s", plan.line(), "" if config.batch_size is None else " (model.batch_size)")

    @classmethod
    def load(cls, config: ModelConfig, cache_dir: Path | None = None) -> LocalEngine:
        """`cache_dir`: where compiled decode steps are kept between runs (state.dir/torch-compile)."""
        loaded = loading.load(config, cache_dir)
        return cls(loaded.model, loaded.processor, loaded.info, config, loaded.family, loaded.plan)

    # Whether decode steps are compiled and captured (a refusal turns either off: runners.StepRunners).
    @property
    def compile(self) -> bool:
        return self.runners.compile

    @compile.setter
    def compile(self, value: bool) -> None:
        self.runners.compile = value

    @property
    def graphs(self) -> bool:
        return self.runners.graphs

    @graphs.setter
    def graphs(self, value: bool) -> None:
        self.runners.graphs = value

    def close(self) -> None:
        self._preprocessor.shutdown(cancel_futures=True)
        # The kept states and their graphs first: their runners hold `_forward`, so engine, tree and runners
        # are a cycle that only a garbage collection would free (a reload's new engine needs that memory).
        self.tree.release()
        del self.model
        if self.device.type == "cuda":
            log.debug("peak GPU memory %.1f GiB", torch.cuda.max_memory_allocated(self.device) / 2**30)
            torch.cuda.empty_cache()

    def render(self, prompt: Prompt) -> str:
        """The processor's own chat template: one user turn, the image then the text (a system turn if set)."""
        return render(self.processor, prompt.text, prompt.system)

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        started = time.perf_counter()
        units = self._units(jobs)
        answers: dict[int, Answer] = {}
        for batch in self._pack(units):
            for index, answer in self._run(batch, cancel):
                answers[index] = answer
            if cancel is not None and cancel.is_set():
                raise Cancelled()
        if self._report_cpu_speed and answers:
            self._report_cpu_speed = False
            log.warning(
                "on the CPU, %s (%.1f B parameters) took %.0f s per answer in its first batch; a GPU takes a "
                "fraction of a second", self.info.model_id, self.parameters / 1e9,
                (time.perf_counter() - started) / len(answers),
            )  # fmt: skip
        flat = iter(answers[i] for i in range(len(answers)))
        return [[next(flat) for _ in job.prompts] for job in jobs]

    def _units(self, jobs: Sequence[Job]) -> list[Unit]:
        """One unit per image and system text (they share a prefix); one per prompt on the batched path."""
        units: list[Unit] = []
        flat = iter(enumerate(flattened(jobs)))  # (a gate's index among all prompts of the request from here on)
        for job in jobs:
            by_system: dict[str | None, list[tuple[int, Prompt]]] = {}
            for index, prompt in (next(flat) for _ in job.prompts):
                by_system.setdefault(prompt.system, []).append((index, prompt))
            for group in by_system.values():
                if self.share_prefix:
                    # All prompts of an image in one unit, prefilled once, decoded together even beyond
                    # batch_size (branches of one tree); the processor prepares it ahead on the worker.
                    future = self._preprocessor.submit(self._tree_inputs, job.image, [p for _, p in group])
                    units.append(Unit(job.image, group, future.result))
                else:
                    units.extend(Unit(job.image, chain, None) for chain in _chains(group))
        return units

    def _pack(self, units: list[Unit]) -> list[list[Unit]]:
        """Batches of at most `batch_size` prompts; an image with more prompts than `batch_size` is a batch
        of its own. On the batched path also at most `max_batch_tokens` image+prompt tokens, which are
        prefilled in one forward; the tree path prefills one image at a time, so there its batches are
        bounded by the images the KV budget holds (`batch_size: auto`), not by that."""
        return self._packed(units, tokens_limit=None if self.share_prefix else self.max_batch_tokens)

    def _packed(self, units: list[Unit], tokens_limit: int | None) -> list[list[Unit]]:
        return pack(units, self.processor, rows_limit=self.rows_limit, max_images=self.max_images,
                    tokens_limit=tokens_limit)  # fmt: skip

    def _run(self, batch: list[Unit], cancel: threading.Event | None, depth: int = 0) -> list[tuple[int, Answer]]:
        """Generate for one batch; on GPU out-of-memory retry it in halves (nothing is lost)."""
        try:
            answers = self._attempt(batch, cancel)
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError on torch >= 2.5
            pass  # retried below, outside the handler: its traceback still holds the failed batch's tensors
        else:
            if depth == 0:  # a whole batch went through without being split
                self._grow_back()
            return answers
        self.tree.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows = batch_rows(batch)
        if len(batch) == 1 and rows == 1:
            raise EngineError("GPU out of memory on a single image", transient=True)
        self.rows_limit = max(1, min(self.rows_limit, rows // 2))
        self._since_out_of_memory = 0
        # One warning per batch that ran out of memory; how far it had to be split is detail.
        (log.warning if depth == 0 else log.debug)(
            "GPU out of memory on a batch of %d prompts; retrying it in halves (batches of at most %d prompts "
            "until %d in a row went through)", rows, self.rows_limit, self.grow_after,
        )  # fmt: skip
        return [pair for half in halves(batch) for pair in self._run(half, cancel, depth + 1)]

    def _attempt(self, batch: list[Unit], cancel: threading.Event | None) -> list[tuple[int, Answer]]:
        if self.share_prefix:
            shared = self._generate_shared(batch, cancel)
            if shared is not None:
                return shared
            # The batched path prefills the whole batch in one forward: packed again within max_batch_tokens.
            units = [Unit(unit.image, chain, None) for unit in batch for chain in _chains(unit.prompts)]
            parts = self._packed(units, self.max_batch_tokens)
        else:
            parts = [batch]
        return [
            pair
            for part in parts
            for pair in self._generate_gated(
                [(index, unit.image, prompt) for unit in part for index, prompt in unit.prompts], cancel
            )
        ]

    def _generate_gated(
        self, items: list[tuple[int, Image.Image, Prompt]], cancel: threading.Event | None
    ) -> list[tuple[int, Answer]]:
        """The batched path in rounds: the prompts without a gate, then those whose gate answered (each round
        prefills its images again: only the tree path continues from the first prefill)."""
        prompts = {index: prompt for index, _, prompt in items}
        images = {index: image for index, image, _ in items}
        answers: dict[int, Answer] = {}
        while ready := next_round(prompts, answers):
            answers.update(self._generate([(index, images[index], prompts[index]) for index in ready], cancel))
        # (a gate outside this batch cannot happen: chains are packed together)
        return [(index, answers.get(index) or skipped("its gate was not asked")) for index in prompts]

    def _grow_back(self) -> None:
        self._since_out_of_memory += 1
        if self.rows_limit < self.batch_size and self._since_out_of_memory >= self.grow_after:
            self.rows_limit = min(self.batch_size, self.rows_limit * 2)
            self._since_out_of_memory = 0
            log.info("batches grow back to %d prompts", self.rows_limit)

    def _add_special(self, texts: Sequence[str]) -> bool:
        # Templates that render the BOS themselves must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos and all(text.startswith(bos) for text in texts))

    def _images(self, images: list[Image.Image]) -> list[Any]:
        return [[image] for image in images] if self.family.nested_images else list(images)

    # --- the tree path -------------------------------------------------------------------------------------

    def _tree_inputs(self, image: Image.Image, prompts: list[Prompt]) -> TreeInputs | None:
        """On the worker thread: the processor's own expansion of the first prompt (image tokens and whatever
        the family puts around them), and every prompt's text after the image. None when the prompts do not
        read as one prefix ending in the image plus a text of their own (the batched path takes them)."""
        texts = [self.render(prompt) for prompt in prompts]
        add_special = self._add_special(texts)
        with _processing([image], self.family.label):
            first = self.processor(
                images=self._images([image]), text=[texts[0]], return_tensors="pt", add_special_tokens=add_special
            )
        ids = first["input_ids"][0].tolist()
        if self.image_id not in ids:
            return None
        length = len(ids) - ids[::-1].index(self.image_id)
        image_token = getattr(self.processor, "image_token", None)  # what the template writes for the image
        if not isinstance(image_token, str):
            return None
        marker = self.processor.tokenizer.convert_tokens_to_ids(image_token)
        raw = [self.processor.tokenizer(text, add_special_tokens=add_special)["input_ids"] for text in texts]
        if any(tokens.count(marker) != 1 for tokens in raw):
            return None
        heads = [tokens[: tokens.index(marker)] for tokens in raw]
        tails = [tokens[tokens.index(marker) + 1 :] for tokens in raw]
        around = ids[length : len(ids) - len(tails[0])]  # what the processor adds after the image's tokens
        if any(head != heads[0] for head in heads) or ids[len(ids) - len(tails[0]) :] != tails[0] or not tails[0]:
            return None
        tensors = {  # pixel values and the like; per-token ones (token_type_ids) cut to the prefix
            key: value[:, :length] if value.shape[:2] == (1, len(ids)) else value
            for key, value in first.items()
            if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor)
        }
        return TreeInputs(ids[:length], [around + tail for tail in tails], tensors)

    @torch.inference_mode()
    def _generate_shared(self, batch: list[Unit], cancel: threading.Event | None) -> list[tuple[int, Answer]] | None:
        """Each image paid for once: the vision tower and the prompt prefix up to the image's last token run
        once per image, and every prompt of that image continues from that one KV cache as a branch of a
        token tree (see tree.py). None when that cannot be done exactly (the caller falls back)."""
        started = time.perf_counter()
        prepared = []
        for unit in batch:
            inputs = unit.prepared() if unit.prepared else None
            if inputs is None:
                return None
            prepared.append(inputs)
        self.timings["preprocess wait"] += time.perf_counter() - started
        if self.window_limit is not None:  # mixed sliding/full layers: exact only while nothing leaves the window
            longest = max(len(i.prefix) + len(b) + p.max_new_tokens for i, u in zip(prepared, batch, strict=True)
                          for b, (_, p) in zip(i.branches, u.prompts, strict=True))  # fmt: skip
            if longest > self.window_limit:
                return None
        # Round one: every prompt without a gate, each image prefilled once. Later rounds: the prompts whose
        # gate answered and admits them, continued from the prefix the last round kept (never prefilled again).
        answers: dict[int, Answer] = {}
        asked = {b: self._gated(unit, answers) for b, unit in enumerate(batch)}
        images: list[tuple[int, Prefilled]] = []
        for b, (unit, inputs) in enumerate(zip(batch, prepared, strict=True)):
            image = self._prefill(unit, inputs, asked[b])
            if image is None:
                return None
            images.append((b, image))
        while images:
            decode_started = time.perf_counter()
            prompts = [batch[b].prompts[j][1] for b, _ in images for j in asked[b]]
            new_tokens = self.tree.run([image for _, image in images], self._forward, cancel, self._masks(prompts))
            self._decoded(time.perf_counter() - decode_started)
            lengths = [image.length + len(branch) for _, image in images for branch in image.branches]
            indices = [batch[b].prompts[j][0] for b, _ in images for j in asked[b]]
            answers.update(self._answers(indices, prompts, new_tokens, lengths, decode_started))
            rows = [b for b, _ in images]
            asked = {b: self._gated(batch[b], answers) for b in rows}
            images = [(b, self._continued(batch[b], prepared[b], asked[b], row)) for row, b in enumerate(rows)
                      if asked[b]]  # fmt: skip
        share = (time.perf_counter() - started) / max(len(answers), 1)
        return [(index, dataclasses.replace(answers[index], seconds=share) if answers[index].skipped is None
                 else answers[index]) for unit in batch for index, _ in unit.prompts]  # fmt: skip

    def _continued(self, unit: Unit, inputs: TreeInputs, positions: list[int], row: int) -> Prefilled:
        """`unit`'s prompts at `positions` as branches of the prefix its image left in `row` of the last run."""
        length = len(inputs.prefix)
        return Prefilled(self.tree.kept_prefix(row, length), length, [inputs.branches[j] for j in positions],
                         [unit.prompts[j][1].max_new_tokens for j in positions])  # fmt: skip

    def _gated(self, unit: Unit, answers: dict[int, Answer]) -> list[int]:
        """The positions of `unit`'s prompts to ask in the next round (`next_round`)."""
        ready = set(next_round(dict(unit.prompts), answers))
        return [position for position, (index, _) in enumerate(unit.prompts) if index in ready]

    def _decoded(self, seconds: float) -> None:
        decoded = self.tree.last
        self.timings["decode"] += seconds
        self.timings["decode steps"] += decoded.steps
        self.timings["masks"] += decoded.masking
        if decoded.reused:  # the bench's steady state: a bucket's later batches, no compile or capture in them
            self.timings["steady decode"] += seconds
            self.timings["steady steps"] += decoded.steps
            self.timings["steady KV read GB"] += decoded.steps * decoded.padded_bytes / 1e9  # what the step reads
            self.timings["steady KV held GB"] += decoded.steps * decoded.held_bytes / 1e9  # what it must read

    def _masks(self, prompts: Sequence[Prompt]) -> BranchMasks | None:
        """What each prompt's answer may be, token by token; None when no prompt has a structure."""
        if all(prompt.structure is None for prompt in prompts):
            return None
        if self._grammars is None:
            vocabulary = int(self.model.get_output_embeddings().weight.shape[0])
            self._grammars = Grammars(self.tokenizer, vocabulary, self.eos_ids)
        return self._grammars.masks([prompt.structure for prompt in prompts], [p.max_new_tokens for p in prompts])

    def _prefill(self, unit: Unit, inputs: TreeInputs, positions: list[int]) -> Prefilled | None:
        """One image alone: no padding, so attention runs causal without a mask (sdpa's fastest kernels)."""
        started = time.perf_counter()
        tensors = {
            key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in inputs.tensors.items()
        }
        length = len(inputs.prefix)
        output = self.model(
            input_ids=torch.tensor([inputs.prefix], device=self.device), use_cache=True, **tensors,
            **self._keep_logits,  # only the cache is needed; skip the vocabulary projection of 2,000+ tokens
        )  # fmt: skip
        self.timings["vision+prefill"] += time.perf_counter() - started
        layers = _prefix_layers(compat.output_cache(output, self.cache_argument), length)
        if layers is None:
            return None
        return Prefilled(layers, length, [inputs.branches[j] for j in positions],
                         [unit.prompts[j][1].max_new_tokens for j in positions])  # fmt: skip

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        logits: torch.Tensor = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{self.cache_argument: cache}
        ).logits
        return logits

    # --- the batched path ----------------------------------------------------------------------------------

    def _batch_inputs(self, items: list[tuple[int, Image.Image, Prompt]]) -> Any:
        """On the worker thread: the processor's inputs for a left-padded batch."""
        texts = [self.render(prompt) for _, _, prompt in items]
        with _processing([image for _, image, _ in items], self.family.label):
            return self.processor(
                images=self._images([image for _, image, _ in items]), text=texts, padding=True,
                return_tensors="pt", add_special_tokens=self._add_special(texts),
            )  # fmt: skip

    @torch.inference_mode()
    def _generate(
        self, items: list[tuple[int, Image.Image, Prompt]], cancel: threading.Event | None
    ) -> list[tuple[int, Answer]]:
        """Each prompt with its own copy of the image, left-padded into one batch."""
        started = time.perf_counter()
        inputs = self._preprocessor.submit(self._batch_inputs, items).result().to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generate_started = time.perf_counter()
        self.timings["preprocess"] += generate_started - started
        prompts = [prompt for _, _, prompt in items]
        masks = self._masks(prompts)
        processors = [GrammarProcessor(masks, inputs["input_ids"].shape[1])] if masks is not None else []
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(p.max_new_tokens for p in prompts),
            disable_compile=not self.compile,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]) if cancel is not None else None,
            logits_processor=LogitsProcessorList(processors) if processors else None,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        self.timings["prefill+decode"] += time.perf_counter() - generate_started
        lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        return self._answers([index for index, _, _ in items], prompts, new_tokens, lengths, started)

    def _answers(
        self, indices: list[int], prompts: list[Prompt], new_tokens: list[list[int]], lengths: list[int],
        started: float,
    ) -> list[tuple[int, Answer]]:  # fmt: skip
        share = (time.perf_counter() - started) / len(prompts)
        answers = []
        for index, prompt, tokens, length in zip(indices, prompts, new_tokens, lengths, strict=True):
            kept = list(self._until_eos(tokens[: prompt.max_new_tokens]))
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append((index, Answer(text=text, prompt_tokens=length, new_tokens=len(kept), seconds=share)))
        return answers

    def _until_eos(self, tokens: list[int]) -> Iterator[int]:
        for token in tokens:
            if token in self.eos_ids:
                return
            yield token


def _chains(prompts: list[tuple[int, Prompt]]) -> list[list[tuple[int, Prompt]]]:
    """The prompts in groups that must stay together: each gated prompt with the prompt that gates it."""
    groups: dict[int, list[tuple[int, Prompt]]] = {}
    root: dict[int, int] = {}
    for index, prompt in prompts:
        top = root.get(prompt.after, index) if prompt.after is not None else index
        root[index] = top
        groups.setdefault(top, []).append((index, prompt))
    return list(groups.values())


def _image_token_id(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelUnavailable(f"model {config.model_type}: its config names no image token")


def _query_groups(text_config: Any) -> int:
    """Query heads per key/value head (grouped-query attention), as the attention layers count them."""
    heads = getattr(text_config, "num_attention_heads", None) or 1
    return max(1, heads // (getattr(text_config, "num_key_value_heads", None) or heads))


def _windows(text_config: Any) -> tuple[int | None, int | None]:
    """(the sliding window every layer uses, or None; the window some layers use, when others attend to all).
    Tree masks apply one window to every layer: with mixed layers they are exact only below the window."""
    window = getattr(text_config, "sliding_window", None)
    kinds = set(getattr(text_config, "layer_types", None) or [])
    if not window or kinds == {"full_attention"}:
        return None, None
    if len(kinds) > 1:
        return None, int(window)
    return int(window), None


def _prefix_layers(cache: Any, length: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's keys and values of a one-image prefill; None when a layer does not hold all `length`
    tokens (a sliding-window cache shorter than the prefix): that image's prompts are not shared."""
    layers = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.shape[2] != length:
            return None
        layers.append((keys, values))
    return layers


@contextlib.contextmanager
def _processing(images: Sequence[Image.Image], family: str) -> Iterator[None]:
    """A processor that cannot take an image (Qwen2-VL: "absolute aspect ratio must be smaller than 200" for a
    10000x20 panorama) is that image's failure, not the engine's: the caller finds the one image in the batch
    and describes the others."""
    try:
        yield
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
        raise EngineError(f"the {family} processor cannot take this image ({sizes}): {first_line(exc)}") from None
