"""The vision-language families autocaption runs in-process, and what differs between them.

Every family loads through transformers' Auto classes and prompts through the checkpoint's own chat
template; what differs is how its rules are decoded and how its images are prepared:

- **tree**: the rules of one image are branches over that image's single prefill (tree.py). Correct for
  families with 1-D positions whose image comes before the prompt text — and checked per image at run
  time (the expanded prompt must be prefix + image + text), with a fallback to the batched path.
- **batched**: left-padded batches of (image, rule) pairs through `generate`, for families whose
  positions depend on the image (Qwen's 3-D rotary positions) and any image-text-to-text model that is
  not in the table.

Nothing here imports torch; the engine (local.py) asks these questions of the loaded processor.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from autocaption.errors import ModelUnavailable


@dataclass(frozen=True)
class Family:
    model_type: str  # the checkpoint's config.json `model_type`
    label: str
    tree: bool
    nested_images: bool = False  # the processor takes one list of images per prompt: images=[[a], [b]]
    needs: tuple[str, ...] = ()  # Python packages its processor needs beyond autocaption's own
    why_batched: str = ""  # why the tree path is not used
    tested: bool = True  # built and checked in autocaption's tests (tests/families.py)


_QWEN = "3-D rotary positions that depend on the image"
FAMILIES = {
    family.model_type: family
    for family in (
        Family("llava_next", "LLaVA-NeXT", tree=True),
        Family("llava", "LLaVA (JoyCaption, LLaVA-1.5)", tree=True),
        Family("llava_onevision", "LLaVA-OneVision", tree=True, needs=("torchvision",)),
        Family("gemma3", "Gemma 3", tree=True, nested_images=True),
        Family("idefics3", "Idefics3 (SmolVLM)", tree=True, nested_images=True),
        Family("smolvlm", "SmolVLM2", tree=True, nested_images=True, needs=("torchvision", "num2words")),
        Family("qwen2_vl", "Qwen2-VL", tree=False, needs=("torchvision",), why_batched=_QWEN),
        Family("qwen2_5_vl", "Qwen2.5-VL", tree=False, needs=("torchvision",), why_batched=_QWEN),
        Family("qwen3_vl", "Qwen3-VL", tree=False, needs=("torchvision",), why_batched=_QWEN),
    )
}
# Architectures whose code lives in their repository (trust_remote_code): autocaption does not run it.
REMOTE_CODE = {"minicpmv": "MiniCPM-V", "molmo": "Molmo", "cogvlm2": "CogVLM2", "moondream1": "Moondream",
               "phi3_v": "Phi-3-Vision", "internvl_chat": "InternVL (remote-code checkpoints)"}  # fmt: skip
NOT_CHAT = {"florence2": "Florence-2 takes task tokens (<MORE_DETAILED_CAPTION>), not chat prompts"}
SMALLER = (  # suggested when a model does not fit: (checkpoint, approximate bf16 weights in GB)
    ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", 1.8),
    ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", 4.5),
    ("Qwen/Qwen2.5-VL-3B-Instruct", 7.5),
    ("google/gemma-3-4b-it", 8.6),
    ("Qwen/Qwen2.5-VL-7B-Instruct", 16.6),
)


def family_of(config: dict[str, Any], model_id: str, *, image_text_to_text: set[str], known: set[str]) -> Family:
    """The family of a checkpoint's config.json, or ModelUnavailable with one line saying why not.
    `image_text_to_text`: model types transformers' AutoModelForImageTextToText loads; `known`: every
    model type this transformers release knows."""
    model_type = str(config.get("model_type") or "")
    if model_type in REMOTE_CODE or (config.get("auto_map") and model_type not in known):
        name = REMOTE_CODE.get(model_type, model_type or "this architecture")
        raise ModelUnavailable(
            f"model {model_id!r}: {name} needs code from its own repository (trust_remote_code), which autocaption "
            "does not run; serve it with vLLM or SGLang and use model.engine: openai"
        )
    if model_type in NOT_CHAT:
        raise ModelUnavailable(f"model {model_id!r}: {NOT_CHAT[model_type]}; autocaption asks chat prompts")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in image_text_to_text:
        raise ModelUnavailable(
            f"model {model_id!r} (model_type {model_type or 'unknown'!r}) is not an image-text-to-text model this "
            "transformers release can load"
        )
    return Family(model_type, model_type, tree=False, tested=False, why_batched="not among the tested families")


def missing_packages(family: Family) -> list[str]:
    return [name for name in family.needs if importlib.util.find_spec(name) is None]


def max_image_side(processor: Any) -> int | None:
    """The longest side the processor can make use of: photos bigger than this are decoded smaller by JPEG DCT
    scaling (never below it on either side). None: decode at full size."""
    image = getattr(processor, "image_processor", None)
    pinpoints = getattr(image, "image_grid_pinpoints", None)
    if pinpoints:  # LLaVA-NeXT, OneVision: the largest anyres grid
        return int(max(max(pair) for pair in pinpoints))
    size = getattr(image, "size", None)

    def field(name: str) -> Any:  # image processors keep sizes as dicts or as SizeDict objects
        return size.get(name) if isinstance(size, dict) else getattr(size, name, None)

    pixels = getattr(image, "max_pixels", None) or field("max_pixels")
    if not pixels and field("shortest_edge") and field("longest_edge"):
        pixels = field("longest_edge")  # Qwen keeps its pixel budget as {shortest, longest}_edge
    if pixels:  # an area budget: a square of that area bounds the short side it can need
        return math.ceil(math.sqrt(pixels))
    sides = [int(field(name)) for name in ("longest_edge", "height", "width", "shortest_edge") if field(name)]
    return max(sides) if sides else None
