"""Will the model fit? Estimated from the checkpoint's files before anything is loaded, so a model too big
for the card is one line with smaller choices, not an out-of-memory traceback after minutes of loading.

Weights: the safetensors index's total size, else the size of the weight files. KV cache: per token,
2 (keys, values) x layers x key/value heads x head size x bytes, for the image tokens of one photo.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocaption.engine.families import SMALLER

GB = 1e9
GiB = 2**30
TYPICAL_IMAGE_TOKENS = 3000  # a photo's image tokens: LLaVA-NeXT's most (others use fewer)
WORKING = 1 * GiB  # activations of a prefill and the allocator's slack, beyond weights and KV cache
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Need:
    weights: int  # bytes of weights in the dtype they are loaded in
    kv_per_image: int  # bytes of KV cache for one photo's image tokens
    parameters: int  # approximate parameter count

    @property
    def total(self) -> int:
        """Enough for one batch of one photo: the least a run needs."""
        return self.weights + self.kv_per_image + WORKING


def weight_bytes(
    folder: Path, settings: dict[str, Any], listed: Callable[[], int | None] | None = None
) -> tuple[int, int]:
    """(bytes on disk, bytes per stored parameter) of the weights in a checkpoint folder whose config.json
    says `settings`; where the folder holds no weights yet (a model about to be downloaded: its config.json
    alone is there), what `listed` says the hub holds; (0, 2) if unknown."""
    index = folder / "model.safetensors.index.json"
    text = settings.get("text_config")
    dtype = (
        settings.get("dtype") or settings.get("torch_dtype") or (text.get("dtype") if isinstance(text, dict) else None)
    )
    stored = _BYTES.get(str(dtype), 2)
    try:
        total = int(json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"])
        return total, stored
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    on_disk = sum(path.stat().st_size for path in files)
    if not on_disk and listed is not None:
        on_disk = listed() or 0
    return on_disk, stored


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    heads = getattr(text_config, "num_attention_heads", 0) or 0
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or (getattr(text_config, "hidden_size", 0) // max(heads, 1))
    layers = getattr(text_config, "num_hidden_layers", 0) or 0
    return int(2 * layers * kv_heads * head_dim * dtype_bytes)


def need(
    folder: Path, settings: dict[str, Any], text_config: Any, dtype: str, image_tokens: int,
    listed: Callable[[], int | None] | None = None,
) -> Need | None:  # fmt: skip
    """What loading the checkpoint in `folder` (config.json: `settings`) as `dtype` needs, or None when its
    size cannot be told (`listed`: see weight_bytes)."""
    on_disk, stored = weight_bytes(folder, settings, listed)
    if not on_disk:
        return None
    loaded = _BYTES.get(dtype, 2)
    kv = kv_bytes_per_token(text_config, loaded) * image_tokens
    return Need(on_disk * loaded // stored, kv, on_disk // stored)


def too_big(model_id: str, needed: Need, free: int, device: str, dtype: str = "bfloat16") -> str:
    """The one line that says it does not fit, and what would (in `dtype`: float32 on the CPU doubles the
    suggested models' bf16 sizes)."""
    scale = _BYTES.get(dtype, 2) / 2
    fits = [name for name, size in SMALLER if size * GB * scale * 1.15 + WORKING < free and name != model_id]
    choices = f"; models that fit: {', '.join(fits)}" if fits else "; no suggested model fits in what is free"
    return (
        f"model {model_id!r} needs about {needed.total / GiB:.1f} GiB on {device} ({needed.weights / GiB:.1f} GiB of "
        f"weights, {needed.kv_per_image / GiB:.2f} GiB of KV cache per photo), but {free / GiB:.1f} GiB are free"
        f"{choices} (model.id)"
    )


CPU_PROMPTS = 12  # prompts per batch on the CPU: what measured best on 2 cores (bench/README.md)
# Images per batch of the tree decoder are padded up to one of these (its persistent states, tree.py): a step
# reads the whole padded cache, so neighbouring buckets are at most 1.5x apart (1.25x from 16 up).
IMAGE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32)
LARGEST_BATCH = IMAGE_BUCKETS[-1]
SLOTS_PER_IMAGE = TYPICAL_IMAGE_TOKENS + 600  # a photo's image tokens, its prompts and their answers


@dataclass(frozen=True)
class BatchPlan:
    images: int  # at most, per batch
    prompts: int  # at most, per batch
    kv_budget: int | None  # bytes of KV cache the batches may use together (None: not limited)

    def line(self) -> str:
        budget = f", {self.kv_budget / 1e9:.0f} GB KV budget" if self.kv_budget is not None else ""
        images = min(self.images, self.prompts)  # every image brings at least one prompt
        return f"batches of up to {images} image{'s' if images != 1 else ''} / {self.prompts} prompts{budget}"


def plan_batches(free: int, total: int, kv_per_token: int) -> BatchPlan:
    """`model.batch_size: auto` on a GPU: as many images per batch as the free memory holds the KV cache of
    (a reserve kept for activations and the allocator), at most the largest bucket. Each image counts twice:
    its slots in the batch's decode state, and its prefill's own copy, held until the state takes it over
    (every image of a batch is prefilled first). A bucket's worth, so that no padding row is paid for."""
    reserve = max(int(total * 0.1), 2 * GiB)
    budget = max(free - reserve, 0)
    fits = budget // max(kv_per_token * (SLOTS_PER_IMAGE + TYPICAL_IMAGE_TOKENS), 1)
    images = max((bucket for bucket in IMAGE_BUCKETS if bucket <= fits), default=1)
    return BatchPlan(images=images, prompts=images * 8, kv_budget=budget)
