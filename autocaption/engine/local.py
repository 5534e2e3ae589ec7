"""The in-process engine: any image-text-to-text checkpoint through transformers, loaded once and kept
resident on the GPU (AMD ROCm or NVIDIA) or the CPU.

Two ways to decode, both greedy and equal to a plain one-image, one-prompt `generate`:
- the tree path (families.py says which families): each image's vision tower and prompt prefix run
  once, and every rule of that image continues from that one KV cache as a branch of a token tree;
- the batched path: left-padded batches of (image, rule) pairs through `generate`.

This module and tree.py, compat.py and hardware.py are the only ones that import torch and transformers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from autocaption import dependencies
from autocaption.config import ModelConfig
from autocaption.dependencies import DependencyError
from autocaption.engine import compat, families, hub, memory
from autocaption.engine.base import Answer, Cancelled, EngineInfo, Job, Prompt
from autocaption.engine.devices import Placement, place
from autocaption.engine.families import Family
from autocaption.engine.hardware import accelerator, masked_sdpa_problem, memory_free
from autocaption.engine.memory import TYPICAL_IMAGE_TOKENS, BatchPlan
from autocaption.engine.tree import TREE_ATTENTION, TREE_ATTENTION_MATH, Prefilled, TreeDecoder, register_attention
from autocaption.errors import EngineError, ModelUnavailable
from autocaption.paths import display

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SLOW_ON_CPU = 5e9  # parameters above which the first CPU batch reports how slow it was
COMPILED_SHAPES = 256  # decode-step shapes dynamo may compile in one process (buckets x widths x regrowths)
_PROBE = "autocaption-system-probe"


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the daemon is asked to stop (SIGTERM)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _TreeInputs:
    """One image's prefill and its prompts' branches, prepared by the processor on the worker thread."""

    prefix: list[int]  # tokens through the image's last token
    branches: list[list[int]]  # each prompt's tokens after the prefix
    tensors: dict[str, torch.Tensor]  # pixel values and the like, per-token ones cut to the prefix

    def only(self, keep: Sequence[int]) -> _TreeInputs:
        return _TreeInputs(self.prefix, [self.branches[i] for i in keep], self.tensors)


@dataclass(frozen=True)
class _Unit:
    """One image and prompts that share its prefix: (index in the flattened request, prompt)."""

    image: Image.Image
    prompts: list[tuple[int, Prompt]]
    prepared: Callable[[], _TreeInputs | None] | None  # tree path: waits for the worker's result


def _rows(batch: list[_Unit]) -> int:
    return sum(len(unit.prompts) for unit in batch)


def _halves(batch: list[_Unit]) -> list[list[_Unit]]:
    if len(batch) > 1:
        return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    unit = batch[0]  # one image with several prompts: split its prompts
    half = len(unit.prompts) // 2
    return [[_subset(unit, range(half))], [_subset(unit, range(half, len(unit.prompts)))]]


def _subset(unit: _Unit, keep: range) -> _Unit:
    parent = unit.prepared

    def prepared() -> _TreeInputs | None:
        inputs = parent() if parent else None
        return inputs.only(keep) if inputs else None

    return _Unit(unit.image, [unit.prompts[i] for i in keep], prepared if parent else None)


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
        self.compile = config.compile
        self.graphs = config.graphs and self.device.type == "cuda"
        # One side stream for every warm-up and capture: cuBLAS keeps a workspace per (handle, stream), and one
        # first made during a capture stays in that graph's private pool for good (inductor's cudagraph trees
        # note the same).
        self._capture_stream: Any = None
        self.dtype = _DTYPES[info.dtype]
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
            make_runner=self._runner, bucketed=self.compile or self.graphs, budget_bytes=plan.kv_budget,
            groups=_query_groups(text_config) if attention in (TREE_ATTENTION, TREE_ATTENTION_MATH) else 1, lag=lag,
        )  # fmt: skip
        parameters = sum(parameter.numel() for parameter in model.parameters())
        self._report_cpu_speed = self.device.type == "cpu" and parameters >= SLOW_ON_CPU
        self.parameters = parameters
        path = "tree decoding (each image's rules share its prefill)" if self.share_prefix else "batched decoding"
        reason = family.why_batched or ("prefix sharing needs attn_implementation sdpa" if family.tree else "")
        log.info("%s (%s): %s%s", info.model_id, family.label, path, f" — {reason}" if not self.share_prefix else "")
        log.info("%s%s", plan.line(), "" if config.batch_size is None else " (model.batch_size)")

    @classmethod
    def load(cls, config: ModelConfig, cache_dir: Path | None = None) -> LocalEngine:
        """`cache_dir`: where compiled decode steps are kept between runs (state.dir/torch-compile)."""
        if config.compile and cache_dir is not None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        missing = compat.problems()
        if missing:
            raise DependencyError(
                f"transformers {compat.VERSION} lacks what autocaption's engine uses ({', '.join(missing)}); "
                f"install a tested release: pip install 'transformers{dependencies.declared().get('transformers', '')}'"
            )
        acc = accelerator()
        placement = place(config.device, config.dtype, acc)
        if placement.warning:
            log.warning(placement.warning)
        hf_logging.disable_progress_bar()  # a tqdm bar per load is noise in a service log
        started = time.perf_counter()
        revision = config.revision or "main"

        def from_pretrained(source: str, offline: bool) -> tuple[Family, Any, Any]:
            settings, folder = _config_json(source, revision, offline)
            family = families.family_of(
                settings, config.id, image_text_to_text=set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES),
                known=set(CONFIG_MAPPING_NAMES),
            )  # fmt: skip
            _check_packages(family)
            text_config = _text_config(folder)
            _check_memory(config, folder, settings, text_config, placement,
                          listed=None if offline else partial(hub.listed_weights, source, revision))  # fmt: skip
            if Path(source).is_dir():  # a hub download brings its tokenizer files with the processor
                _check_tokenizer(config.id, folder)
            processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=offline)
            loaded: Any = AutoModelForImageTextToText.from_pretrained(
                source, revision=revision, local_files_only=offline, dtype=_DTYPES[placement.dtype],
                attn_implementation=_attention(config, placement, text_config), output_loading_info=True,
            )  # fmt: skip
            model, report = loaded  # output_loading_info: the model and what its load found
            _check_weights(config.id, folder, report)
            return family, processor, model

        try:
            family, processor, model = hub.load(config, from_pretrained)
        except ImportError as exc:  # flash_attention_2 asked for but not installed, a broken torchvision...
            raise ModelUnavailable(f"model {config.id!r} cannot be loaded: {exc}") from None
        model = model.to(placement.device).eval()
        if config.image_grid_pinpoints:
            if not getattr(processor.image_processor, "image_grid_pinpoints", None):
                raise ModelUnavailable(f"model.image_grid_pinpoints: {family.label} has no anyres grid to change")
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
            max_image_side=families.max_image_side(processor),
            system_role=_takes_system(processor),
        )
        plan = _batch_plan(config, model, placement)
        info = dataclasses.replace(info, batch_images=max(1, min(plan.images, plan.prompts)))
        return cls(model, processor, info, config, family, plan)

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
        return _render(self.processor, prompt.text, prompt.system)

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

    def _units(self, jobs: Sequence[Job]) -> list[_Unit]:
        """One unit per image and system text (they share a prefix); one per prompt on the batched path."""
        units: list[_Unit] = []
        index = 0
        for job in jobs:
            by_system: dict[str | None, list[tuple[int, Prompt]]] = {}
            for prompt in job.prompts:
                by_system.setdefault(prompt.system, []).append((index, prompt))
                index += 1
            for group in by_system.values():
                if self.share_prefix:
                    # All prompts of an image in one unit, prefilled once, decoded together even beyond
                    # batch_size (branches of one tree); the processor prepares it ahead on the worker.
                    future = self._preprocessor.submit(self._tree_inputs, job.image, [p for _, p in group])
                    units.append(_Unit(job.image, group, future.result))
                else:
                    units.extend(_Unit(job.image, [item], None) for item in group)
        return units

    def _pack(self, units: list[_Unit]) -> list[list[_Unit]]:
        """Batches of at most `batch_size` prompts; an image with more prompts than `batch_size` is a batch
        of its own. On the batched path also at most `max_batch_tokens` image+prompt tokens, which are
        prefilled in one forward; the tree path prefills one image at a time, so there its batches are
        bounded by the images the KV budget holds (`batch_size: auto`), not by that."""
        return self._packed(units, tokens_limit=None if self.share_prefix else self.max_batch_tokens)

    def _packed(self, units: list[_Unit], tokens_limit: int | None) -> list[list[_Unit]]:
        batches: list[list[_Unit]] = []
        rows = tokens = 0
        for unit in units:
            cost = compat.image_tokens(self.processor, unit.image.height, unit.image.width) or TYPICAL_IMAGE_TOKENS
            fits = rows + len(unit.prompts) <= self.rows_limit and (
                tokens_limit is None or tokens + cost <= tokens_limit
            )
            if batches and fits and len(batches[-1]) < self.max_images:
                batches[-1].append(unit)
                rows, tokens = rows + len(unit.prompts), tokens + cost
            else:
                batches.append([unit])
                rows, tokens = len(unit.prompts), cost
        return batches

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
        self.tree.release()
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
            # The batched path prefills the whole batch in one forward: packed again within max_batch_tokens.
            units = [_Unit(unit.image, [item], None) for unit in batch for item in unit.prompts]
            parts = self._packed(units, self.max_batch_tokens)
        else:
            parts = [batch]
        return [
            pair
            for part in parts
            for pair in self._generate(
                [(index, unit.image, prompt) for unit in part for index, prompt in unit.prompts], cancel
            )
        ]

    def _grow_back(self) -> None:
        self._since_out_of_memory += 1
        if self.rows_limit < self.batch_size and self._since_out_of_memory >= self.grow_after:
            self.rows_limit = min(self.batch_size, self.rows_limit * 2)
            self._since_out_of_memory = 0
            log.info("batches grow back to %d prompts", self.rows_limit)

    def _runner(self, step: Callable[[], None]) -> Callable[[], None]:
        """What runs a bucket's decode step: the step itself, compiled (inductor, whole graph, fixed shapes:
        any later recompile would be a bug), and on a GPU captured as a graph."""
        if self.compile:
            step = _Compiled(step, on_refusal=self._compile_refused)
        if not self.graphs:
            return step
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        return _Captured(step, self.device, self._capture_stream, on_refusal=self._capture_refused)

    # A refusal is said once and holds for every later bucket; the bucket that met it runs its step as it is.
    # Padding batches up to buckets only pays where a step is compiled or captured.

    def _compile_refused(self, reason: str) -> None:
        # Some torch/transformers pairs cannot trace the model's forward as one graph (torch 2.6 with
        # transformers 5.5 stops at the output-capturing decorator): decode uncompiled rather than fail.
        log.warning(
            "model.compile: torch %s cannot compile the decode step with transformers %s (%s); decoding "
            "uncompiled", torch.__version__, compat.VERSION, reason,
        )  # fmt: skip
        self.compile = False
        self.tree.set_bucketed(self.graphs)

    def _capture_refused(self, reason: str) -> None:
        log.warning("decode steps run without CUDA/HIP graphs: the capture failed (%s)", reason)
        self.graphs = False
        self.tree.set_bucketed(self.compile)  # the padded states nothing replays any more are freed

    def _add_special(self, texts: Sequence[str]) -> bool:
        # Templates that render the BOS themselves must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        return not (bos and all(text.startswith(bos) for text in texts))

    def _images(self, images: list[Image.Image]) -> list[Any]:
        return [[image] for image in images] if self.family.nested_images else list(images)

    # --- the tree path -------------------------------------------------------------------------------------

    def _tree_inputs(self, image: Image.Image, prompts: list[Prompt]) -> _TreeInputs | None:
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
        return _TreeInputs(ids[:length], [around + tail for tail in tails], tensors)

    @torch.inference_mode()
    def _generate_shared(self, batch: list[_Unit], cancel: threading.Event | None) -> list[tuple[int, Answer]] | None:
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
        prefilled = []
        for unit, inputs in zip(batch, prepared, strict=True):
            image = self._prefill(unit, inputs)
            if image is None:
                return None
            prefilled.append(image)
        decode_started = time.perf_counter()
        new_tokens = self.tree.run(prefilled, self._forward, cancel)
        seconds = time.perf_counter() - decode_started
        decoded = self.tree.last
        self.timings["decode"] += seconds
        self.timings["decode steps"] += decoded.steps
        if decoded.reused:  # the bench's steady state: a bucket's later batches, no compile or capture in them
            self.timings["steady decode"] += seconds
            self.timings["steady steps"] += decoded.steps
            self.timings["steady KV read GB"] += decoded.steps * decoded.padded_bytes / 1e9  # what the step reads
            self.timings["steady KV held GB"] += decoded.steps * decoded.held_bytes / 1e9  # what it must read
        prompts = [prompt for unit in batch for _, prompt in unit.prompts]
        lengths = [image.length + len(branch) for image in prefilled for branch in image.branches]
        indices = [index for unit in batch for index, _ in unit.prompts]
        return self._answers(indices, prompts, new_tokens, lengths, started)

    def _prefill(self, unit: _Unit, inputs: _TreeInputs) -> Prefilled | None:
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
        return Prefilled(layers, length, inputs.branches, [p.max_new_tokens for _, p in unit.prompts])

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
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append((index, Answer(text=text, prompt_tokens=length, new_tokens=len(kept), seconds=share)))
        return answers

    def _until_eos(self, tokens: list[int]) -> Iterator[int]:
        for token in tokens:
            if token in self.eos_ids:
                return
            yield token


def _render(processor: Any, text: str, system: str | None) -> str:
    conversation: list[dict[str, Any]] = []
    if system:
        conversation.append({"role": "system", "content": [{"type": "text", "text": system}]})
    conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
    rendered: str = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return rendered


def _takes_system(processor: Any) -> bool:
    """Whether the checkpoint's chat template carries a system turn (some refuse it, some drop it silently)."""
    try:
        return _PROBE in _render(processor, "x", _PROBE)
    except Exception:  # noqa: BLE001 - a template that raises on a system role has none
        return False


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


def _config_json(source: str, revision: str, offline: bool) -> tuple[dict[str, Any], Path]:
    """The checkpoint's config.json and the folder holding it (the local folder, or its cache snapshot)."""
    path = cached_file(source, "config.json", revision=revision, local_files_only=offline)
    if path is None:
        raise OSError(f"{source}: no config.json")
    return json.loads(Path(path).read_text(encoding="utf-8")), Path(path).parent


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_tokenizer(model_id: str, folder: Path) -> None:
    """Without its tokenizer files transformers falls back to building one and says "install sentencepiece",
    which sends people after a package they have: name the missing files instead."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelUnavailable(
            f"model.id: {model_id}: {display(folder)} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the checkpoint, or download it again"
        )


def _check_weights(model_id: str, folder: Path, report: dict[str, Any]) -> None:
    """transformers fills weights missing from a checkpoint with random values (and drops unexpected ones),
    with a warning: such a model writes confident nonsense into people's photos. Refused before any photo."""
    for kind, what in (("missing_keys", "lacks"), ("unexpected_keys", "has weights the model does not know:"),
                       ("mismatched_keys", "has weights of the wrong shape:")):  # fmt: skip
        keys = sorted(str(key if isinstance(key, str) else key[0]) for key in report.get(kind) or ())
        if keys:
            first = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ModelUnavailable(
                f"model.id: {model_id}: the checkpoint in {display(folder)} {what} {first} ({len(keys)} tensor(s)); "
                "it is incomplete or not made for this architecture: download it again or choose another"
            )


def _check_packages(family: Family) -> None:
    missing = families.missing_packages(family)
    if missing:
        hint = " from the index your torch came from (the same ROCm or CUDA build)" if "torchvision" in missing else ""
        raise ModelUnavailable(
            f"{family.label}'s processor needs {' and '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)}{hint}"
        )


def _text_config(folder: Path) -> Any:
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()
    except (OSError, ValueError):
        return None


def _check_memory(
    config: ModelConfig, folder: Path, settings: dict[str, Any], text_config: Any, placement: Placement,
    listed: Callable[[], int | None] | None = None,
) -> None:  # fmt: skip
    """Refuse, before loading anything, a model that cannot fit (weights and one photo's KV cache); a model
    about to be downloaded is measured by what the hub lists (`listed`), before its weights come."""
    if text_config is None:
        return
    needed = memory.need(folder, settings, text_config, placement.dtype, TYPICAL_IMAGE_TOKENS, listed)
    free = memory_free(placement.device)
    if needed is None or free is None:
        return
    if needed.total > free:
        where = "the CPU's memory" if placement.device == "cpu" else placement.description
        raise ModelUnavailable(memory.too_big(config.id, needed, free, where, placement.dtype))


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


def _attention(config: ModelConfig, placement: Placement, text_config: Any) -> str:
    """sdpa becomes its tree-decoding variant (the same kernels; see tree.grouped_sdpa). On a GPU, masked
    attention is first checked against the math kernel on random data of the model's head shapes: where
    a fused kernel gets custom masks wrong (torch 2.6.0+rocm6.2.4, pytorch issue 147460), tree steps use the
    math kernel, said in one warning."""
    if config.attn_implementation != "sdpa":
        return config.attn_implementation
    if placement.device != "cpu":
        heads = getattr(text_config, "num_attention_heads", None) or 32
        head_dim = getattr(text_config, "head_dim", None) or (getattr(text_config, "hidden_size", 4096) // heads)
        problem = masked_sdpa_problem(placement.device, _DTYPES[placement.dtype], heads=heads, head_dim=head_dim)
        if problem:
            log.warning("masked attention on %s disagrees with the math kernel (%s): tree decoding uses the "
                        "math kernel (correct, slower); update torch to get the fast one back", placement.device,
                        problem)  # fmt: skip
            return register_attention(math=True)
    return register_attention()


def _batch_plan(config: ModelConfig, model: Any, placement: Placement) -> BatchPlan:
    """`model.batch_size`, or for `auto`: from the free GPU memory after loading; a fixed size on the CPU."""
    if config.batch_size is not None:
        return BatchPlan(images=memory.LARGEST_BATCH, prompts=config.batch_size, kv_budget=None)
    if placement.device == "cpu":
        return BatchPlan(images=memory.LARGEST_BATCH, prompts=memory.CPU_PROMPTS, kv_budget=None)
    free, total = torch.cuda.mem_get_info(torch.device(placement.device))
    dtype_bytes = torch.finfo(_DTYPES[placement.dtype]).bits // 8
    kv = memory.kv_bytes_per_token(model.config.get_text_config(), dtype_bytes)
    return memory.plan_batches(int(free), int(total), kv)


class _Compiled:
    """A decode step through inductor: whole graph (fullgraph), fixed shapes, so any later recompile would
    be a bug. Tracing happens on the first call, before anything of the step runs; should torch refuse it,
    the step runs as it is from then on and `on_refusal` hears why."""

    def __init__(self, step: Callable[[], None], on_refusal: Callable[[str], None]) -> None:
        import torch._dynamo

        # Every bucket's step is the same code to dynamo: one entry per (rows, width, slots) shape. Its
        # default of 8 would end in a hard failure (fullgraph) at the 9th bucket of a long-running daemon.
        config = torch._dynamo.config
        for names in (("recompile_limit", "cache_size_limit"),  # (the names before torch 2.7)
                      ("accumulated_recompile_limit", "accumulated_cache_size_limit")):  # fmt: skip
            name = next((n for n in names if hasattr(config, n)), None)
            if name is not None:
                setattr(config, name, max(getattr(config, name), COMPILED_SHAPES))
        self.plain = step
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False)
        self.on_refusal = on_refusal
        self.run: Callable[[], None] | None = None  # (not a bound method of self: no cycle before the first call)

    def __call__(self) -> None:
        (self.run or self._first)()

    def _first(self) -> None:
        # Tracing (Unsupported), the backend (BackendCompilerFailed) and fake-tensor runs all raise this; so
        # does a step past the recompile limit. Any other error is one of the step itself (out of memory) and
        # goes to the caller.
        from torch._dynamo import exc as dynamo

        names = ("TorchDynamoException", "FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # (the last: torch < 2.7)
        refusals = tuple(getattr(dynamo, name) for name in names if hasattr(dynamo, name))
        try:
            self.compiled()
        except refusals as exc:
            self.run = self.plain
            self.on_refusal(_first_line(exc))
            self.plain()
            return
        self.run = self.compiled


@contextlib.contextmanager
def _processing(images: Sequence[Image.Image], family: str) -> Iterator[None]:
    """A processor that cannot take an image (Qwen2-VL: "absolute aspect ratio must be smaller than 200" for a
    10000x20 panorama) is that image's failure, not the engine's: the caller finds the one image in the batch
    and describes the others."""
    try:
        yield
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
        raise EngineError(f"the {family} processor cannot take this image ({sizes}): {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


class _Captured:
    """A decode step as a CUDA/HIP graph: on its first call it runs once for real (on a side stream: the
    warm-up the capture needs) and is recorded; every later call replays the recording, one launch instead
    of ~2,000. Its buffers are the bucket's persistent state, so the recording stays valid. Should a build
    refuse the capture, the step runs as it is from then on and `on_refusal` hears why."""

    def __init__(self, step: Callable[[], None], device: torch.device, stream: Any,
                 on_refusal: Callable[[str], None]) -> None:  # fmt: skip
        self.step = step
        self.device = device
        self.stream = stream  # the engine's one capture stream
        self.on_refusal = on_refusal
        # Not `self._first` (a bound method: runner -> itself, and the step's state, kept until a gc when the
        # first call never comes or raises out of memory).
        self.run: Callable[[], None] | None = None

    def __call__(self) -> None:
        (self.run or self._first)()

    def _first(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.step()  # a real step, and the warm-up of what gets recorded (on the stream that records it)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        try:
            self.run = _capture(self.step, self.device, self.stream)
        except torch.cuda.OutOfMemoryError:
            # Not a refusal: the engine retries the batch in halves, whose buckets capture again.
            raise
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            self.run = self.step
            self.on_refusal(_first_line(exc))


def _capture(step: Callable[[], None], device: torch.device, stream: Any) -> Callable[[], None]:
    """`step` recorded (not run) as a CUDA/HIP graph on `stream`; what replays it. Whatever the step raises,
    the capture is ended, its memory pool handed back, and the thread's current stream is the one it was:
    torch.cuda.graph's context manager leaves its capture stream current when the body raised, and with it
    every later kernel of the process. Errors are those of this thread only (thread_local): the
    preprocessing thread works on while the step records."""
    torch.cuda.empty_cache()  # while a capture is under way the allocator cannot give cached blocks back
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            step()  # recorded, not run
        except BaseException:
            try:
                graph.capture_end()
            except RuntimeError:  # the capture was invalidated: capture_end threw before releasing the pool
                _abandon_pool(device, pool)
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay


def _abandon_pool(device: torch.device, pool: Any) -> None:
    """What a failed capture_end leaves undone (it throws at cudaStreamEndCapture, before ending the pool):
    without it the caching allocator believes a capture is still under way, and from then on empty_cache()
    frees nothing and an allocation that fails never retries after freeing the cache."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
        torch._C._cuda_releasePool(index, pool)
    except (AttributeError, RuntimeError) as exc:  # private API: a build without it keeps the pool
        log.warning("%s: the failed capture's memory pool could not be handed back (%s); empty_cache() may "
                    "free nothing until the process restarts", device, _first_line(exc))  # fmt: skip
