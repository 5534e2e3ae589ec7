"""What runs a decode step of the tree decoder: as it is, compiled by inductor, and on a GPU captured as a
CUDA/HIP graph and replayed. A refusal (a torch that cannot trace the step, a build that cannot capture it)
is said once and turns that way off for every later bucket; the bucket that met it runs its step as it is."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from autocaption.engine import compat

log = logging.getLogger(__name__)

COMPILED_SHAPES = 256  # decode-step shapes dynamo may compile in one process (buckets x widths x regrowths)


class StepRunners:
    """The tree decoder's `make_runner`: each bucket's step compiled (inductor, whole graph, fixed shapes: any
    later recompile would be a bug) and on a GPU captured as a graph. `on_bucketing` hears whether steps
    still need fixed shapes after a refusal (padding batches up to buckets only pays where a step is
    compiled or captured)."""

    def __init__(self, device: torch.device, *, compile: bool, graphs: bool) -> None:
        self.device = device
        self.compile = compile
        self.graphs = graphs and device.type == "cuda"
        self.on_bucketing: Callable[[bool], None] = lambda bucketed: None
        # One side stream for every warm-up and capture: cuBLAS keeps a workspace per (handle, stream), and one
        # first made during a capture stays in that graph's private pool for good (inductor's cudagraph trees
        # note the same).
        self._capture_stream: Any = None

    @property
    def bucketed(self) -> bool:
        return self.compile or self.graphs

    def __call__(self, step: Callable[[], None]) -> Callable[[], None]:
        if self.compile:
            step = Compiled(step, on_refusal=self._compile_refused)
        if not self.graphs:
            return step
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        return Captured(step, self.device, self._capture_stream, on_refusal=self._capture_refused)

    def _compile_refused(self, reason: str) -> None:
        # Some torch/transformers pairs cannot trace the model's forward as one graph (torch 2.6 with
        # transformers 5.5 stops at the output-capturing decorator): decode uncompiled rather than fail.
        log.warning(
            "model.compile: torch %s cannot compile the decode step with transformers %s (%s); decoding "
            "uncompiled", torch.__version__, compat.VERSION, reason,
        )  # fmt: skip
        self.compile = False
        self.on_bucketing(self.graphs)

    def _capture_refused(self, reason: str) -> None:
        log.warning("decode steps run without CUDA/HIP graphs: the capture failed (%s)", reason)
        self.graphs = False
        self.on_bucketing(self.compile)  # the padded states nothing replays any more are freed


class Compiled:
    """A decode step through inductor: whole graph (fullgraph), fixed shapes, so any later recompile would
    be a bug. Tracing happens on the first call, before anything of the step runs; should torch refuse it,
    the step runs as it is from then on and `on_refusal` hears why."""

    def __init__(self, step: Callable[[], None], on_refusal: Callable[[str], None]) -> None:
        import torch._dynamo

        # Every bucket's step is the same code to dynamo: one entry per (rows, width, slots) shape. Its
        # default of 8 would end in a hard failure (fullgraph) at the 9th bucket of a long-running daemon.
        config = torch._dynamo.config
        for names in (("recompile_limit", "cache_size_limit"),  # (the names before torch 2.7)
                      ("accumulated_recompile_limit", "accumulated_cache_size_limit")):  # fmt: skip
            name = next((n for n in names if hasattr(config, n)), None)
            if name is not None:
                setattr(config, name, max(getattr(config, name), COMPILED_SHAPES))
        self.plain = step
        self.compiled = torch.compile(step, fullgraph=True, dynamic=False)
        self.on_refusal = on_refusal
        self.run: Callable[[], None] | None = None  # (not a bound method of self: no cycle before the first call)

    def __call__(self) -> None:
        (self.run or self._first)()

    def _first(self) -> None:
        # Tracing (Unsupported), the backend (BackendCompilerFailed) and fake-tensor runs all raise this; so
        # does a step past the recompile limit. Any other error is one of the step itself (out of memory) and
        # goes to the caller.
        from torch._dynamo import exc as dynamo

        names = ("TorchDynamoException", "FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # (the last: torch < 2.7)
        refusals = tuple(getattr(dynamo, name) for name in names if hasattr(dynamo, name))
        try:
            self.compiled()
        except refusals as exc:
            self.run = self.plain
            self.on_refusal(first_line(exc))
            self.plain()
            return
        self.run = self.compiled


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


class Captured:
    """A decode step as a CUDA/HIP graph: on its first call it runs once for real (on a side stream: the
    warm-up the capture needs) and is recorded; every later call replays the recording, one launch instead
    of ~2,000. Its buffers are the bucket's persistent state, so the recording stays valid. Should a build
    refuse the capture, the step runs as it is from then on and `on_refusal` hears why."""

    def __init__(self, step: Callable[[], None], device: torch.device, stream: Any,
                 on_refusal: Callable[[str], None]) -> None:  # fmt: skip
        self.step = step
        self.device = device
        self.stream = stream  # the engine's one capture stream
        self.on_refusal = on_refusal
        # Not `self._first` (a bound method: runner -> itself, and the step's state, kept until a gc when the
        # first call never comes or raises out of memory).
        self.run: Callable[[], None] | None = None

    def __call__(self) -> None:
        (self.run or self._first)()

    def _first(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.step()  # a real step, and the warm-up of what gets recorded (on the stream that records it)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        try:
            self.run = capture(self.step, self.device, self.stream)
        except torch.cuda.OutOfMemoryError:
            # Not a refusal: the engine retries the batch in halves, whose buckets capture again.
            raise
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            self.run = self.step
            self.on_refusal(first_line(exc))


def capture(step: Callable[[], None], device: torch.device, stream: Any) -> Callable[[], None]:
    """`step` recorded (not run) as a CUDA/HIP graph on `stream`; what replays it. Whatever the step raises,
    the capture is ended, its memory pool handed back, and the thread's current stream is the one it was:
    torch.cuda.graph's context manager leaves its capture stream current when the body raised, and with it
    every later kernel of the process. Errors are those of this thread only (thread_local): the
    preprocessing thread works on while the step records."""
    torch.cuda.empty_cache()  # while a capture is under way the allocator cannot give cached blocks back
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            step()  # recorded, not run
        except BaseException:
            try:
                graph.capture_end()
            except RuntimeError:  # the capture was invalidated: capture_end threw before releasing the pool
                abandon_pool(device, pool)
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay


def abandon_pool(device: torch.device, pool: Any) -> None:
    """What a failed capture_end leaves undone (it throws at cudaStreamEndCapture, before ending the pool):
    without it the caching allocator believes a capture is still under way, and from then on empty_cache()
    frees nothing and an allocation that fails never retries after freeing the cache."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
        torch._C._cuda_releasePool(index, pool)
    except (AttributeError, RuntimeError) as exc:  # private API: a build without it keeps the pool
        log.warning("%s: the failed capture's memory pool could not be handed back (%s); empty_cache() may "
                    "free nothing until the process restarts", device, first_line(exc))  # fmt: skip
