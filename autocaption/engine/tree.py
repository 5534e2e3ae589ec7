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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from autocaption.engine import compat
from autocaption.engine.compat import Cache, sdpa_attention_forward
from autocaption.engine.memory import IMAGE_BUCKETS

# The attention implementation tree decoding runs on: sdpa, with grouped-query heads folded (below).
TREE_ATTENTION = "autocaption_sdpa"
TREE_ATTENTION_MATH = "autocaption_sdpa_math"  # the same on PyTorch's math kernel (see grouped_sdpa_math)

_RELEASED = torch.empty(0)  # what a prefix layer is replaced with once the batch cache holds it

# (input_ids, position_ids, 4D additive attention mask, cache) -> logits [batch, queries, vocabulary]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache], torch.Tensor]


class Masks(Protocol):
    """The tokens each branch may choose next (engine/grammar.py: llguidance matchers), one row per branch in
    the order `run` returns them: a bitmask of int32 words, bit t of word t // 32 for token t; -1 (all set)
    for a branch without a constraint."""

    def advance(self, tokens: list[int], alive: list[bool]) -> None:
        """The token each branch chose (read only for live branches)."""
        ...

    def fill(self) -> torch.Tensor:
        """[branches, words] int32 on the host: what each branch may choose next."""
        ...


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


# Cache slots are rounded up to a multiple of SLOT_BUCKET, images per batch up to memory.IMAGE_BUCKETS: a
# photo's ~2,500 slots are rounded up by at most 10 %, while a GPU still captures a dozen graphs at most per
# width. bench/padding.py: a step's KV read over what its tokens hold, 20 photos: 1.67x before, 1.04x.
SLOT_BUCKET = 256


def image_bucket(images: int) -> int:
    return next((bucket for bucket in IMAGE_BUCKETS if bucket >= images), -(-images // 32) * 32)


@dataclass(frozen=True)
class Decoded:
    """What the last batch's decode did, for the engine's timings and the bench's floors."""

    steps: int  # decode steps run (after the branches' own prompt tokens)
    padded_bytes: int  # KV cache a step reads: the bucket's whole state, padding rows and slots included
    held_bytes: int  # KV cache the batch's tokens fill at its last step: what a step must read at least
    reused: bool  # a steady-state batch: its bucket's step was compiled or captured before
    masking: float = 0.0  # seconds the host spent on the masks (constrained batches), overlapped on a GPU


class _State:
    """A bucket's decode state, allocated once and reused by every batch that fits it: the static KV cache,
    and device buffers for every input and output of a decode step. A step reads and writes only these
    (no host sync, no new tensors of its own), so it can be compiled once and captured as a CUDA/HIP graph
    whose addresses stay valid from batch to batch."""

    def __init__(self, rows: int, width: int, slots: int, layers: list[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype, device: torch.device, groups: int) -> None:  # fmt: skip
        self.rows, self.width, self.slots, self.groups = rows, width, slots, groups
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
        # The additive form sdpa takes, once per query head of a key/value head (grouped_sdpa's folded query):
        # made once per step here, not once per layer.
        self.mask = torch.zeros((rows, 1, groups * width, slots), dtype=dtype, device=device)
        self.open = torch.zeros((), dtype=dtype, device=device)  # the mask's two values, on the device: a
        self.shut = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)  # step reads no host data
        self.alive = torch.zeros((rows, width), dtype=torch.bool, device=device)
        self.any_alive = torch.zeros((), dtype=torch.bool, device=device)  # what the host looks at
        self.limits = torch.zeros((rows, width), dtype=torch.long, device=device)  # each branch's max_new_tokens
        self.step = torch.zeros((), dtype=torch.long, device=device)  # index of the token the next step records
        self.base = torch.zeros((), dtype=torch.long, device=device)  # first slot of the decode steps
        self.branch = torch.arange(width, device=device)
        self.eos = torch.zeros(0, dtype=torch.long, device=device)
        # New tokens, -1 past a branch's end; as long as the most steps the slots allow, so it never moves.
        self.out = torch.full((rows, width, slots // width + 1), -1, dtype=torch.long, device=device)
        self.window: int | None = None  # the sliding window, when this batch's positions reach it
        # What each branch may choose next (constrained batches): a bitmask per branch, written by the host
        # before each step into this one buffer, so a captured step reads it at the same address every time.
        self.allow: torch.Tensor | None = None  # [rows, width, words] int32, made by the first constrained batch
        self.staged: torch.Tensor | None = None  # its host copy (pinned on a GPU: the copy does not block)
        self.logits: torch.Tensor | None = None  # a constrained step's scores, between its forward and its choice
        self.bits = torch.arange(32, dtype=torch.int32, device=device)
        # Nothing here refers to the step's runner (TreeDecoder.runners holds it, and it holds this state):
        # dropping both frees the cache at once, without waiting for a garbage collection.

    def bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers)


class _Lookout:
    """Whether any branch of the batch is still alive, seen from the host without making it wait for the
    device: after each step the flag is copied asynchronously into pinned memory and the host reads the
    copy of `lag` steps before, so the device always has steps queued, and a batch whose answers all
    ended runs at most `lag` steps too many. With lag 0 (the CPU, where every op is synchronous anyway)
    the host reads the flag of the step just run."""

    def __init__(self, flag: torch.Tensor, lag: int) -> None:
        self.flag = flag
        self.lag = lag
        self.pushed = 0
        self.copies = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=lag > 0 and flag.is_cuda)
        self.events = [torch.cuda.Event() for _ in range(lag + 1)] if lag and flag.is_cuda else []
        # The copy runs on the flag's device's stream; an event recorded without a stream would go on the
        # current device's (cuda:0 with model.device: cuda:1) and be waited for in vain.
        self.stream = torch.cuda.current_stream(flag.device) if self.events else None

    def push(self) -> None:
        """After a step is queued: its flag, on its way to the host."""
        ring = self.pushed % (self.lag + 1)
        self.copies[ring].copy_(self.flag, non_blocking=bool(self.events))
        if self.events:
            self.events[ring].record(self.stream)
        self.pushed += 1

    def ended(self) -> bool:
        """Every branch had ended `lag` steps ago (False until that many steps ran)."""
        if self.pushed <= self.lag:
            return False
        ring = (self.pushed - 1 - self.lag) % (self.lag + 1)
        if self.events:
            self.events[ring].synchronize()  # that step is done; the `lag` after it stay queued
        return not bool(self.copies[ring])


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
                 bucketed: bool = True, budget_bytes: int | None = None, groups: int = 1, lag: int = 0,
                 ) -> None:  # fmt: skip
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
        # Query heads per key/value head the mask is repeated for (grouped_sdpa's folding), 1 where the
        # model's attention is not grouped_sdpa.
        self.groups = groups
        self.lag = lag  # steps the host reads the "any alive" flag behind the device (see _Lookout)
        self.states: dict[tuple[int, int], _State] = {}  # (rows, width) -> its state
        # (rows, width) -> its state's step; (rows, width, 1) and (rows, width, 2) -> a constrained step's two
        # halves, the forward and the choice (see `_constrained`)
        self.runners: dict[tuple[int, ...], Callable[[], None]] = {}
        self.last = Decoded(0, 0, 0, False)
        self.last_key: tuple[int, int] = (0, 0)  # the state the last batch ran on
        self._masking = 0.0

    def run(self, images: list[Prefilled], forward: Forward, cancel: threading.Event | None = None,
            masks: Masks | None = None) -> list[list[int]]:  # fmt: skip
        """New tokens of every branch, image by image and branch by branch (EOS and beyond dropped).
        `forward` runs the model: (ids, positions, 4D mask, cache) -> logits. `masks`: what each branch may
        choose, step by step (constrained decoding); the host then reads each step's tokens before the next."""
        layout = _Layout.of(images)
        longest = max(limit for image in images for limit in image.limits)
        needed = layout.prefix + layout.suffix + layout.width * max(longest - 1, 0)
        key, state = self._state(len(images), layout.width, needed, images[0].layers)
        self.last_key = key
        self._masking = 0.0
        if self._load(state, images, layout, longest):
            self._forget_steps(key)  # the step changed (sliding window on or off): made again
        runner = self.runners.get(key if masks is None else (key[0], key[1], 1))
        reused = runner is not None  # a steady-state batch: nothing compiled or captured for it
        ids, positions, mask, lasts = self._branch_queries(state, images, layout)
        logits = forward(ids, positions, mask, state.cache)
        steps = 0
        with torch.no_grad():
            first = logits[lasts[0], lasts[1]].view(state.rows, state.width, -1)
            rows = _Rows(images, state) if masks is not None else None
            if masks is not None and rows is not None:
                rows.stage(state, masks.fill(), first.shape[-1])
                first = _allowed(first, state)
                if state.logits is None or state.logits.shape != first.shape or state.logits.dtype != first.dtype:
                    state.logits = torch.empty_like(first)
                    self._forget_steps(key)
            state.tokens.copy_(first.argmax(-1))
            _record(state)
            lookout = _Lookout(state.any_alive, self.lag)
            lookout.push()
            if masks is not None and rows is not None:
                steps = self._constrained(key, state, forward, masks, rows, longest, lookout, cancel)
            else:
                if runner is None:
                    # The runner holds the state (a graph replays on its buffers); the state never holds the
                    # runner, so no reference cycle keeps either alive once the decoder drops them.
                    runner = self.runners[key] = self.make_runner(lambda: _step(state, forward))
                while steps < longest - 1 and not lookout.ended() and not (cancel is not None and cancel.is_set()):
                    runner()
                    lookout.push()
                    steps += 1
        out = state.out[: len(images), :, :longest].tolist()  # the host's one wait for the device per batch
        held = sum(image.length + sum(map(len, image.branches)) + len(image.branches) * steps for image in images)
        self.last = Decoded(steps, state.bytes(), held * state.bytes() // (state.rows * state.slots), reused,
                            self._masking)  # fmt: skip
        result = []
        for row, image in enumerate(images):
            for branch in range(len(image.branches)):
                tokens = out[row][branch]
                result.append(tokens[: tokens.index(-1)] if -1 in tokens else tokens)
        return result

    def _constrained(self, key: tuple[int, int], state: _State, forward: Forward, masks: Masks, rows: _Rows,
                     longest: int, lookout: _Lookout, cancel: threading.Event | None) -> int:  # fmt: skip
        """The decode steps of a constrained batch, each in two graphs: the forward, then the choice under the
        masks. The host reads the tokens just chosen, queues the next forward, and computes the next masks
        while the device runs it: the grammar's time hides behind the forward instead of adding to it."""
        forwarder = self.runners.get((key[0], key[1], 1))
        if forwarder is None:
            forwarder = self.runners[(key[0], key[1], 1)] = self.make_runner(lambda: _forward_step(state, forward))
        selector = self.runners.get((key[0], key[1], 2))
        if selector is None:
            selector = self.runners[(key[0], key[1], 2)] = self.make_runner(lambda: _select(state))
        assert state.logits is not None
        vocabulary = state.logits.shape[-1]
        steps = 0
        while steps < longest - 1 and not lookout.ended() and not (cancel is not None and cancel.is_set()):
            tokens, alive = rows.read(state)  # waits for the last choice
            forwarder()  # queued: the device runs the forward while the host works out the masks
            started = time.perf_counter()
            masks.advance(tokens, alive)
            rows.stage(state, masks.fill(), vocabulary)
            self._masking += time.perf_counter() - started
            selector()
            lookout.push()
            steps += 1
        return steps

    def kept_prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix the last batch decoded from in `row` (its first `length` slots), per layer: views of the
        kept state, from which another run continues (gated rules) without prefilling the image again. A
        later run copies them into its own rows before anything writes over them."""
        state = self.states[self.last_key]
        return [(layer.keys[row : row + 1, :, :length], layer.values[row : row + 1, :, :length])
                for layer in state.layers]  # fmt: skip

    def _state(self, images: int, width: int, needed: int, layers: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[tuple[int, int], _State]:  # fmt: skip
        """The bucket's key and state: reused when it has slots enough, else made again (bigger) once."""
        rows = image_bucket(images) if self.bucketed else images
        slots = -(-needed // SLOT_BUCKET) * SLOT_BUCKET if self.bucketed else needed
        key = (rows, width)
        state = self.states.get(key)
        if state is not None and (state.slots == slots or (self.bucketed and state.slots > slots)):
            return key, state
        if state is not None and self.bucketed:
            slots = max(slots, state.slots)  # slots only grow: a bucket is made again at most a few times
        self._drop(key)
        del state  # the old state's memory is free before the new one is allocated
        self._make_room(rows * slots * _bytes_per_slot(layers))
        state = _State(rows, width, slots, layers, self.dtype, self.device, self.groups)
        state.eos = torch.tensor(sorted(self.eos_ids) or [-2], dtype=torch.long, device=self.device)
        self.states[key] = state
        return key, state

    def release(self) -> None:
        """Drop every kept state (static caches, and the graphs recorded on them): after an out-of-memory
        error the smaller batches of the retry need that memory more than a bucket nothing may use again."""
        self.states.clear()
        self.runners.clear()

    def set_bucketed(self, bucketed: bool) -> None:
        """Pad batches up to buckets or not (from the next batch on); the states of the other way go."""
        if bucketed != self.bucketed:
            self.release()
        self.bucketed = bucketed

    def _drop(self, key: tuple[int, int]) -> None:
        self.states.pop(key, None)
        self._forget_steps(key)  # its graphs and its compiled steps go with it

    def _forget_steps(self, key: tuple[int, int]) -> None:
        """A bucket's runners: its step, and a constrained step's two halves (see `_constrained`)."""
        for step in (key, (key[0], key[1], 1), (key[0], key[1], 2)):
            self.runners.pop(step, None)

    def _make_room(self, wanted: int) -> None:
        """Drop the states kept for other buckets when keeping them too would pass the memory budget."""
        if self.budget_bytes is None:
            return
        while self.states and sum(s.bytes() for s in self.states.values()) + wanted > self.budget_bytes:
            self._drop(next(iter(self.states)))  # the oldest

    def _load(self, state: _State, images: list[Prefilled], layout: _Layout, longest: int) -> bool:
        """Copy each image's prefix into its row (releasing the prefill's own copy, so memory never holds a
        batch's prefixes twice) and reset every buffer in place: the step's addresses never change. True
        when the step itself changes for this batch (its sliding window is switched on or off)."""
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
        furthest = max(image.length + len(tokens) for image in images for tokens in image.branches)
        reaches = self.window is not None and furthest + longest > self.window
        window = self.window if reaches else None
        changed, state.window = window != state.window, window
        return changed

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
        # (one query row per branch token: grouped_sdpa repeats it per query head, once per batch)
        lasts = (torch.tensor(last_rows, device=self.device), torch.tensor(last_columns, device=self.device))
        return ids.to(self.device), positions.to(self.device), mask[:, None].to(self.device), lasts


class _Rows:
    """Where each branch of `run`'s result sits in the state: the masks come and go in result order."""

    def __init__(self, images: list[Prefilled], state: _State) -> None:
        self.places = [(row, branch) for row, image in enumerate(images) for branch in range(len(image.branches))]
        self.index = (torch.tensor([row for row, _ in self.places]), torch.tensor([b for _, b in self.places]))
        self.fresh = True

    def stage(self, state: _State, masks: torch.Tensor, vocabulary: int) -> None:
        """The branches' masks into the state's buffer (padding rows and missing branches allow everything)."""
        words = masks.shape[1]
        assert words * 32 >= vocabulary, "a mask must cover every token the model scores"
        if state.allow is None or state.allow.shape[2] != words:
            shape, device = (state.rows, state.width, words), state.tokens.device
            state.allow = torch.full(shape, -1, dtype=torch.int32, device=device)
            pin = state.tokens.device.type == "cuda"
            state.staged = torch.full(state.allow.shape, -1, dtype=torch.int32, pin_memory=pin)
        assert state.staged is not None
        if self.fresh:  # rows an earlier batch constrained are padding now
            state.staged.fill_(-1)
            self.fresh = False
        state.staged[self.index] = masks
        state.allow.copy_(state.staged, non_blocking=True)

    def read(self, state: _State) -> tuple[list[int], list[bool]]:
        """Each branch's latest token and whether it is still alive (the host waits for the step)."""
        tokens, alive = state.tokens[self.index].tolist(), state.alive[self.index].tolist()
        return tokens, alive


def _allowed(logits: torch.Tensor, state: _State) -> torch.Tensor:
    """`logits` [rows, width, vocabulary] under the state's masks. On the device, from the state's buffers only
    (a captured step replays it)."""
    assert state.allow is not None
    return masked(logits, state.allow, state.bits)


def masked(scores: torch.Tensor, allow: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`scores` [..., vocabulary] with every token its row's mask forbids at the lowest value. `allow`:
    [..., words] int32, bit t of word t // 32 for token t (the Masks format); `bits`: arange(32) on the device."""
    unpacked = (allow[..., None] >> bits) & 1  # [..., words, 32]
    keep = unpacked.view(*scores.shape[:-1], -1)[..., : scores.shape[-1]].bool()
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


def _forward_step(state: _State, forward: Forward) -> None:
    """A constrained decode step's first half: the forward, its scores kept in the state for `_select`."""
    assert state.logits is not None
    state.logits.copy_(_forward_only(state, forward))


def _select(state: _State) -> None:
    """A constrained decode step's second half: the best token each branch's mask allows, recorded."""
    assert state.logits is not None
    state.tokens.copy_(_allowed(state.logits, state).argmax(-1))
    _advance(state)


def _step(state: _State, forward: Forward) -> None:
    """One decode step, on the device only: what a compiled or captured step runs. Every operand is one of
    the state's device tensors or a Python number: a tensor made on the host (as `visible[...] = True`
    makes one: index_put_ then copies it over, with a synchronise) would make a CUDA graph capture fail."""
    state.tokens.copy_(_forward_only(state, forward).argmax(-1))
    _advance(state)


def _forward_only(state: _State, forward: Forward) -> torch.Tensor:
    """A step's scores: this step's mask columns opened, then the forward of every branch's last token."""
    slots = (state.base + state.step * state.width + state.branch).expand(state.rows, state.width)
    state.visible.scatter_(2, slots[:, :, None], True)  # this step's slot of each branch
    state.slot_positions.scatter_(1, slots, state.positions)
    allowed = state.visible
    if state.window is not None:
        allowed = allowed & (state.positions[:, :, None] - state.slot_positions[:, None, :] < state.window)
    folded = state.mask.view(state.rows, state.groups, state.width, state.slots)
    folded.copy_(torch.where(allowed, state.open, state.shut)[:, None])
    return forward(state.tokens, state.positions, state.mask, state.cache)


def _advance(state: _State) -> None:
    state.positions.add_(1)
    state.step.add_(1)
    _record(state)


def _record(state: _State) -> None:
    """Write this step's token of every live branch; a branch ends at EOS or its own limit."""
    ended = (state.tokens[:, :, None] == state.eos).any(-1)
    kept = state.alive & ~ended
    column = torch.where(kept, state.tokens, torch.full_like(state.tokens, -1))
    state.out.index_copy_(2, state.step.view(1), column[:, :, None])
    state.alive.copy_(kept & (state.step + 1 < state.limits))
    state.any_alive.copy_(state.alive.any())


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
    queries = query.shape[2]
    if attention_mask is None or groups == 1 or attention_mask.shape[1] != 1:
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :queries]  # a mask folded for other heads: its first copy
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    # Query head h uses key/value head h // groups: [rows, kv heads, groups * queries, dim], group-major.
    # One query (one branch) too: transformers' sdpa would copy the whole cache per query head (repeat_kv).
    folded = query.reshape(rows, heads // groups, groups * queries, dim)
    mask = attention_mask[:, :, :, : key.shape[2]]
    if mask.shape[2] != groups * queries:  # the decode step folds its mask once per step (tree._step)
        mask = mask[:, :, :queries].repeat(1, 1, groups, 1)
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
