"""Glob patterns with `**`, matched against paths relative to a root.

Python 3.10/3.11 have no `PurePath.full_match`, and `fnmatch` lets `*` cross folders; photographers
also expect `*.jpg` to match `IMG_0001.JPG`. So patterns are compiled here once, case-insensitively:
`*` and `?` stay inside one path segment, `**/` matches zero or more folders, `[...]` is a class.
A pattern without a slash (`*.jpg`) matches the file name at any depth, like `.gitignore`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath


def _translate(pattern: str) -> str:
    if "/" not in pattern:
        pattern = "**/" + pattern
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class GlobSet:
    """A compiled set of patterns; `matches` is true when any pattern matches the relative path."""

    patterns: tuple[str, ...]
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.patterns:
            object.__setattr__(self, "_regex", None)
            return
        joined = "|".join(f"(?:{_translate(p)})" for p in self.patterns)
        object.__setattr__(self, "_regex", re.compile(f"^(?:{joined})$", re.IGNORECASE | re.DOTALL))

    @classmethod
    def of(cls, patterns: Iterable[str]) -> GlobSet:
        return cls(tuple(patterns))

    def matches(self, relative: PurePosixPath | str) -> bool:
        return self._regex is not None and self._regex.match(str(relative)) is not None


def check_pattern(pattern: str) -> str | None:
    """Why a pattern is unusable, or None. Used by the config parser to reject mistakes early."""
    if not pattern.strip():
        return "empty pattern"
    if pattern.startswith("/"):
        return "patterns are relative to the watched folder; drop the leading '/'"
    try:
        re.compile(_translate(pattern))
    except re.error as exc:
        return f"invalid pattern ({exc})"
    return None
