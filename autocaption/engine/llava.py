"""LLaVA-NeXT through HuggingFace transformers, loaded once and kept resident on the GPU.

This is the only module that imports torch and transformers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaNextForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from autocaption import dependencies
from autocaption.config import ModelConfig
from autocaption.dependencies import DependencyError
from autocaption.engine import compat, hub
from autocaption.engine.base import Answer, Cancelled, EngineInfo, Job, Prompt
from autocaption.engine.devices import place
from autocaption.engine.hardware import accelerator
from autocaption.engine.tree import TREE_ATTENTION, Prefilled, TreeDecoder, register_attention
from autocaption.errors import EngineError, ModelUnavailable

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the daemon is asked to stop (SIGTERM)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _Unit:
    """One image and prompts that share its prefix: (index in the flattened request, prompt)."""

    image: Image.Image
    prompts: list[tuple[int, Prompt]]
    pixels: Future[Any] | None  # the image processor's output, computed ahead on a worker (shared path only)


def _rows(batch: list[_Unit]) -> int:
    return sum(len(unit.prompts) for unit in batch)


def _halves(batch: list[_Unit]) -> list[list[_Unit]]:
    if len(batch) > 1:
        return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    unit = batch[0]  # one image with several prompts: split its prompts
    half = len(unit.prompts) // 2
    return [[_Unit(unit.image, part, unit.pixels)] for part in (unit.prompts[:half], unit.prompts[half:])]


class LlavaEngine:
    """`Engine` on `LlavaNextForConditionalGeneration`; greedy decoding, the prompts of each image as
    branches over its one prefill (tree.py), or left-padded batches of separate prompts."""

    def __init__(self, model: Any, processor: Any, info: EngineInfo, config: ModelConfig) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = config.batch_size
        # After a GPU out-of-memory error batches are packed smaller, and grow back (doubling) after
        # `grow_after` batches in a row went through: a spike (a huge panorama) does not shrink them forever.
        self.rows_limit = config.batch_size
        self.grow_after = 16
        self._since_out_of_memory = 0  # batches in a row that went through without being split
        self.max_batch_tokens = config.max_batch_tokens
        # Branches of a token tree need a 4D attention mask, which sdpa and eager take; flash_attention_2
        # only knows padding, so with it every prompt is prefilled on its own (the plain path).
        self.share_prefix = config.share_prefix and model.config._attn_implementation in (TREE_ATTENTION, "eager")
        if config.share_prefix and not self.share_prefix:
            log.info("prompts of one image are prefilled separately: prefix sharing needs attn_implementation sdpa")
        self.image_id = model.config.image_token_index
        self.cache_argument = compat.cache_argument(model)
        self.timings: dict[str, float] = defaultdict(float)
        self.device = torch.device(info.device.split(" ", 1)[0])
        # Compiling the decode step (CUDA graphs: one launch per step instead of one per kernel) pays on a
        # GPU once shapes repeat, so cache lengths are bucketed; shapes vary per batch, hence opt-in.
        self.compile = config.compile and self.device.type != "cpu"
        self._step = (
            torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if self.compile else self._forward
        )
        self.dtype = _DTYPES[info.dtype]
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        # Only the image processor runs there: a fast tokenizer must not be used from two threads at once.
        self._preprocessor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")
        self.tree = TreeDecoder(
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            dtype=self.dtype,
            device=self.device,
            sliding_window=getattr(model.config.get_text_config(), "sliding_window", None),
            bucket=self._cache_length,
        )

    @classmethod
    def load(cls, config: ModelConfig) -> LlavaEngine:
        missing = compat.problems()
        if missing:
            raise DependencyError(
                f"transformers {compat.VERSION} lacks what autocaption's engine uses ({', '.join(missing)}); "
                f"install a tested release: pip install 'transformers{dependencies.declared().get('transformers', '')}'"
            )
        placement = place(config.device, config.dtype, accelerator())
        if placement.warning:
            log.warning(placement.warning)
        hf_logging.disable_progress_bar()  # a tqdm bar per load is noise in a service log
        started = time.perf_counter()
        revision = config.revision or "main"

        def from_pretrained(source: str, offline: bool) -> tuple[Any, Any]:
            processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=offline)
            model = LlavaNextForConditionalGeneration.from_pretrained(
                source,
                revision=revision,
                local_files_only=offline,
                dtype=_DTYPES[placement.dtype],
                attn_implementation=_attention(config),
            )
            return processor, model

        try:
            processor, model = hub.load(config, from_pretrained)
        except ImportError as exc:  # flash_attention_2 asked for but not installed
            raise ModelUnavailable(f"model.attn_implementation: {config.attn_implementation}: {exc}") from None
        model = model.to(placement.device).eval()
        if config.image_grid_pinpoints:
            # Processor and model must agree, or LLaVA-NeXT fails with a split_with_sizes error.
            pinpoints = [list(pair) for pair in config.image_grid_pinpoints]
            processor.image_processor.image_grid_pinpoints = pinpoints
            model.config.image_grid_pinpoints = pinpoints
        # Batches are padded on the left so every row's new tokens start at the same column.
        processor.tokenizer.padding_side = "left"
        log.info(
            "model %s loaded on %s as %s in %.1f s",
            config.id, placement.description, placement.dtype, time.perf_counter() - started,
        )  # fmt: skip
        info = EngineInfo(
            backend="transformers",
            model_id=config.id,
            device=placement.description,
            dtype=placement.dtype,
            max_image_side=_max_image_side(processor),
        )
        return cls(model, processor, info, config)

    def close(self) -> None:
        self._preprocessor.shutdown(cancel_futures=True)
        del self.model
        if self.device.type == "cuda":
            log.debug("peak GPU memory %.1f GiB", torch.cuda.max_memory_allocated(self.device) / 2**30)
            torch.cuda.empty_cache()

    def render(self, prompt: Prompt) -> str:
        """The processor's own chat template: one user turn, the image then the text (a system turn if set)."""
        conversation: list[dict[str, Any]] = []
        if prompt.system:
            conversation.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]})
        text: str = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return text

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        units = self._units(jobs)
        answers: dict[int, Answer] = {}
        for batch in self._pack(units):
            for index, answer in self._run(batch, cancel):
                answers[index] = answer
            if cancel is not None and cancel.is_set():
                raise Cancelled()
        flat = iter(answers[i] for i in range(len(answers)))
        return [[next(flat) for _ in job.prompts] for job in jobs]

    def _units(self, jobs: Sequence[Job]) -> list[_Unit]:
        """One unit per image and system text (they share a prefix)."""
        units: list[_Unit] = []
        index = 0
        for job in jobs:
            pixels = self._pixels_ahead(job.image) if self.share_prefix else None
            by_system: dict[str | None, list[tuple[int, Prompt]]] = {}
            for prompt in job.prompts:
                by_system.setdefault(prompt.system, []).append((index, prompt))
                index += 1
            for group in by_system.values():
                # Shared: all prompts of an image in one unit, prefilled once, decoded together even beyond
                # batch_size (branches of one tree). Plain: one prompt per unit.
                size = len(group) if self.share_prefix else 1
                units.extend(_Unit(job.image, group[i : i + size], pixels) for i in range(0, len(group), size))
        return units

    def _pack(self, units: list[_Unit]) -> list[list[_Unit]]:
        """Batches of at most `batch_size` prompts and `max_batch_tokens` image+prompt tokens; an image with
        more prompts than `batch_size` is a batch of its own."""
        batches: list[list[_Unit]] = []
        rows = tokens = 0
        for unit in units:
            cost = self._image_tokens(unit.image)
            if batches and rows + len(unit.prompts) <= self.rows_limit and tokens + cost <= self.max_batch_tokens:
                batches[-1].append(unit)
                rows, tokens = rows + len(unit.prompts), tokens + cost
            else:
                batches.append([unit])
                rows, tokens = len(unit.prompts), cost
        return batches

    def _pixels_ahead(self, image: Image.Image) -> Future[Any]:
        """Resizing, tiling and normalising an image runs on a worker thread ahead of the model: while one
        image is prefilled the next ones are prepared (PIL and numpy release the GIL)."""
        return self._preprocessor.submit(self.processor.image_processor, images=[image], return_tensors="pt")

    def _image_tokens(self, image: Image.Image) -> int:
        try:
            return compat.image_tokens(self.processor, image.height, image.width)
        except (AttributeError, KeyError, TypeError, ValueError):
            return 3000  # the most LLaVA-NeXT uses for one image

    def _run(self, batch: list[_Unit], cancel: threading.Event | None, depth: int = 0) -> list[tuple[int, Answer]]:
        """Generate for one batch; on GPU out-of-memory retry it in halves (nothing is lost)."""
        try:
            answers = self._attempt(batch, cancel)
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError on torch >= 2.5
            pass  # retried below, outside the handler: its traceback still holds the failed batch's tensors
        else:
            if depth == 0:  # a whole batch went through without being split
                self._grow_back()
            return answers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows = _rows(batch)
        if len(batch) == 1 and rows == 1:
            raise EngineError("GPU out of memory on a single image", transient=True)
        self.rows_limit = max(1, min(self.rows_limit, rows // 2))
        self._since_out_of_memory = 0
        # One warning per batch that ran out of memory; how far it had to be split is detail.
        (log.warning if depth == 0 else log.debug)(
            "GPU out of memory on a batch of %d prompts; retrying it in halves (batches of at most %d prompts "
            "until %d in a row went through)", rows, self.rows_limit, self.grow_after,
        )  # fmt: skip
        return [pair for half in _halves(batch) for pair in self._run(half, cancel, depth + 1)]

    def _attempt(self, batch: list[_Unit], cancel: threading.Event | None) -> list[tuple[int, Answer]]:
        if self.share_prefix:
            shared = self._generate_shared(batch, cancel)
            if shared is not None:
                return shared
        items = [(index, unit.image, prompt) for unit in batch for index, prompt in unit.prompts]
        return self._generate(items, cancel)

    def _grow_back(self) -> None:
        self._since_out_of_memory += 1
        if self.rows_limit < self.batch_size and self._since_out_of_memory >= self.grow_after:
            self.rows_limit = min(self.batch_size, self.rows_limit * 2)
            self._since_out_of_memory = 0
            log.info("batches grow back to %d prompts", self.rows_limit)

    def _cache_length(self, needed: int) -> int:
        """With compilation, round cache lengths up to 512-token buckets so shapes repeat."""
        return -(-needed // 512) * 512 if self.compile else needed

    def _add_special(self, texts: Sequence[str]) -> bool:
        # Templates that render the BOS themselves must not get a second one from the tokenizer.
        bos = self.processor.tokenizer.bos_token
        return not (bos and all(text.startswith(bos) for text in texts))

    @torch.inference_mode()
    def _generate_shared(self, batch: list[_Unit], cancel: threading.Event | None) -> list[tuple[int, Answer]] | None:
        """Each image paid for once: the vision tower and the prompt prefix up to the image's last token run
        once per image, and every prompt of that image continues from that one KV cache as a branch of a
        token tree (see tree.py). None when the prompts do not share a prefix (the caller falls back)."""
        started = time.perf_counter()
        prefilled = []
        for unit in batch:
            image = self._prefill(unit)
            if image is None:
                return None
            prefilled.append(image)
        decode_started = time.perf_counter()
        new_tokens = self.tree.run(prefilled, self._forward, self._step, cancel)
        self.timings["decode"] += time.perf_counter() - decode_started
        prompts = [prompt for unit in batch for _, prompt in unit.prompts]
        lengths = [image.length + len(branch) for image in prefilled for branch in image.branches]
        indices = [index for unit in batch for index, _ in unit.prompts]
        return self._answers(indices, prompts, new_tokens, lengths, started)

    def _prefill(self, unit: _Unit) -> Prefilled | None:
        """One image alone: no padding, so attention runs causal without a mask (sdpa's fastest kernels)."""
        started = time.perf_counter()
        pixels = (unit.pixels or self._pixels_ahead(unit.image)).result()
        placeholder = compat.image_placeholder(self.processor, pixels)  # as many image tokens as features
        texts = [self.render(prompt).replace(self.processor.image_token, placeholder) for _, prompt in unit.prompts]
        add_special = self._add_special(texts)
        full = [self.processor.tokenizer(text, add_special_tokens=add_special)["input_ids"] for text in texts]
        ids = full[0]
        length = len(ids) - ids[::-1].index(self.image_id)
        if any(f[:length] != ids[:length] or len(f) == length for f in full):
            return None
        prefill_started = time.perf_counter()
        self.timings["preprocess"] += prefill_started - started
        output = self.model(
            input_ids=torch.tensor([ids[:length]], device=self.device),
            pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
            image_sizes=pixels["image_sizes"].to(self.device),
            use_cache=True,
            logits_to_keep=1,  # only the cache is needed; skip the vocabulary projection of 2,000+ tokens
        )
        self.timings["vision+prefill"] += time.perf_counter() - prefill_started
        layers = _prefix_layers(compat.output_cache(output, self.cache_argument), length)
        if layers is None:
            return None
        return Prefilled(layers, length, [f[length:] for f in full], [p.max_new_tokens for _, p in unit.prompts])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        logits: torch.Tensor = self.model(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{self.cache_argument: cache}
        ).logits
        return logits

    @torch.inference_mode()
    def _generate(
        self, items: list[tuple[int, Image.Image, Prompt]], cancel: threading.Event | None
    ) -> list[tuple[int, Answer]]:
        """The plain path: each prompt with its own copy of the image, left-padded into one batch."""
        started = time.perf_counter()
        texts = [self.render(prompt) for _, _, prompt in items]
        inputs = self.processor(
            images=[image for _, image, _ in items],
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=self._add_special(texts),
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generate_started = time.perf_counter()
        self.timings["preprocess"] += generate_started - started
        prompts = [prompt for _, _, prompt in items]
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(p.max_new_tokens for p in prompts),
            disable_compile=not self.compile,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]) if cancel is not None else None,
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
            text = self.processor.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append((index, Answer(text=text, prompt_tokens=length, new_tokens=len(kept), seconds=share)))
        return answers

    def _until_eos(self, tokens: list[int]) -> Iterator[int]:
        for token in tokens:
            if token in self.eos_ids:
                return
            yield token


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


def _attention(config: ModelConfig) -> str:
    """sdpa becomes its tree-decoding variant (the same kernels; see tree.grouped_sdpa)."""
    return register_attention() if config.attn_implementation == "sdpa" else config.attn_implementation


def _max_image_side(processor: Any) -> int | None:
    """The longest side any anyres grid asks for: decoding a photo bigger than this is wasted work."""
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if not pinpoints:
        return None
    return max(max(pair) for pair in pinpoints)
