"""Turning a model's raw output into an answer that XML, EXIF and JSON can all carry."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# XML 1.0 forbids C0 controls other than tab/newline/CR, lone surrogates and U+FFFE/U+FFFF;
# EXIF strings end at NUL. DEL and C1 controls are legal XML but invisible junk in a caption.
_UNCARRIABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def clean_answer(raw: str, *, strip_prefixes: Sequence[str] = ()) -> str:
    """Strip whitespace and characters metadata cannot carry; drop opt-in boilerplate prefixes."""
    text = _UNCARRIABLE.sub("", unicodedata.normalize("NFC", raw)).strip()
    for prefix in strip_prefixes:
        if text.lower().startswith(prefix.lower()):
            rest = text[len(prefix) :].lstrip(" :,-–—\t\n")
            text = rest[:1].upper() + rest[1:]
            break
    return text
