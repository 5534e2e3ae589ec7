"""Small path helpers shared by discovery, logging and writers."""

from __future__ import annotations

import os
from pathlib import Path

# Every temporary file autocaption creates starts with this prefix, so the watcher and the
# discovery walk can ignore them without ignoring anybody else's temp files.
TEMP_PREFIX = ".autocaption-tmp-"


def display(path: os.PathLike[str] | str) -> str:
    """A path as one printable line: control characters (a newline in a file name) are escaped, and so are
    the bytes of a name that is not valid UTF-8 (`bad\\xffname.jpg`)."""
    text = os.fspath(path)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # a byte that is not UTF-8, as Python's surrogateescape holds it
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return ascii(ch)[1:-1]


def text(name: os.PathLike[str] | str) -> str:
    """A name as text that UTF-8 can carry (JSON, prompts, logs): bytes that are not UTF-8 written `\\xff`.
    Lossy for such names only, so it is for showing and telling, never for finding the file again."""
    value = os.fspath(name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def db_key(path: os.PathLike[str] | str) -> str | bytes:
    """How a path is stored in the journal, losslessly: as text, or as its bytes when it is not valid UTF-8
    (SQLite's text is UTF-8; a BLOB holds any name the filesystem allows)."""
    value = os.fspath(path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(value)
    return value


def from_db(value: object) -> str:
    """A path as the journal stored it (`db_key`), back as the str that names the file."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def expand(path: str, *, relative_to: Path) -> Path:
    """`~` and environment variables expanded; relative paths taken from the config file's folder."""
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    return expanded if expanded.is_absolute() else relative_to / expanded
