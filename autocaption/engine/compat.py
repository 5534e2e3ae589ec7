"""The transformers internals the engine leans on, fenced in one module.

Tree decoding needs more than transformers' public API: a preallocated per-layer cache it fills itself,
its own attention implementation registered beside sdpa, the processor's image-token expansion, and
the model's cache under whichever name this release uses. These change between minor releases (5.24
renamed `past_key_values` to `cache`), so every use goes through here, and `problems()` checks each
one by name at start and in a compatibility test, which fails naming the installed version.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

VERSION = transformers.__version__

__all__ = ["VERSION", "Cache", "sdpa_attention_forward"]


def problems() -> list[str]:
    """What of the fenced internals this transformers release lacks (empty when all is there)."""
    missing = []
    layer = StaticLayer(max_cache_len=4)
    for name in ("lazy_initialization",):
        if not callable(getattr(layer, name, None)):
            missing.append(f"StaticLayer.{name}")
    if "layers" not in inspect.signature(Cache.__init__).parameters:
        missing.append("Cache(layers=...)")
    for interface in (AttentionInterface, AttentionMaskInterface):
        if not callable(getattr(interface, "register", None)):
            missing.append(f"{interface.__name__}.register")
    return missing


def cache_argument(model: Any) -> str:
    """The name under which this model's forward takes and returns its KV cache: `cache` from 5.24 on,
    `past_key_values` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any, argument: str) -> Any:
    return getattr(output, argument)


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """An attention implementation models can be loaded with, with sdpa's masks."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def static_layer(keys: torch.Tensor, values: torch.Tensor, slots: int) -> Any:
    """A cache layer of `slots` positions, shaped like `keys`/`values` along every other dimension (their
    length is ignored); the caller fills its `.keys`/`.values` in place. `Cache(layers=[...])` holds them."""
    layer: Any = StaticLayer(max_cache_len=slots)
    layer.lazy_initialization(keys, values)
    return layer


def set_length(layer: Any, length: int) -> None:
    """Where the next tokens written through the model go (after the longest prefix)."""
    layer.cumulative_length.fill_(length)


def image_tokens(processor: Any, height: int, width: int) -> int | None:
    """How many image tokens a photo of this size becomes (for packing batches), when the processor can say
    without processing it (most 5.x processors: `_get_num_multimodal_tokens`); None otherwise."""
    try:
        counts = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        return int(counts["num_image_tokens"][0])
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, NotImplementedError):
        return None
