"""Counts in words: "1 image", "2 images" (a person reads these lines; "1 images" and "image(s)" read badly)."""

from __future__ import annotations

IRREGULAR = {"is": "are", "was": "were"}


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun in the number it takes: counted(1, "folder") -> "1 folder"; thousands grouped."""
    return f"{n:,} {noun if n == 1 else plural or IRREGULAR.get(noun, noun + 's')}"
