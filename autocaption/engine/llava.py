"""LLaVA-NeXT through HuggingFace transformers, loaded once and kept resident on the GPU.

This is the only module that imports torch and transformers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from autocaption.config import ModelConfig
from autocaption.engine.base import Answer, Cancelled, EngineInfo, Job, Prompt
from autocaption.engine.devices import Accelerator, place
from autocaption.errors import EngineError, ModelUnavailable

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _accelerator() -> Accelerator:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Accelerator(
        gpu_count=count,
        hip_version=getattr(torch.version, "hip", None),
        cuda_version=torch.version.cuda,
        bf16_supported=count > 0 and torch.cuda.is_bf16_supported(),
        names=tuple(torch.cuda.get_device_name(i) for i in range(count)),
    )


def _model_source(model: ModelConfig) -> tuple[str, bool]:
    """Where to load from and whether to stay off the network."""
    local = Path(os.path.expanduser(model.id))
    if local.is_dir():
        return str(local), True
    if model.id.startswith(("/", "./", "../", "~")) or local.exists():
        raise ModelUnavailable(f"model.id: {model.id}: no such model folder")
    return model.id, model.local_files_only


def _unavailable(model: ModelConfig, exc: Exception) -> ModelUnavailable:
    if Path(os.path.expanduser(model.id)).is_dir():
        return ModelUnavailable(f"model.id: {model.id}: not a usable model folder ({exc})")
    return ModelUnavailable(
        f"model {model.id!r} is not on this machine and cannot be downloaded ({type(exc).__name__}). "
        "Put a local model folder in model.id, or allow network access to huggingface.co once so it is "
        "cached in $HF_HOME (unset HF_HUB_OFFLINE, model.local_files_only: false)."
    )


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the daemon is asked to stop (SIGTERM)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _Item:
    image: Image.Image
    prompt: Prompt


class LlavaEngine:
    """`Engine` on `LlavaNextForConditionalGeneration`; greedy decoding, left-padded batches."""

    def __init__(self, model: Any, processor: Any, info: EngineInfo, batch_size: int) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.device = torch.device(info.device.split(" ", 1)[0])
        self.dtype = _DTYPES[info.dtype]
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    @classmethod
    def load(cls, config: ModelConfig) -> LlavaEngine:
        placement = place(config.device, config.dtype, _accelerator())
        if placement.warning:
            log.warning(placement.warning)
        source, offline = _model_source(config)
        hf_logging.disable_progress_bar()  # a tqdm bar per load is noise in a service log
        started = time.perf_counter()
        try:
            revision = config.revision or "main"
            processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=offline)
            model: Any = LlavaNextForConditionalGeneration.from_pretrained(
                source,
                revision=revision,
                local_files_only=offline,
                dtype=_DTYPES[placement.dtype],
                attn_implementation=config.attn_implementation,
            )
        except (OSError, ValueError) as exc:
            raise _unavailable(config, exc) from None
        except ImportError as exc:  # flash_attention_2 asked for but not installed
            raise ModelUnavailable(f"model.attn_implementation: {config.attn_implementation}: {exc}") from None
        model = model.to(placement.device).eval()
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
        return cls(model, processor, info, config.batch_size)

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
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
        items = [_Item(job.image, prompt) for job in jobs for prompt in job.prompts]
        answers: list[Answer] = []
        for start in range(0, len(items), self.batch_size):
            answers.extend(self._run(items[start : start + self.batch_size], cancel))
            if cancel is not None and cancel.is_set():
                raise Cancelled()
        result: list[list[Answer]] = []
        flat = iter(answers)
        for job in jobs:
            result.append([next(flat) for _ in job.prompts])
        return result

    def _run(self, batch: list[_Item], cancel: threading.Event | None) -> list[Answer]:
        """Generate for one batch; on GPU out-of-memory split it in halves (nothing is lost)."""
        try:
            return self._generate(batch, cancel)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise EngineError("GPU out of memory on a single image", transient=True) from None
            half = len(batch) // 2
            log.warning("GPU out of memory with %d prompts in a batch; retrying as two halves", len(batch))
            return self._run(batch[:half], cancel) + self._run(batch[half:], cancel)

    @torch.inference_mode()
    def _generate(self, batch: list[_Item], cancel: threading.Event | None) -> list[Answer]:
        started = time.perf_counter()
        texts = [self.render(item.prompt) for item in batch]
        bos = self.processor.tokenizer.bos_token
        # Templates that render the BOS themselves must not get a second one from the tokenizer.
        add_special = not (bos and all(text.startswith(bos) for text in texts))
        inputs = self.processor(
            images=[item.image for item in batch],
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(item.prompt.max_new_tokens for item in batch),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]) if cancel is not None else None,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        share = (time.perf_counter() - started) / len(batch)
        answers = []
        for item, tokens, prompt_length in zip(batch, new_tokens, prompt_lengths, strict=True):
            kept = list(self._until_eos(tokens[: item.prompt.max_new_tokens]))
            text = self.processor.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append(Answer(text=text, prompt_tokens=int(prompt_length), new_tokens=len(kept), seconds=share))
        return answers

    def _until_eos(self, tokens: list[int]) -> Iterator[int]:
        for token in tokens:
            if token in self.eos_ids:
                return
            yield token


def _max_image_side(processor: Any) -> int | None:
    """The longest side any anyres grid asks for: decoding a photo bigger than this is wasted work."""
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if not pinpoints:
        return None
    return max(max(pair) for pair in pinpoints)
