"""Turning a model's raw output into an answer that XML, EXIF and JSON can all carry."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# XML 1.0 forbids C0 controls other than tab/newline/CR, lone surrogates and U+FFFE/U+FFFF;
# EXIF strings end at NUL. DEL and C1 controls are legal XML but invisible junk in a caption.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # what XML 1.0 cannot hold at all
_UNCARRIABLE = re.compile(f"{NOT_XML.pattern}|[\x7f-\x9f]")
# Invisible characters that change how text around them reads or sorts: bidi overrides and isolates (a
# U+202E makes "gpj.exe" look like "exe.jpg"), zero-width spaces and joiners outside emoji, the BOM.
_INVISIBLE = re.compile("[\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_LINE_SEPARATORS = re.compile("[\u2028\u2029\r]\n?")


def carriable(raw: str) -> str:
    """`raw` as XML, EXIF and JSON can all carry it, without surrounding whitespace: NFC, no control
    characters or lone surrogates (an XMP packet holding one is unreadable, so every later write would
    refuse it), no invisible direction marks, and every line break a plain LF (XML turns a raw CR into LF
    when it reads the packet back, and our own caption would then read as a person's)."""
    text = _INVISIBLE.sub("", _UNCARRIABLE.sub("", unicodedata.normalize("NFC", raw)))
    return _LINE_SEPARATORS.sub("\n", text).strip()


def carriable_keyword(raw: str) -> str:
    """A keyword as `carriable` makes text, and on one line of single spaces (tabs and line breaks inside one
    are trouble for every tool that shows keywords)."""
    return " ".join(carriable(raw).split())


def clean_answer(raw: str, *, strip_prefixes: Sequence[str] = ()) -> str:
    """Strip whitespace and characters metadata cannot carry; drop opt-in boilerplate prefixes."""
    text = carriable(raw)
    for prefix in strip_prefixes:
        if text.lower().startswith(prefix.lower()):
            rest = text[len(prefix) :].lstrip(" :,-–—\t\n")
            text = rest[:1].upper() + rest[1:]
            break
    return text
