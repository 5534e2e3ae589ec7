"""The decode step a GPU captures as a graph, proven on the CPU (issue 18): a real step of the tiny LLaVA-NeXT
on fake CUDA tensors reads nothing from the host; released states are freed without a garbage collection;
an out-of-memory error during capture reaches the retry; one rule per image never copies the cache per
head; `batch_size: auto` packs a GPU's worth of photos into one tree batch; the host stops a batch within
`lag` steps of its last answer."""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autocaption.config import ModelConfig
from autocaption.engine import Job, Prompt, load_engine
from autocaption.engine import tree as tree_module
from autocaption.engine.tree import Prefilled, TreeDecoder, _Layout
from autocaption.images import open_picture
from tests.test_engine import IMAGES, PROMPTS, answers_of, reference_generate

# --- a real decode step on fake CUDA tensors ----------------------------------------------------------------

# Ops that read a device tensor's value on the host: each one waits for the device, and inside a graph
# capture each one fails it.
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class _Watch(TorchDispatchMode):
    """Every op of the step, as dispatched: a host tensor among CUDA tensors (its copy to the device
    synchronises, which a capture forbids) or an op that reads a device value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "cuda" in devices and "cpu" in devices:
            shapes = [tuple(t.shape) for t in tensors if t.device.type == "cpu"]
            self.problems.append(f"{func}: host tensor(s) of shape {shapes} among CUDA tensors")
        if func in _HOST_READS:
            self.problems.append(f"{func}: reads a device value on the host")
        return out


def _cuda_build() -> bool:
    return bool(torch.backends.cuda.is_built())


needs_cuda_build = pytest.mark.skipif(
    not _cuda_build(), reason=f"torch {torch.__version__} has no CUDA support: it cannot make even fake CUDA tensors"
)


@contextlib.contextmanager
def _fake_cuda(engine: Any) -> Iterator[Any]:
    """The engine's model as fake CUDA tensors (shapes, dtypes and devices, no data, no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # fake parameters replace the real ones
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            engine.model.to("cuda")
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def _fake_step_problems(
    tiny_model: Path, step: Any, *, widths: list[int], window: int | None, dtype: torch.dtype = torch.float32,
    masked: bool = False,
) -> list[str]:  # fmt: skip
    """Build a bucketed decode state on fake CUDA, run the branches' prompt forward and the first record
    as `TreeDecoder.run` does, then watch one `step(state, forward)`."""
    engine: Any = load_engine(ModelConfig(id=str(tiny_model)))
    engine.model.to(dtype)
    text = engine.model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.hidden_size // heads
    with _fake_cuda(engine):
        device = torch.device("cuda")
        decoder = TreeDecoder(
            pad_id=engine.pad_id, eos_ids=engine.eos_ids, dtype=dtype, device=device, sliding_window=window,
            make_runner=lambda run: run, groups=heads // kv_heads, lag=2,
        )  # fmt: skip

        def layers(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            shape = (1, kv_heads, length, head_dim)
            return [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
                    for _ in range(text.num_hidden_layers)]  # fmt: skip

        images = [
            Prefilled(layers(40 + 7 * i), 40 + 7 * i, [[5, 6, 7 + b][: 2 + b % 2] for b in range(width)], [12] * width)
            for i, width in enumerate(widths)
        ]
        layout = _Layout.of(images)
        _, state = decoder._state(len(images), layout.width, layout.prefix + layout.suffix + layout.width * 11,
                                  images[0].layers)  # fmt: skip
        decoder._load(state, images, layout, 12)
        assert (state.window is not None) == (window is not None)
        ids, positions, mask, lasts = decoder._branch_queries(state, images, layout)
        logits = engine._forward(ids, positions, mask, state.cache)
        state.tokens.copy_(logits[lasts[0], lasts[1]].argmax(-1).view(state.rows, state.width))
        tree_module._record(state)
        if masked:  # a constrained batch: the host's masks staged into the state's buffer, as run() does
            vocabulary = logits.shape[-1]
            masks = torch.full((sum(widths), (vocabulary + 31) // 32), -1, dtype=torch.int32)
            masks[0, 0] = 0b1010  # one branch held to two tokens
            tree_module._Rows(images, state).stage(state, masks, vocabulary)
            state.logits = torch.empty_like(logits[:, :1].expand(state.rows, state.width, vocabulary))
        watch = _Watch()
        with watch:
            step(state, engine._forward)
            step(state, engine._forward)  # the second step: nothing is done once only
    return watch.problems


@needs_cuda_build
@pytest.mark.parametrize(
    ("widths", "window", "dtype", "masked"),
    [([2, 1, 3], None, torch.float32, False), ([1], None, torch.float32, False), ([2, 2], 48, torch.float32, False),
     ([2, 1, 3], None, torch.bfloat16, False), ([2, 1, 3], None, torch.bfloat16, True)],
    ids=["three-images-of-1-to-3-rules", "one-image-one-rule", "sliding-window-reached", "bfloat16",
         "constrained-by-a-grammar"],
)  # fmt: skip
def test_a_decode_step_on_fake_cuda_passes_no_host_tensor_and_reads_nothing_back(
    tiny_model: Path, widths: list[int], window: int | None, dtype: torch.dtype, masked: bool
) -> None:
    """What makes a CUDA/HIP graph capture fail, found without a GPU: the whole step (mask update, the
    model's forward through the tree attention, argmax, end checks, the record) on fake CUDA tensors.
    What it cannot see: fake CUDA runs sdpa as its math decomposition, so the fused kernels a GPU picks
    (flash, memory-efficient, cuDNN) are not what is checked here, nor torch.compile's output."""
    step = _constrained_step if masked else tree_module._step
    assert _fake_step_problems(tiny_model, step, widths=widths, window=window, dtype=dtype, masked=masked) == []


def _constrained_step(state: Any, forward: Any) -> None:
    """A constrained step as run() runs it: the forward, then the choice under the staged masks."""
    tree_module._forward_step(state, forward)
    tree_module._select(state)


@needs_cuda_build
def test_the_watch_catches_the_host_scalar_the_step_once_assigned(tiny_model: Path) -> None:
    """The step as it was (`state.visible[:, state.branch, slots] = True`, a host tensor copied to the device
    with a synchronise inside index_put_): the same watch reports it, so the test above is not blind."""

    def old_step(state: Any, forward: Any) -> None:
        slots = state.base + state.step * state.width + state.branch
        state.visible[:, state.branch, slots] = True
        tree_module._step(state, forward)

    problems = _fake_step_problems(tiny_model, old_step, widths=[2, 1], window=None)
    assert problems and all("aten.index_put_.default: host tensor(s) of shape [()]" in p for p in problems)


# --- released states are freed at once ----------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Stream:
    def wait_stream(self, other: object) -> None:
        pass


def _stand_in_cuda(monkeypatch: pytest.MonkeyPatch, capture: Any) -> list[str]:
    """torch.cuda's stream calls as no-ops and `runners.capture` replaced: no GPU here. A "recording" is the step
    itself (replaying it runs it), which gives the answers a real graph gives."""
    from autocaption.engine import runners

    calls: list[str] = []
    for name, stand_in in {
        "Stream": lambda device: _Stream(), "current_stream": lambda device: _Stream(),
        "stream": lambda stream: contextlib.nullcontext(), "synchronize": lambda device: None,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, stand_in)

    def capturing(step: Any, device: torch.device, stream: Any) -> Any:
        calls.append("capture")
        return capture(step, device)

    monkeypatch.setattr(runners, "capture", capturing)
    return calls


def _tracked_states(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """A weak reference to every decode state made from now on."""
    made: list[weakref.ref[Any]] = []
    base = tree_module._State

    class Tracked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(weakref.ref(self))

    monkeypatch.setattr(tree_module, "_State", Tracked)
    return made


@pytest.mark.parametrize("graphs", [False, True], ids=["eager-step", "captured-step"])
def test_released_states_are_freed_without_a_garbage_collection(
    tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, graphs: bool
) -> None:
    """With gc off, as between two collections: a state dropped by release() (the out-of-memory retry),
    by _make_room (the KV budget), by its bucket growing or by close() is gone at once, and its memory
    with it."""
    _stand_in_cuda(monkeypatch, lambda step, device: step)
    made = _tracked_states(monkeypatch)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6))
    engine.graphs = graphs
    engine.tree.bucketed = True
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    with _no_gc():
        answers_of(engine, pictures[:1], [PROMPTS])
        first = [weakref.ref(state) for state in engine.tree.states.values()]
        engine.tree.release()
        assert first and all(ref() is None for ref in first)

        answers_of(engine, pictures[:2], [PROMPTS, PROMPTS])  # bucket (2, 2)
        two = [weakref.ref(state) for state in engine.tree.states.values()]
        engine.tree.budget_bytes = next(iter(engine.tree.states.values())).bytes()  # room for one state only
        answers_of(engine, pictures[:1], [(PROMPTS[0],)])  # bucket (1, 1): the other must go
        assert all(ref() is None for ref in two) and list(engine.tree.states) == [(1, 1)]

        engine.tree.budget_bytes = None
        small = weakref.ref(engine.tree.states[(1, 1)])
        answers_of(engine, pictures[:1], [(Prompt("Describe this photo.", 700),)])  # more slots: made again
        assert small() is None and engine.tree.states[(1, 1)].slots > 700
        assert len(made) == 4 and [ref() is None for ref in made] == [True, True, True, False]
        engine.close()  # engine -> tree -> runners -> step -> engine._forward: a cycle, broken by close()
        assert all(ref() is None for ref in made)


# --- out of memory while capturing ----------------------------------------------------------------------


def test_out_of_memory_during_capture_reaches_the_retry_and_graphs_stay_on(
    tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture's private memory pool can be what does not fit: that is the retry's case (halves, smaller
    buckets, captured again), not a build that cannot capture."""
    tries: list[int] = []

    def capture(step: Any, device: torch.device) -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return step

    captures = _stand_in_cuda(monkeypatch, capture)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6))
    engine.graphs = engine.tree.bucketed = True
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:2]]
    with caplog.at_level(logging.WARNING):
        answers = answers_of(engine, pictures, [PROMPTS, PROMPTS])
    assert answers == [[reference_generate(tiny_model, p.image, prompt) for prompt in PROMPTS] for p in pictures]
    assert engine.graphs and engine.tree.bucketed  # graphs stay on
    assert (
        len(captures) == 2
    )  # the batch's capture ran out of memory; 4 units of width 1; its halves share bucket (2, 1): one more
    assert set(engine.tree.states) == {(2, 1)} and set(engine.tree.runners) == {(2, 1)}
    assert "retrying it in halves" in caplog.text and "without CUDA/HIP graphs" not in caplog.text


def test_the_state_of_a_capture_that_ran_out_of_memory_is_freed_without_a_garbage_collection(
    tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry's release() + empty_cache() must get that state's memory back then, not at the next gc: the
    runner that failed its first call holds no reference to itself."""

    def capture(step: Any, device: torch.device) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    _stand_in_cuda(monkeypatch, capture)
    made = _tracked_states(monkeypatch)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6))
    engine.graphs = engine.tree.bucketed = True
    released: list[bool] = []
    release = engine.tree.release

    def releasing() -> None:
        release()
        released.append(all(ref() is None for ref in made))  # what empty_cache() would find free now

    engine.tree.release = releasing
    picture = open_picture(corpus / IMAGES[0], max_pixels=10**9, draft_side=64)
    with _no_gc(), pytest.raises(Exception, match="GPU out of memory on a single image"):
        answers_of(engine, [picture, picture], [PROMPTS, PROMPTS])  # every capture fails: halves down to one
    assert made and released and all(released)


def test_a_step_past_dynamos_recompile_limit_decodes_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bucket's step is one code object to dynamo; its limit is raised for them, and where it is hit
    anyway (fullgraph makes that a hard failure, not a TorchDynamoException) the step runs as it is."""
    import torch._dynamo
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from autocaption.engine import runners

    def compile_(step: Any, **options: Any) -> Any:
        def compiled() -> None:
            raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    ran: list[str] = []
    refusals: list[str] = []
    # (config.patch, not monkeypatch: undoing a monkeypatch on dynamo's config module deletes the setting)
    with torch._dynamo.config.patch(recompile_limit=8):
        runner = runners.Compiled(lambda: ran.append("step"), on_refusal=refusals.append)
        assert torch._dynamo.config.recompile_limit >= runners.COMPILED_SHAPES
    runner()
    runner()
    assert ran == ["step", "step"] and len(refusals) == 1 and "recompile_limit" in refusals[0]


def test_a_step_that_fails_while_recording_ends_the_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_capture` itself, with torch.cuda's graph calls standing in: whatever the step raises, capture_end
    runs (the stream is usable again) and the error reaches the caller as it was."""
    from autocaption.engine import runners

    calls: list[str] = []

    class Graph:
        def capture_begin(self, pool: object, capture_error_mode: str) -> None:
            calls.append(f"begin {capture_error_mode}")

        def capture_end(self) -> None:
            calls.append("end")
            raise RuntimeError("operation failed due to a previous error during capture")

    @contextlib.contextmanager
    def stream(side: object) -> Iterator[None]:
        calls.append("on side stream")
        yield
        calls.append("back on the thread's stream")  # torch.cuda.stream's __exit__, reached as the error passes

    for name, stand_in in {"CUDAGraph": Graph, "current_stream": lambda device: _Stream(), "stream": stream,
                           "graph_pool_handle": lambda: (0, 7), "empty_cache": lambda: None}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, stand_in)
    monkeypatch.setattr(runners, "abandon_pool", lambda device, pool: calls.append(f"pool {pool} handed back"))

    def step() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        runners.capture(step, torch.device("cuda"), _Stream())
    # capture_end threw (as it does for an invalidated capture) before it gave the allocator its pool back
    assert calls == ["on side stream", "begin thread_local", "end", "pool (0, 7) handed back"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the stream after a real failed capture")
def test_a_refused_capture_leaves_the_default_stream_current() -> None:
    from autocaption.engine import runners

    device = torch.device("cuda")
    before = torch.cuda.current_stream(device)
    buffer = torch.zeros(4, device=device)

    def syncing_step() -> None:
        buffer.add_(1)
        buffer.sum().item()  # a host read: the capture is refused

    with pytest.raises(RuntimeError):
        runners.capture(syncing_step, device, torch.cuda.Stream(device))
    assert torch.cuda.current_stream(device) == before == torch.cuda.default_stream(device)
    buffer.add_(1)  # and the stream works
    torch.cuda.synchronize(device)


# --- one rule per image: no copy of the cache per query head ------------------------------------------------


def test_one_rule_per_image_never_copies_the_cache_per_query_head(
    tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree of width 1 (one query per row) goes through the folded attention too: transformers' sdpa with
    a mask copies every key/value head once per query head it serves (repeat_kv), every layer, every step."""
    from transformers.integrations import sdpa_attention

    copies: list[tuple[int, ...]] = []
    repeat_kv = sdpa_attention.repeat_kv

    def counting(hidden: torch.Tensor, groups: int) -> torch.Tensor:
        copies.append(tuple(hidden.shape))
        return repeat_kv(hidden, groups)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counting)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    prompt = Prompt("Describe this photo.", 16)
    answers = answers_of(engine, pictures, [(prompt,)] * 3)
    assert engine.tree.last.steps > 0 and copies == []
    monkeypatch.setattr(sdpa_attention, "repeat_kv", repeat_kv)  # the reference is transformers' own sdpa
    assert answers == [[reference_generate(tiny_model, p.image, prompt)] for p in pictures]


# --- batch_size: auto on a large GPU --------------------------------------------------------------------------


def test_batch_size_auto_packs_twenty_photos_into_one_tree_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real llava-v1.6 vision geometry (a 4:3 photo: ~2,300 image tokens) and the plan an H200
    gets for the 7B model, 20 photos x 3 rules are one tree batch: the tree path prefills one image at a
    time, so max_batch_tokens (16,384: 7 photos) bounds only the batched path, which still keeps to it."""
    from autocaption.engine import compat, loading, memory
    from tests.tinymodel import build_geometry

    kv = 131072  # bytes per token: llava-v1.6-mistral-7b in bf16
    plan = memory.plan_batches(free=125 * memory.GiB, total=140 * memory.GiB, kv_per_token=kv)
    monkeypatch.setattr(loading, "_batch_plan", lambda config, model, placement: plan)
    model = build_geometry(tmp_path / "geometry")
    rules = (Prompt("Describe.", 8), Prompt("Keywords.", 8), Prompt("Colour?", 8))
    photos = [Job(Image.new("RGB", (1024 + i, 768)), rules) for i in range(20)]
    for share_prefix in (True, False):
        engine: Any = load_engine(ModelConfig(id=str(model), share_prefix=share_prefix))
        cost = compat.image_tokens(engine.processor, 768, 1024)
        assert cost is not None and cost > 2000 and engine.max_batch_tokens == 16384  # a typical photo's tokens
        batches = engine._pack(engine._units(photos))
        if share_prefix:
            assert [len(batch) for batch in batches] == [20]  # was 7 per batch: 16384 // 2,300 image tokens
        else:  # one unit per (photo, rule), all prefilled in one forward: at most 16,384 tokens of them
            per_batch = 16384 // cost
            assert [len(batch) for batch in batches] == [per_batch] * (60 // per_batch) + [60 % per_batch] * (
                60 % per_batch > 0
            )


# --- the host looks behind the device -------------------------------------------------------------------------


def _decoder(lag: int, eos_at: dict[int, int]) -> tuple[TreeDecoder, Any]:
    """A tree decoder over a stand-in model whose row r emits token 1 until its position reaches
    eos_at[r], then EOS (0)."""
    decoder = TreeDecoder(pad_id=2, eos_ids={0}, dtype=torch.float32, device=torch.device("cpu"),
                          sliding_window=None, make_runner=lambda run: run, lag=lag)  # fmt: skip

    def forward(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        logits = torch.zeros((*ids.shape, 4))
        ends = torch.tensor([eos_at.get(row, 10**6) for row in range(ids.shape[0])])[:, None]
        logits[..., 1] = 1.0
        logits[..., 0] = (positions >= ends).float() * 2
        return logits

    return decoder, forward


def _prefilled(rows: int) -> list[Prefilled]:
    layers = [(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))]
    return [Prefilled(list(layers), 3, [[1], [1, 1]], [50, 50]) for _ in range(rows)]


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_the_host_stops_a_batch_at_most_lag_steps_after_its_last_answer_ended(lag: int) -> None:
    decoder, forward = _decoder(lag, eos_at={0: 9, 1: 14})
    tokens = decoder.run(_prefilled(2), forward)
    assert [len(t) for t in tokens] == [6, 5, 11, 10]  # ended at EOS, the same whatever the lag
    ended = 11  # the step that recorded the last EOS (row 1, first branch: fed its token at position 14)
    assert decoder.last.steps == ended + lag
    assert decoder.last.held_bytes < decoder.last.padded_bytes or not decoder.bucketed
