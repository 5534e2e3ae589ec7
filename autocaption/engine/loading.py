"""Loading a checkpoint for the in-process engine: from a folder, the cache or the hub (hub.py), each check
made before the weights are read or downloaded (packages, tokenizer files, memory against the device), the
attention kernel chosen, and the batch plan from the memory left. What comes out is everything LocalEngine
needs to decode; nothing here decodes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from autocaption import dependencies
from autocaption.config import ModelConfig
from autocaption.dependencies import DependencyError
from autocaption.engine import compat, families, hub, memory
from autocaption.engine.base import EngineInfo
from autocaption.engine.devices import Placement, place
from autocaption.engine.families import Family
from autocaption.engine.hardware import accelerator, masked_sdpa_problem, memory_free
from autocaption.engine.memory import TYPICAL_IMAGE_TOKENS, BatchPlan
from autocaption.engine.tree import register_attention
from autocaption.errors import ModelUnavailable
from autocaption.paths import display

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PROBE = "autocaption-system-probe"


@dataclass(frozen=True)
class Loaded:
    """A checkpoint ready to decode: what LocalEngine is made of."""

    model: Any
    processor: Any
    info: EngineInfo
    family: Family
    plan: BatchPlan


def load(config: ModelConfig, cache_dir: Path | None = None) -> Loaded:
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
            source, revision=revision, local_files_only=offline, dtype=DTYPES[placement.dtype],
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
    return Loaded(model, processor, info, family, plan)


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
        problem = masked_sdpa_problem(placement.device, DTYPES[placement.dtype], heads=heads, head_dim=head_dim)
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
    dtype_bytes = torch.finfo(DTYPES[placement.dtype]).bits // 8
    kv = memory.kv_bytes_per_token(model.config.get_text_config(), dtype_bytes)
    return memory.plan_batches(int(free), int(total), kv)


def render(processor: Any, text: str, system: str | None) -> str:
    """The processor's own chat template applied to one user turn (the image, then the text), a system turn first
    when `system` is set."""
    conversation: list[dict[str, Any]] = []
    if system:
        conversation.append({"role": "system", "content": [{"type": "text", "text": system}]})
    conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
    rendered: str = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return rendered


def _takes_system(processor: Any) -> bool:
    """Whether the checkpoint's chat template carries a system turn (some refuse it, some drop it silently)."""
    try:
        return _PROBE in render(processor, "x", _PROBE)
    except Exception:  # noqa: BLE001 - a template that raises on a system role has none
        return False
