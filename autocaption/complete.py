"""Is a file finished being written? Structural checks by format, read from the file's tail only."""

from __future__ import annotations

import os
from pathlib import Path

from autocaption.images import sniff


def looks_complete(path: Path) -> bool:
    """JPEG ends with EOI, PNG with IEND, WebP's RIFF size matches; other formats: no structural test.

    False only means "looks unfinished": the caller waits longer, and eventually lets the decoder
    decide, so a truly truncated file still gets its clear error instead of waiting forever.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(16)
            handle.seek(max(0, size - 64))
            tail = handle.read(64)
    except OSError:
        return False
    kind = sniff(head)
    if kind == "JPEG":
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if kind == "PNG":
        return tail.endswith(b"IEND\xaeB`\x82")
    if kind == "WEBP":
        return int.from_bytes(head[4:8], "little") + 8 == size
    return size > 0


def stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
