"""Prompt templates with a few named placeholders, filled without `str.format` or eval.

`{file}` the file name, `{folder}` its folder's name, `{date}` the EXIF capture date (YYYY-MM-DD),
`{datetime}` with the time, `{camera}` make and model, `{gps}` the position, `{caption}` and `{keywords}`
what a person already gave the photo, `{place}` (`{city}`, `{region}`, `{country}`) where it was taken
(PLACEHOLDERS). `{{` and `}}` are literal braces. A placeholder
whose value is unknown (a scan without EXIF) becomes "unknown". Templates are parsed when the config is read, so an
unknown name is a config error rather than a surprise at the first photo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

PLACEHOLDERS: Mapping[str, str] = {
    "file": "the image's file name",
    "folder": "the name of the folder holding the image",
    "date": "EXIF capture date as YYYY-MM-DD",
    "datetime": "EXIF capture date and time, YYYY-MM-DD HH:MM:SS, local as the camera recorded it",
    "camera": "camera make and model from EXIF",
    "gps": "the EXIF GPS position, rounded to about 10 m: 43.4674 N, 11.8851 E",
    "caption": "the caption a person (or another tool) already gave the photo, never autocaption's own",
    "keywords": "the keywords a person (or another tool) already gave the photo, never autocaption's own",
    "place": "where the photo was taken: the location a person gave it, else its GPS position's nearest town, "
    "region and country (offline): Arezzo, Tuscany, Italy",
    "city": "the city or town of {place}",
    "region": "the state, province or region of {place}",
    "country": "the country of {place}",
}
# What is read from the photo's metadata (not its EXIF facts), only when a rule asks for it.
GIVEN = frozenset({"caption", "keywords"})
UNKNOWN = "unknown"

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: literal text and placeholder names, alternating."""

    source: str
    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, text-or-name)

    @classmethod
    def parse(cls, source: str) -> PromptTemplate:
        parts: list[tuple[bool, str]] = []
        pos = 0
        for m in _TOKEN.finditer(source):
            if m.start() > pos:
                parts.append((False, source[pos : m.start()]))
            token = m.group(0)
            if token in ("{{", "}}"):
                parts.append((False, token[0]))
            elif m.group(1) is None:
                raise TemplateError(f"unmatched '{token}' at character {m.start() + 1}; write '{token * 2}'")
            elif m.group(1) not in PLACEHOLDERS:
                known = ", ".join("{" + n + "}" for n in PLACEHOLDERS)
                raise TemplateError(f"unknown placeholder {{{m.group(1)}}}; known: {known}")
            else:
                parts.append((True, m.group(1)))
            pos = m.end()
        if pos < len(source):
            parts.append((False, source[pos:]))
        return cls(source, tuple(parts))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(text for is_name, text in self.parts if is_name)

    def render(self, values: Mapping[str, str | None]) -> str:
        return "".join((values.get(text) or UNKNOWN) if is_name else text for is_name, text in self.parts)
