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
from torch.nn.attention import SDPBackend, sdpa_kernel

from autocaption.engine import compat
from autocaption.engine.compat import Cache, sdpa_attention_forward

# The attention implementation tree decoding runs on: sdpa, with grouped-query heads folded (below).
TREE_ATTENTION = "autocaption_sdpa"
TREE_ATTENTION_MATH = "autocaption_sdpa_math"  # the same on PyTorch's math kernel (see grouped_sdpa_math)

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


IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32)  # images per batch are padded up to one of these
SLOT_BUCKET = 512  # cache slots are rounded up to a multiple of this
CHECK_EVERY = 16  # decode steps between looks from the host (all branches ended? asked to stop?)


def image_bucket(images: int) -> int:
    return next((bucket for bucket in IMAGE_BUCKETS if bucket >= images), -(-images // 32) * 32)


class _State:
    """A bucket's decode state, allocated once and reused by every batch that fits it: the static KV cache,
    and device buffers for every input and output of a decode step. A step reads and writes only these
    (no host sync, no new tensors of its own), so it can be compiled once and captured as a CUDA/HIP graph
    whose addresses stay valid from batch to batch."""

    def __init__(self, rows: int, width: int, slots: int, layers: list[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.rows, self.width, self.slots = rows, width, slots
        self.layers = [
            compat.static_layer(keys.new_empty((rows, *keys.shape[1:2], 1, keys.shape[3])),
                                values.new_empty((rows, *values.shape[1:2], 1, values.shape[3])), slots)
            for keys, values in layers
        ]  # fmt: skip
        self.cache = Cache(layers=self.layers)
        self.dtype = dtype
        self.tokens = torch.zeros((rows, width), dtype=torch.long, device=device)  # input now, output of the last step
        self.positions = torch.zeros((rows, width), dtype=torch.long, device=device)  # position ids of the next tokens
        self.visible = torch.zeros((rows, width, slots), dtype=torch.bool, device=device)  # what each branch attends to
        self.slot_positions = torch.full((rows, slots), -1, dtype=torch.long, device=device)  # for the sliding window
        self.mask = torch.zeros((rows, 1, width, slots), dtype=dtype, device=device)  # the additive form sdpa takes
        self.alive = torch.zeros((rows, width), dtype=torch.bool, device=device)
        self.limits = torch.zeros((rows, width), dtype=torch.long, device=device)  # each branch's max_new_tokens
        self.step = torch.zeros((), dtype=torch.long, device=device)  # index of the token the next step records
        self.base = torch.zeros((), dtype=torch.long, device=device)  # first slot of the decode steps
        self.branch = torch.arange(width, device=device)
        self.eos = torch.zeros(0, dtype=torch.long, device=device)
        # New tokens, -1 past a branch's end; as long as the most steps the slots allow, so it never moves.
        self.out = torch.full((rows, width, slots // width + 1), -1, dtype=torch.long, device=device)
        self.window: int | None = None  # the sliding window, when this batch's positions reach it
        self.runner: Callable[[], None] | None = None  # the step, compiled or captured for this state

    def bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers)


class TreeDecoder:
    """Greedy decoding of every branch of a batch of prefilled images at once, on persistent per-bucket
    state: images per batch are padded up to IMAGE_BUCKETS (padding rows are ended from the start),
    branches up to the batch's widest image, cache slots up to a multiple of SLOT_BUCKET. After the
    branches' own prompt tokens (one forward of a shape that varies per batch), every decode step has
    the bucket's fixed shapes and runs on the device from end to end: open the new mask columns, forward,
    argmax, end-of-sequence and limit checks, record the token, advance. `make_runner` turns that step into
    what runs it (eager, compiled, or a captured graph)."""

    def __init__(self, *, pad_id: int, eos_ids: set[int], dtype: torch.dtype, device: torch.device,
                 sliding_window: int | None, make_runner: Callable[[Callable[[], None]], Callable[[], None]],
                 bucketed: bool = True, budget_bytes: int | None = None) -> None:  # fmt: skip
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.dtype = dtype
        self.device = device
        self.window = sliding_window
        self.make_runner = make_runner  # the step -> what runs it: itself, a compiled step, a captured graph
        # Fixed shapes (buckets) pay where a step is compiled or captured; the CPU's eager step does not need
        # them, and padding rows and slots would only cost it time.
        self.bucketed = bucketed
        self.budget_bytes = budget_bytes  # how much KV cache the kept states may hold together
        self.states: dict[tuple[int, int], _State] = {}  # (rows, width) -> its state
        self.last: tuple[int, int, bool] = (0, 0, False)  # the last batch: decode steps, cache bytes, state reused

    def run(self, images: list[Prefilled], forward: Forward, cancel: threading.Event | None = None
            ) -> list[list[int]]:  # fmt: skip
        """New tokens of every branch, image by image and branch by branch (EOS and beyond dropped).
        `forward` runs the model: (ids, positions, 4D mask, cache) -> logits."""
        layout = _Layout.of(images)
        longest = max(limit for image in images for limit in image.limits)
        needed = layout.prefix + layout.suffix + layout.width * max(longest - 1, 0)
        state = self._state(len(images), layout.width, needed, images[0].layers)
        reused = state.runner is not None  # a steady-state batch: nothing compiled or captured for it
        self._load(state, images, layout, longest)
        ids, positions, mask, lasts = self._branch_queries(state, images, layout)
        logits = forward(ids, positions, mask, state.cache)
        with torch.no_grad():
            state.tokens.copy_(logits[lasts[0], lasts[1]].argmax(-1).view(state.rows, state.width))
            self._record(state)
            if state.runner is None:
                state.runner = self.make_runner(lambda: self._step(state, forward))
            steps = 0
            for steps in range(1, longest):
                state.runner()
                if steps % CHECK_EVERY == 0 and self._over(state, cancel):  # the host looks every 16 steps
                    break
        out = state.out[: len(images), :, :longest].tolist()  # the host's one wait for the device per batch
        self.last = (steps, state.bytes(), reused)
        result = []
        for row, image in enumerate(images):
            for branch in range(len(image.branches)):
                tokens = out[row][branch]
                result.append(tokens[: tokens.index(-1)] if -1 in tokens else tokens)
        return result

    @staticmethod
    def _over(state: _State, cancel: threading.Event | None) -> bool:
        return not bool(state.alive.any()) or (cancel is not None and cancel.is_set())

    def _state(self, images: int, width: int, needed: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> _State:
        """The bucket's state: reused when it has slots enough, else made again (bigger) once."""
        rows = image_bucket(images) if self.bucketed else images
        slots = -(-needed // SLOT_BUCKET) * SLOT_BUCKET if self.bucketed else needed
        state = self.states.get((rows, width))
        if state is not None and (state.slots == slots or (self.bucketed and state.slots > slots)):
            return state
        if state is not None and self.bucketed:
            slots = max(slots, state.slots)  # slots only grow: a bucket is made again at most a few times
        self.states.pop((rows, width), None)
        self._make_room(rows * slots * _bytes_per_slot(layers))
        state = _State(rows, width, slots, layers, self.dtype, self.device)
        state.eos = torch.tensor(sorted(self.eos_ids) or [-2], dtype=torch.long, device=self.device)
        self.states[(rows, width)] = state
        return state

    def release(self) -> None:
        """Drop every kept state (static caches, and the graphs recorded on them): after an out-of-memory
        error the smaller batches of the retry need that memory more than a bucket nothing may use again."""
        self.states.clear()

    def _make_room(self, wanted: int) -> None:
        """Drop the states kept for other buckets when keeping them too would pass the memory budget."""
        if self.budget_bytes is None:
            return
        while self.states and sum(s.bytes() for s in self.states.values()) + wanted > self.budget_bytes:
            self.states.pop(next(iter(self.states)))  # the oldest; its graph goes with it

    def _load(self, state: _State, images: list[Prefilled], layout: _Layout, longest: int) -> None:
        """Copy each image's prefix into its row (releasing the prefill's own copy, so memory never holds a
        batch's prefixes twice) and reset every buffer in place: the step's addresses never change."""
        for index, layer in enumerate(state.layers):
            for row, image in enumerate(images):
                keys, values = image.layers[index]
                layer.keys[row, :, : image.length] = keys[0]
                layer.values[row, :, : image.length] = values[0]
                image.layers[index] = (_RELEASED, _RELEASED)
            compat.set_length(layer, layout.prefix)  # the branches' tokens go after the longest prefix
        visible = torch.zeros((state.rows, state.width, state.slots), dtype=torch.bool)
        slot_positions = torch.full((state.rows, state.slots), -1, dtype=torch.long)
        positions = torch.zeros((state.rows, state.width), dtype=torch.long)
        limits = torch.zeros((state.rows, state.width), dtype=torch.long)
        visible[:, :, 0] = True  # padding rows and missing branches look at one slot: never an empty softmax
        for row, image in enumerate(images):
            visible[row, :, : image.length] = True
            slot_positions[row, : image.length] = torch.arange(image.length)
            for branch, (tokens, start, limit) in enumerate(
                zip(image.branches, layout.offsets[row], image.limits, strict=True)
            ):
                slots = slice(layout.prefix + start, layout.prefix + start + len(tokens))
                span = torch.arange(image.length, image.length + len(tokens))
                visible[row, branch, slots] = True
                slot_positions[row, slots] = span
                positions[row, branch] = image.length + len(tokens)
                limits[row, branch] = limit
        state.visible.copy_(visible)
        state.slot_positions.copy_(slot_positions)
        state.positions.copy_(positions)
        state.limits.copy_(limits)
        state.alive.copy_(limits > 0)
        state.step.zero_()
        state.base.fill_(layout.prefix + layout.suffix)
        state.out.fill_(-1)
        reaches = self.window is not None and int(positions.max()) + longest > self.window
        window = self.window if reaches else None
        if window != state.window:
            state.window, state.runner = window, None

    def _branch_queries(
        self, state: _State, images: list[Prefilled], layout: _Layout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The branches' own prompt tokens as one query row per image (padding rows included): ids,
        positions, the additive mask, and where each branch's last token is (its logits give the first new
        token). These shapes vary per batch: this forward runs as it is, once per batch."""
        ids = torch.full((state.rows, layout.suffix), self.pad_id, dtype=torch.long)
        positions = torch.zeros((state.rows, layout.suffix), dtype=torch.long)
        visible = torch.zeros((state.rows, layout.suffix, state.slots), dtype=torch.bool)
        visible[:, :, 0] = True
        last_rows, last_columns = [], []
        for row in range(state.rows):
            image = images[row] if row < len(images) else None
            branches = image.branches if image else []
            for branch, tokens in enumerate(branches):
                assert image is not None
                start = layout.offsets[row][branch]
                span = slice(start, start + len(tokens))
                slots = slice(layout.prefix + start, layout.prefix + start + len(tokens))
                ids[row, span] = torch.tensor(tokens)
                positions[row, span] = torch.arange(image.length, image.length + len(tokens))
                visible[row, span, : image.length] = True
                visible[row, span, slots] = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
                last_rows.append(row)
                last_columns.append(start + len(tokens) - 1)
            for _ in range(len(branches), state.width):  # missing branches and padding rows: slot 0, unused
                last_rows.append(row)
                last_columns.append(0)
        if self.window is not None:
            slot_positions = state.slot_positions.cpu()
            visible &= positions[:, :, None] - slot_positions[:, None, :] < self.window
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, torch.finfo(self.dtype).min)
        lasts = (torch.tensor(last_rows, device=self.device), torch.tensor(last_columns, device=self.device))
        return ids.to(self.device), positions.to(self.device), mask[:, None].to(self.device), lasts

    def _step(self, state: _State, forward: Forward) -> None:
        """One decode step, on the device only: what a compiled or captured step runs."""
        slots = state.base + state.step * state.width + state.branch  # this step's slot of each branch
        state.visible[:, state.branch, slots] = True
        state.slot_positions[:, slots] = state.positions
        allowed = state.visible
        if state.window is not None:
            allowed = allowed & (state.positions[:, :, None] - state.slot_positions[:, None, :] < state.window)
        state.mask.copy_(torch.where(allowed, 0.0, torch.finfo(state.dtype).min).to(state.dtype)[:, None])
        logits = forward(state.tokens, state.positions, state.mask, state.cache)
        state.tokens.copy_(logits.argmax(-1))
        state.positions.add_(1)
        state.step.add_(1)
        self._record(state)

    @staticmethod
    def _record(state: _State) -> None:
        """Write this step's token of every live branch; a branch ends at EOS or its own limit."""
        ended = (state.tokens[:, :, None] == state.eos).any(-1)
        kept = state.alive & ~ended
        column = torch.where(kept, state.tokens, torch.full_like(state.tokens, -1))
        state.out.index_copy_(2, state.step.view(1), column[:, :, None])
        state.alive.copy_(kept & (state.step + 1 < state.limits))


def _bytes_per_slot(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum((keys.shape[1] * keys.shape[3] + values.shape[1] * values.shape[3]) * keys.element_size()
               for keys, values in layers)  # fmt: skip


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


def grouped_sdpa_math(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """`grouped_sdpa` with PyTorch's math kernel wherever a mask is given: for builds whose fused kernels
    compute custom masks wrongly (the start-up self-check found out). The maskless prefill keeps its fast
    causal kernels."""
    if attention_mask is None:
        return grouped_sdpa(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(SDPBackend.MATH):
        return grouped_sdpa(module, query, key, value, attention_mask, **kwargs)


def register_attention(*, math: bool = False) -> str:
    """Make the tree-decoding attention an implementation transformers models can be loaded with (masks as
    for sdpa); `math`: its variant on PyTorch's math kernel. Registering the same function again is harmless."""
    if math:
        compat.register_attention(TREE_ATTENTION_MATH, grouped_sdpa_math)
        return TREE_ATTENTION_MATH
    compat.register_attention(TREE_ATTENTION, grouped_sdpa)
    return TREE_ATTENTION
