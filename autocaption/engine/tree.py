"""Tree decoding: every prompt of an image continues from that image's single prefill, never a copy of it.

The prompts of one image are branches of one sequence. Its prefix (template, vision tokens, up to the
image's last token) is in the KV cache once; each prompt's remaining tokens and then its answer follow as
a branch that sees the prefix and its own earlier tokens only (a 4D attention mask) and is numbered with
position ids as if it came straight after the prefix, so every branch computes exactly what a one-prompt
`generate` computes. A decode step feeds one token per branch of every image in the batch: the prefix is
read once per image and step instead of once per prompt, and no per-prompt copy of it is ever made (on a
GPU that is 2,300 tokens x 32 layers, ~300 MB in bf16, per extra prompt).

Only the in-process engine (`local.py`) imports this module; it needs torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from autocaption.engine import compat
from autocaption.engine.compat import Cache, sdpa_attention_forward

# The attention implementation tree decoding runs on: sdpa, with grouped-query heads folded (below).
TREE_ATTENTION = "autocaption_sdpa"

_RELEASED = torch.empty(0)  # what a prefix layer is replaced with once the batch cache holds it

# (input_ids, position_ids, 4D additive attention mask, cache) -> logits [batch, queries, vocabulary]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache], torch.Tensor]


@dataclass
class Prefilled:
    """One image after its prefill: the prefix's keys and values per layer and the prompts that continue."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # [1, kv heads, length, head dim]; emptied once batched
    length: int  # prefix tokens
    branches: list[list[int]]  # each prompt's tokens after the prefix (at least one)
    limits: list[int]  # each prompt's max_new_tokens


@dataclass
class _Layout:
    """Where every token of the batch lives in the shared cache: slots [0, prefix) hold each image's prefix,
    then each image's branches back to back, then `width` new slots (one per branch) per decode step."""

    prefix: int  # slots reserved for the longest prefix
    suffix: int  # slots reserved for the longest run of branches
    width: int  # branches of the image with the most
    offsets: list[list[int]]  # [image][branch] -> first suffix slot, relative to `prefix`

    @classmethod
    def of(cls, images: list[Prefilled]) -> _Layout:
        offsets = []
        for image in images:
            starts, at = [], 0
            for branch in image.branches:
                starts.append(at)
                at += len(branch)
            offsets.append(starts)
        suffix = max(sum(len(b) for b in image.branches) for image in images)
        return cls(max(i.length for i in images), suffix, max(len(i.branches) for i in images), offsets)


class TreeDecoder:
    """Greedy decoding of every branch of a batch of prefilled images at once."""

    def __init__(self, *, pad_id: int, eos_ids: set[int], dtype: torch.dtype, device: torch.device,
                 sliding_window: int | None, bucket: Callable[[int], int]) -> None:  # fmt: skip
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.dtype = dtype
        self.device = device
        self.window = sliding_window
        self.bucket = bucket  # rounds the cache length up (fixed shapes when the decode step is compiled)

    def run(self, images: list[Prefilled], forward: Forward, step: Forward, cancel: threading.Event | None = None
            ) -> list[list[int]]:  # fmt: skip
        """New tokens of every branch, image by image and branch by branch (EOS and beyond dropped).
        `forward` runs the branches' prompt tokens; `step` each later one-token-per-branch step."""
        layout = _Layout.of(images)
        longest = max(limit for image in images for limit in image.limits)
        slots = self.bucket(layout.prefix + layout.suffix + layout.width * max(longest - 1, 0))
        cache = self._cache(images, layout, slots)
        visible, slot_positions = self._prefix_masks(images, layout, slots)
        ids, positions, mask, lasts = self._branch_queries(images, layout, visible, slot_positions)
        logits = forward(ids, positions, self._additive(mask, positions, slot_positions), cache)
        tokens = logits[lasts[0], lasts[1]].argmax(-1).view(len(images), layout.width)
        answers: list[list[int]] = [[] for _ in range(len(images) * layout.width)]
        # Per branch slot, image by image: its max_new_tokens, 0 where an image has fewer branches.
        limits = [limit for image in images for limit in image.limits + [0] * (layout.width - len(image.limits))]
        live = [limit > 0 for limit in limits]
        base = layout.prefix + layout.suffix
        next_positions = torch.tensor(
            [[image.length + len(b) for b in image.branches] + [image.length] * (layout.width - len(image.branches))
             for image in images]
        )  # fmt: skip
        for step_index in range(longest):
            live = self._record(tokens, answers, live, limits, step_index)
            if not any(live) or step_index + 1 == longest or (cancel is not None and cancel.is_set()):
                break
            new_slots = base + step_index * layout.width + torch.arange(layout.width)
            visible[:, torch.arange(layout.width), new_slots] = True
            slot_positions[:, new_slots] = next_positions
            logits = step(
                tokens.to(self.device),
                next_positions.to(self.device),
                self._additive(visible, next_positions, slot_positions),
                cache,
            )
            tokens = logits.argmax(-1)
            next_positions = next_positions + 1
        per_branch = iter(answers)
        result = []
        for image in images:
            rows = [next(per_branch) for _ in range(layout.width)]
            result.extend(rows[: len(image.branches)])
        return result

    def _cache(self, images: list[Prefilled], layout: _Layout, slots: int) -> Cache:
        """One preallocated cache for the batch, each image's prefix copied in once and then released from
        `images`, layer by layer, so GPU memory never holds the batch's prefixes twice."""
        layers: list[Any] = []
        for index in range(len(images[0].layers)):
            keys, values = images[0].layers[index]
            shape = (len(images), keys.shape[1], 1, keys.shape[3])
            shared = compat.static_layer(keys.new_empty(shape), values.new_empty((*shape[:3], values.shape[3])), slots)
            for row, image in enumerate(images):
                image_keys, image_values = image.layers[index]
                shared.keys[row, :, : image.length] = image_keys[0]
                shared.values[row, :, : image.length] = image_values[0]
                image.layers[index] = (_RELEASED, _RELEASED)
            del keys, values
            compat.set_length(shared, layout.prefix)  # the next tokens go after the longest prefix
            layers.append(shared)
        return Cache(layers=layers)

    def _prefix_masks(self, images: list[Prefilled], layout: _Layout, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """visible[image, branch, slot]: what each branch may attend to (so far: its image's prefix), and
        each slot's position id (-1: empty)."""
        visible = torch.zeros((len(images), layout.width, slots), dtype=torch.bool)
        slot_positions = torch.full((len(images), slots), -1, dtype=torch.long)
        for row, image in enumerate(images):
            visible[row, :, : image.length] = True
            slot_positions[row, : image.length] = torch.arange(image.length)
        return visible, slot_positions

    def _branch_queries(
        self, images: list[Prefilled], layout: _Layout, visible: torch.Tensor, slot_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The branches' own prompt tokens as one query row per image: ids, positions, per-query visibility,
        and where each branch's last token is (its logits give the branch's first new token)."""
        n = len(images)
        ids = torch.full((n, layout.suffix), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, layout.suffix), dtype=torch.long)
        mask = torch.zeros((n, layout.suffix, visible.shape[-1]), dtype=torch.bool)
        mask[:, :, 0] = True  # padding queries look at one slot (never an empty softmax); their output is unused
        last_rows, last_columns = [], []
        for row, image in enumerate(images):
            for branch, (tokens, start) in enumerate(zip(image.branches, layout.offsets[row], strict=True)):
                span = slice(start, start + len(tokens))
                slots = slice(layout.prefix + start, layout.prefix + start + len(tokens))
                ids[row, span] = torch.tensor(tokens)
                positions[row, span] = torch.arange(image.length, image.length + len(tokens))
                mask[row, span] = visible[row, branch]
                mask[row, span, slots] = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
                visible[row, branch, slots] = True
                slot_positions[row, slots] = positions[row, span]
                last_rows.append(row)
                last_columns.append(start + len(tokens) - 1)
            for _ in range(len(image.branches), layout.width):  # missing branches: a dummy query on slot 0
                last_rows.append(row)
                last_columns.append(0)
        lasts = (torch.tensor(last_rows, device=self.device), torch.tensor(last_columns, device=self.device))
        return ids.to(self.device), positions.to(self.device), mask, lasts

    def _additive(self, visible: torch.Tensor, positions: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
        """[image, 1, query, slot] in the model's dtype: 0 where attending is allowed, the dtype's minimum
        elsewhere (the form both sdpa and eager attention take). Mistral's sliding window applies too."""
        allowed = visible
        if self.window is not None:
            distance = positions.cpu()[:, :, None] - slot_positions[:, None, :]
            allowed = allowed & (distance < self.window)
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None].to(self.device)

    def _record(self, tokens: torch.Tensor, answers: list[list[int]], live: list[bool], limits: list[int],
                step_index: int) -> list[bool]:  # fmt: skip
        """Append this step's token to every live branch; a branch ends at EOS or its own limit."""
        still = []
        for branch, (token, alive, limit) in enumerate(zip(tokens.view(-1).tolist(), live, limits, strict=True)):
            ended = token in self.eos_ids
            if alive and not ended:
                answers[branch].append(token)
            still.append(alive and not ended and step_index + 1 < limit)
        return still


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, except with a mask and several queries per row (a tree step: one query per
    branch). There transformers copies every key/value head once per query head it serves (`repeat_kv`:
    the whole cache, every layer, every step: 2/3 of a CPU decode step was that copy). Here the query
    heads that share a key/value head are folded into the query length instead, so the cache is read as is.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or query.shape[2] == 1 or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, queries, dim = query.shape
    # Query head h uses key/value head h // groups: [rows, kv heads, groups * queries, dim], group-major.
    folded = query.reshape(rows, heads // groups, groups * queries, dim)
    mask = attention_mask[:, :, :, : key.shape[2]].repeat(1, 1, groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return output.reshape(rows, heads, queries, dim).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make `TREE_ATTENTION` an attention implementation transformers models can be loaded with (masks as
    for sdpa). Registering the same function again is harmless."""
    compat.register_attention(TREE_ATTENTION, grouped_sdpa)
    return TREE_ATTENTION
