"""exiftool as the independent reader of what we write."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# Groups that describe the file rather than its metadata, and tags that are offsets into the file
# (they move when a segment before them grows; the data they point to is compared separately).
IGNORED_GROUPS = {"System", "File", "ExifTool", "Composite"}
OURS = {
    "IFD0:ImageDescription", "IFD0:XPComment", "IFD0:XPKeywords", "XMP-dc:Description", "XMP-dc:Subject",
    # IPTC-IIM, kept in step with XMP where a file has it (and its digest, which says they agree)
    "IPTC:Caption-Abstract", "IPTC:Keywords", "IPTC:CodedCharacterSet", "Photoshop:IPTCDigest",
}  # fmt: skip


def require() -> str:
    exe = shutil.which("exiftool")
    if exe is None:
        pytest.fail("exiftool is required (Debian: libimage-exiftool-perl); tests/run.sh installs it")
    return exe


def tags(*paths: Path) -> dict[Path, dict[str, Any]]:
    """Every tag of every file, grouped (-G1), duplicates kept (-a), binary values as base64 (-b)."""
    out = subprocess.run(
        [require(), "-j", "-G1", "-a", "-b", "-charset", "utf8", *map(str, paths)],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return {Path(entry["SourceFile"]): entry for entry in json.loads(out or "[]")}


def values(path: Path, *names: str) -> dict[str, Any]:
    """Tags that must be asked for by name (exiftool's computed ones, e.g. CurrentIPTCDigest)."""
    out = subprocess.run(
        [require(), "-j", "-charset", "utf8", *(f"-{name}" for name in names), str(path)],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    entry: dict[str, Any] = json.loads(out or "[{}]")[0]
    return entry


def warnings(path: Path) -> set[str]:
    return warnings_of(path)[path]


def warnings_of(*paths: Path) -> dict[Path, set[str]]:
    """`exiftool -validate`'s warnings of each file, in one exiftool run (a run costs ~0.1 s of start-up)."""
    out = subprocess.run(
        [require(), "-validate", "-warning", "-a", "-s", "-s", "-s", *map(str, paths)],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    # Per file: "======== PATH" (only when there are several), the Validate summary ("OK", "3 Warnings (all
    # minor)"), then one line per warning; an indented last line counts the files read.
    blocks: dict[Path, list[str]] = {}
    current = blocks.setdefault(paths[0], []) if len(paths) == 1 else None
    for line in out.splitlines():
        if line.startswith("======== "):
            current = blocks.setdefault(Path(line.removeprefix("======== ")), [])
        elif current is not None and line.strip() and not line.startswith(" "):
            current.append(line)
    assert set(blocks) == set(paths), (sorted(blocks), out[-500:])
    return {path: set(lines[1:]) for path, lines in blocks.items()}


def comparable(entry: dict[str, Any], *, ignore: set[str] = OURS) -> dict[str, Any]:
    return {
        key: value
        for key, value in entry.items()
        if key != "SourceFile"
        and key.split(":")[0] not in IGNORED_GROUPS
        and key not in ignore
        and not key.startswith("XMP-autocaption:")
        and not key.split(":")[-1].endswith(("Offset", "Start", "Offsets"))
    }
