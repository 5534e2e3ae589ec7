"""What a run tells the person watching: a progress bar on a terminal, one line per problem, and one
summary line at the end."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from autocaption.paths import display
from autocaption.pipeline import Described, Failed, Outcome, Skipped
from autocaption.plural import counted

log = logging.getLogger("autocaption")


@dataclass
class Summary:
    images: int = 0  # described in this run
    answers: int = 0
    earlier: int = 0  # answers recorded by an earlier run, written into the photo again
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    planned: list[str] = field(default_factory=list)  # dry run: what would be written
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    stopped: str | None = None  # why the run stopped before the end (the server is down)

    def add(self, outcome: Outcome) -> None:
        if isinstance(outcome, Described):
            if outcome.earlier:
                self.earlier += 1
            else:
                self.images += 1
                self.answers += outcome.answers
            if outcome.written is not None and outcome.written.file == "dry-run":
                self.planned.append(plan_line(outcome))
        elif isinstance(outcome, Skipped):
            self.skipped += 1
        else:
            self.failures.append(outcome.message)

    def stages_line(self) -> str:
        """Seconds per stage; counts ("… steps") and sizes ("… GB") as what they are."""
        return "stages: " + ", ".join(
            f"{name} {value:.0f}" if name.endswith("steps") else f"{name} {value:.2f}" if name.endswith("GB")
            else f"{name} {value:.2f} s"
            for name, value in self.stages.items()
        )  # fmt: skip

    def line(self) -> str:
        verb = "would be described" if self.planned else "described"
        earlier = f"{self.earlier:,} written again from recorded answers, " if self.earlier else ""
        return (
            f"{counted(self.images, 'image')} {verb}, {counted(self.answers, 'answer')}, {earlier}"
            f"{self.skipped} skipped, "
            f"{len(self.failures)} failed in {self.seconds:.1f} s{'; stopped early' if self.stopped else ''}"
        )


class Progress:
    """A one-line bar redrawn in place when `stream` is a terminal; silent otherwise."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = stream.isatty() and total > 0

    def advance(self, outcomes: list[Outcome]) -> None:
        self.done += len(outcomes)
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                self.clear()
                log.error("%s", outcome.message)
            elif isinstance(outcome, Skipped):
                log.debug("%s: skipped (%s)", outcome.path, outcome.reason)
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} images")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.WIDTH + 30) + "\r")
            self.stream.flush()


def report_unreadable(path: Path, reason: str) -> str:
    message = f"{display(path)}: {reason}"
    log.error("%s", message)
    return message


def plan_line(outcome: Described) -> str:
    """A dry run's report for one image: each answer, and where it would go."""
    written = outcome.written
    assert written is not None
    if written.reason is None:
        target = "into the photo (EXIF + XMP)"
    elif written.xmp_sidecar:
        target = f"into {written.xmp_sidecar} ({written.reason})"
    else:
        target = f"nowhere in the photo ({written.reason})"
    sidecar = display(outcome.json_sidecar.name) if outcome.json_sidecar else "none"
    lines = [f"{display(outcome.path)}: would write {target}; JSON sidecar {sidecar}"]
    for result in outcome.results:
        answer = f"not asked ({result.skipped})" if result.skipped else repr(result.answer)
        lines.append(f"  {result.rule.name}: {answer}")
    lines.append(f"  description: {written.description}; keywords: {written.keywords}")
    return "\n".join(lines)
