"""Small path helpers shared by discovery, logging and writers."""

from __future__ import annotations

import os
from pathlib import Path

# Every temporary file autocaption creates starts with this prefix, so the watcher and the
# discovery walk can ignore them without ignoring anybody else's temp files.
TEMP_PREFIX = ".autocaption-tmp-"


def display(path: os.PathLike[str] | str) -> str:
    """A path as one printable line: control characters (a newline in a file name) are escaped."""
    text = os.fspath(path)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def expand(path: str, *, relative_to: Path) -> Path:
    """`~` and environment variables expanded; relative paths taken from the config file's folder."""
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    return expanded if expanded.is_absolute() else relative_to / expanded
