"""The engine interface: images and prompts in, answers with token counts and timings out.

Every backend (in-process transformers, a remote OpenAI-compatible server) implements `Engine` in its
own module. Nothing here imports torch, so the CLI, config checks and tests of other layers stay fast.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from autocaption.errors import EngineError
from autocaption.plural import counted
from autocaption.structure import AnswerInvalid, Gate, Structure


@dataclass(frozen=True)
class Prompt:
    """One question about an image, already rendered from a rule's template."""

    text: str
    max_new_tokens: int
    system: str | None = None
    structure: Structure | None = None  # what the answer may be: a grammar in-process, a schema remotely
    # The prompt whose answer decides whether this one runs (its index among the job's prompts), and how.
    after: int | None = None
    gate: Gate | None = None


@dataclass(frozen=True)
class Job:
    """One image and every prompt to ask about it (rules that match the same file share the image)."""

    image: Image.Image
    prompts: tuple[Prompt, ...]
    jpeg: bytes | None = None  # the photo's file, when it is a JPEG of exactly `image` (a remote engine sends it)


@dataclass(frozen=True)
class Answer:
    text: str  # the decoded new tokens, before any clean-up
    prompt_tokens: int  # tokens the model read: template, prompt and image tokens
    new_tokens: int  # tokens it generated, end-of-sequence excluded
    seconds: float  # this answer's share of the wall time of the batch that produced it
    skipped: str | None = None  # not asked: its gate's answer did not admit it ("document is no")


def skipped(reason: str) -> Answer:
    return Answer("", 0, 0, 0.0, skipped=reason)


def flattened(jobs: Sequence[Job]) -> list[Prompt]:
    """Every prompt of the request in order, a gated one's `after` made its gate's index in this list."""
    prompts: list[Prompt] = []
    for job in jobs:
        start = len(prompts)
        prompts += [prompt if prompt.after is None else dataclasses.replace(prompt, after=start + prompt.after)
                    for prompt in job.prompts]  # fmt: skip
    return prompts


def next_round(prompts: Mapping[int, Prompt], answers: dict[int, Answer]) -> list[int]:
    """The prompts to ask next, in order: not yet answered, and without a gate or with one that answered and
    admits them. Those whose gate answered otherwise are answered here as skipped; gates are earlier prompts,
    so a chain's later links are decided in the same pass. Empty once nothing more can be asked. `after` is an
    index (a key) of `prompts`."""
    ready = []
    for index, prompt in prompts.items():
        if index in answers or (prompt.after is not None and prompt.after not in answers):
            continue
        reason = None if prompt.after is None else gate_verdict(prompt, prompts[prompt.after], answers[prompt.after])
        if reason is None:
            ready.append(index)
        else:
            answers[index] = skipped(reason)
    return ready


def gate_verdict(prompt: Prompt, gating: Prompt, answer: Answer) -> str | None:
    """None when `prompt` runs, given the answer to the prompt that gates it; else why it does not."""
    assert prompt.gate is not None
    if answer.skipped is not None:
        return f"{prompt.gate.rule} was not asked"
    value: object = answer.text
    if gating.structure is not None:
        try:
            value = gating.structure.read(answer.text)
        except AnswerInvalid:
            return f"{prompt.gate.rule} gave no valid answer"
    return None if prompt.gate.admits(value) else f"{prompt.gate.rule} is not {' or '.join(prompt.gate.values)}"


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # "transformers", "openai"
    model_id: str
    device: str  # "cuda:0 (NVIDIA H100, CUDA 12.8)", "cpu"
    dtype: str
    # The longest image side the model can use; callers may decode big JPEGs down to this (DCT draft).
    max_image_side: int | None = None
    system_role: bool = True  # the prompt template carries a system turn (rules' `system:` can be honoured)
    batch_images: int = 4  # images per call that keep the model busy (callers hand it this many at a time)


class Cancelled(Exception):
    """`describe` was stopped through its `cancel` event; no answer of the call may be used."""


class PartlyAnswered(EngineError):
    """Some images of a batch were answered and some failed: `answers[i]` is None where jobs[i] failed and
    `errors[i]` says why. The answers received are kept; only the failed images are tried again."""

    def __init__(self, answers: list[list[Answer] | None], errors: dict[int, EngineError]) -> None:
        first = next(iter(errors.values()))
        what = f"{len(errors)} of {counted(len(answers), 'image')} failed: {first}"
        super().__init__(what, transient=first.transient)
        self.answers, self.errors = answers, errors


class Engine(Protocol):
    info: EngineInfo
    timings: dict[str, float]  # seconds spent per stage ("preprocess", "vision+prefill", "decode")

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        """Answer every prompt of every job; result[i][j] answers jobs[i].prompts[j].

        When `cancel` is set the engine stops as soon as it can and raises `Cancelled`.
        """
        ...

    def close(self) -> None:
        """Release the model (GPU memory, connections)."""
        ...
