"""Whose caption is it? Deciding what to write when a file already has a description."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Text cameras put into ImageDescription by themselves: "OLYMPUS DIGITAL CAMERA", "SONY DSC",
# "KODAK Digital Still Camera", "Exif_JPEG_PICTURE", "default"...
_BOILERPLATE = re.compile(
    r"^\W*(?:[\w.,&-]+\s+){0,3}(?:digital\s+(?:still\s+)?camera|dsc|camera)\W*$"
    r"|^\W*(?:exif[_ ]jpeg(?:[_ ]picture)?|default|untitled|image|picture|photo)\W*$",
    re.IGNORECASE,
)


def is_boilerplate(text: str | None, make: str | None = None, model: str | None = None) -> bool:
    """Blank, equal to the camera's Make or Model, or a well-known camera default string."""
    value = (text or "").strip(" \x00\t\r\n")
    if not value:
        return True
    if any(value.casefold() == (known or "").strip().casefold() for known in (make, model) if known):
        return True
    return bool(_BOILERPLATE.match(value))


@dataclass(frozen=True)
class Decision:
    text: str | None  # what to write, or None to leave the description alone
    note: str  # for the JSON record: "written", "kept: ..."


def decide_description(
    ours: str, existing: Sequence[str | None], own_previous: str | None, policy: str, make: str | None,
    model: str | None,
) -> Decision:  # fmt: skip
    """`existing`: descriptions found in the file/sidecar; `own_previous`: what we wrote last time."""
    human = _human(existing, own_previous, make, model)
    if human is None or policy == "overwrite":
        return Decision(ours, "written" if human is None else "written: replaced a person's caption (overwrite)")
    if policy == "append":
        return Decision(f"{human}\n\n{ours}", "written: appended to a person's caption")
    return Decision(None, "kept: the file already has a person's caption (output.existing: keep)")


def _human(existing: Sequence[str | None], own_previous: str | None, make: str | None, model: str | None) -> str | None:
    """The person's part of the existing description, or None when there is none."""
    for text in existing:
        if text is None or is_boilerplate(text, make, model):
            continue
        value = text.strip()
        if own_previous and value == own_previous.strip():
            continue  # our own text from an earlier run: ours to replace
        if own_previous and value.endswith("\n\n" + own_previous.strip()):
            value = value[: -len(own_previous.strip()) - 2].strip()  # appended earlier: keep only theirs
        return value
    return None


def split_keywords(answer: str) -> tuple[str, ...]:
    """Comma/newline/semicolon separated, trimmed (list bullets and quotes too), de-duplicated."""
    seen: dict[str, str] = {}
    for part in re.split(r"[,;\n\r\u2028\u2029]", answer):
        part = " ".join(part.split())  # a tab or any run of white space inside a keyword is one space
        word = part.strip().lstrip("-*•0123456789. ").strip(" \"'.").strip()
        if word and word.casefold() not in seen:
            seen[word.casefold()] = word
    return tuple(seen.values())


def merge_keywords(existing: Iterable[str], own_previous: Iterable[str], ours: Iterable[str]) -> tuple[str, ...]:
    """Keep every keyword a person or another tool set, replace the ones we set last time."""
    previous = {k.casefold() for k in own_previous}
    merged: dict[str, str] = {}
    for word in [*(k for k in existing if k.casefold() not in previous), *ours]:
        merged.setdefault(word.casefold(), word)
    return tuple(merged.values())
