"""Packing an engine request into batches: one unit per image (its prompts share a prefill on the tree
path) or per prompt (the batched path), batches bounded by prompts, images and, where one forward prefills
the whole batch, tokens; a batch that ran out of GPU memory split in halves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from autocaption.engine import compat
from autocaption.engine.base import Prompt
from autocaption.engine.memory import TYPICAL_IMAGE_TOKENS


@dataclass(frozen=True)
class TreeInputs:
    """One image's prefill and its prompts' branches, prepared by the processor on the worker thread."""

    prefix: list[int]  # tokens through the image's last token
    branches: list[list[int]]  # each prompt's tokens after the prefix
    tensors: dict[str, torch.Tensor]  # pixel values and the like, per-token ones cut to the prefix

    def only(self, keep: Sequence[int]) -> TreeInputs:
        return TreeInputs(self.prefix, [self.branches[i] for i in keep], self.tensors)


@dataclass(frozen=True)
class Unit:
    """One image and prompts that share its prefix: (index in the flattened request, prompt)."""

    image: Image.Image
    prompts: list[tuple[int, Prompt]]
    prepared: Callable[[], TreeInputs | None] | None  # tree path: waits for the worker's result


def rows(batch: list[Unit]) -> int:
    return sum(len(unit.prompts) for unit in batch)


def halves(batch: list[Unit]) -> list[list[Unit]]:
    if len(batch) > 1:
        return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    unit = batch[0]  # one image with several prompts: split its prompts
    half = len(unit.prompts) // 2
    return [[subset(unit, range(half))], [subset(unit, range(half, len(unit.prompts)))]]


def subset(unit: Unit, keep: range) -> Unit:
    parent = unit.prepared

    def prepared() -> TreeInputs | None:
        inputs = parent() if parent else None
        return inputs.only(keep) if inputs else None

    return Unit(unit.image, [unit.prompts[i] for i in keep], prepared if parent else None)


def pack(
    units: list[Unit], processor: Any, *, rows_limit: int, max_images: int, tokens_limit: int | None
) -> list[list[Unit]]:
    """Batches of at most `rows_limit` prompts and `max_images` images, in order; an image with more prompts
    than that is a batch of its own; with `tokens_limit` also at most that many image+prompt tokens."""
    batches: list[list[Unit]] = []
    rows = tokens = 0
    for unit in units:
        cost = compat.image_tokens(processor, unit.image.height, unit.image.width) or TYPICAL_IMAGE_TOKENS
        fits = rows + len(unit.prompts) <= rows_limit and (tokens_limit is None or tokens + cost <= tokens_limit)
        if batches and fits and len(batches[-1]) < max_images:
            batches[-1].append(unit)
            rows, tokens = rows + len(unit.prompts), tokens + cost
        else:
            batches.append([unit])
            rows, tokens = len(unit.prompts), cost
    return batches
