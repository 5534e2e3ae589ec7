"""Editing IFD0 of an EXIF (TIFF) block without moving a single existing byte.

piexif rebuilds the whole block on `dump`, which moves MakerNotes (their internal offsets then point
at garbage), drops tags it does not know and rewrites thumbnails. Here the new IFD0 is appended at
the end of the block and the header is pointed at it: every sub-IFD, MakerNote, thumbnail and value
stays at its offset. A second write finds its own IFD0 at the tail and replaces it, so the block does
not grow with every run.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import piexif

IMAGE_DESCRIPTION = piexif.ImageIFD.ImageDescription  # 0x010E
MAKE = piexif.ImageIFD.Make
MODEL = piexif.ImageIFD.Model
SOFTWARE = piexif.ImageIFD.Software  # 0x0131: the firmware or program that wrote the file
XP_TITLE = piexif.ImageIFD.XPTitle  # 0x9C9B, UTF-16LE bytes: Windows "Title"
XP_COMMENT = piexif.ImageIFD.XPComment  # 0x9C9C, UTF-16LE bytes: Windows "Comments"
XP_KEYWORDS = piexif.ImageIFD.XPKeywords  # 0x9C9E: Windows "Tags"
OWNED = frozenset({IMAGE_DESCRIPTION, XP_TITLE, XP_COMMENT, XP_KEYWORDS})

ASCII, BYTE = 2, 1
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
MINIMAL_TIFF = b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # little-endian, empty IFD0


class ExifError(ValueError):
    """The EXIF block cannot be rewritten safely (bad header, offsets outside the block...)."""


@dataclass(frozen=True)
class _Entry:
    tag: int
    type: int
    count: int
    field: bytes  # the 4-byte value-or-offset field, as stored

    def size(self) -> int:
        return _TYPE_SIZE[self.type] * self.count


class Tiff:
    def __init__(self, blob: bytes) -> None:
        if blob[:4] not in (b"II*\x00", b"MM\x00*"):
            raise ExifError("EXIF does not start with a TIFF header")
        self.blob = blob
        self.order = "<" if blob[:2] == b"II" else ">"
        (self.ifd0,) = self._unpack("I", 4)
        if not 8 <= self.ifd0 <= len(blob) - 2:
            raise ExifError(f"IFD0 offset {self.ifd0} is outside the {len(blob)}-byte EXIF block")
        (count,) = self._unpack("H", self.ifd0)
        self.ifd0_end = self.ifd0 + 2 + 12 * count + 4
        if count == 0 and self.ifd0_end > len(blob):
            self.ifd0_end = self.ifd0 + 2  # tolerate a missing next-IFD pointer on an empty IFD
        if self.ifd0_end > len(blob) or count > 1000:
            raise ExifError(f"IFD0 claims {count} entries, more than the EXIF block holds")
        self.entries: dict[int, _Entry] = {}
        for i in range(count):
            at = self.ifd0 + 2 + 12 * i
            tag, kind, n = self._unpack("HHI", at)
            if kind not in _TYPE_SIZE:
                raise ExifError(f"IFD0 tag 0x{tag:04x} has unknown type {kind}")
            entry = _Entry(tag, kind, n, blob[at + 8 : at + 12])
            if entry.size() > 4 and self._offset(entry) + entry.size() > len(blob):
                raise ExifError(f"IFD0 tag 0x{tag:04x} points outside the EXIF block")
            self.entries[tag] = entry
        self.next_ifd = blob[self.ifd0_end - 4 : self.ifd0_end] if count else b"\x00\x00\x00\x00"

    def _unpack(self, fmt: str, at: int) -> tuple[int, ...]:
        return struct.unpack_from(self.order + fmt, self.blob, at)

    def _offset(self, entry: _Entry) -> int:
        return int(struct.unpack(self.order + "I", entry.field)[0])

    def offset_of(self, entry: _Entry) -> int:
        """Where an entry's value lies in the block (one of over 4 bytes; smaller ones live in the entry)."""
        return self._offset(entry)

    def value(self, tag: int) -> bytes | None:
        entry = self.entries.get(tag)
        if entry is None:
            return None
        if entry.size() <= 4:
            return entry.field[: entry.size()]
        start = self._offset(entry)
        return self.blob[start : start + entry.size()]

    def text(self, tag: int) -> str | None:
        """An ASCII/UTF-8 string tag, cut at its NUL (cameras pad with NULs and spaces)."""
        raw = self.value(tag)
        if raw is None:
            return None
        return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()

    def xp_text(self, tag: int) -> str | None:
        """A Windows XP* tag's text (UTF-16LE, NUL-terminated)."""
        raw = self.value(tag)
        if raw is None:
            return None
        return raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0].strip()

    def _base(self) -> bytes:
        """The block without an IFD0 we appended last time: IFD0 at the end, followed only by values of the
        tags we own, back to back. A value of ours that lies before it (a camera's ImageDescription, kept
        while only keywords or a title are written) stays where it is and does not stop the cut: if it did,
        every write would append another IFD0 and the file would grow each time."""
        tail = []
        for entry in self.entries.values():
            if entry.size() <= 4 or self._offset(entry) < self.ifd0:
                continue
            if entry.tag not in OWNED:
                return self.blob  # another tool's value after IFD0: the original layout, or not ours to cut
            tail.append((self._offset(entry), entry.size()))
        end = self.ifd0_end
        for offset, size in sorted(tail):
            if offset != end:
                return self.blob
            end = offset + size + (size & 1)
        if end == len(self.blob) and self.ifd0 >= 8:
            return self.blob[: self.ifd0]
        return self.blob

    def with_tags(self, updates: Mapping[int, tuple[int, bytes] | None]) -> bytes:
        """A new block with IFD0 tags set (type, value bytes) or removed (None); nothing else moves.

        Numeric values must already be in the block's byte order; text and byte arrays have none.
        """
        entries = dict(self.entries)
        new_values: dict[int, tuple[int, bytes]] = {}
        for tag, update in updates.items():
            entries.pop(tag, None)
            if update is not None:
                new_values[tag] = update
        base = self._base()
        # A value that stays (a person's ImageDescription under `existing: keep`) may live in the tail just cut
        # off with our previous IFD0: it is carried into the new block, or its entry would point past the end.
        for tag, entry in entries.items():
            if tag not in new_values and entry.size() > 4 and self._offset(entry) + entry.size() > len(base):
                value = self.value(tag)
                assert value is not None
                new_values[tag] = (entry.type, value)
        if len(base) & 1:
            base += b"\x00"
        tags = sorted(set(entries) | set(new_values))
        ifd_size = 2 + 12 * len(tags) + 4
        data_at = len(base) + ifd_size
        ifd = bytearray(struct.pack(self.order + "H", len(tags)))
        data = bytearray()
        for tag in tags:
            if tag in new_values:
                kind, raw = new_values[tag]
                if len(raw) <= 4:
                    field = raw.ljust(4, b"\x00")
                else:
                    field = struct.pack(self.order + "I", data_at + len(data))
                    data += raw + (b"\x00" if len(raw) & 1 else b"")
                ifd += struct.pack(self.order + "HHI", tag, kind, len(raw) // _TYPE_SIZE[kind]) + field
            else:
                e = entries[tag]
                ifd += struct.pack(self.order + "HHI", e.tag, e.type, e.count) + e.field
        ifd += self.next_ifd
        header = self.blob[:4] + struct.pack(self.order + "I", len(base))
        return header + base[8:] + bytes(ifd) + bytes(data)


def ascii_value(text: str) -> tuple[int, bytes]:
    """UTF-8 in an ASCII tag, as the Metadata Working Group recommends and exiftool reads."""
    return ASCII, text.encode("utf-8") + b"\x00"


def xp_value(text: str) -> tuple[int, bytes]:
    """Windows XP* tags: UTF-16LE in a BYTE array, NUL-terminated."""
    return BYTE, text.encode("utf-16-le") + b"\x00\x00"


def new_block() -> Tiff:
    """An EXIF block for a file that has none, with the IFD0 tags EXIF requires of a JPEG (72 dpi,
    as exiftool writes them) so validators stay quiet."""
    rational_72 = (5, struct.pack("<II", 72, 1))
    short = 3
    blob = Tiff(MINIMAL_TIFF).with_tags(
        {
            piexif.ImageIFD.XResolution: rational_72,
            piexif.ImageIFD.YResolution: rational_72,
            piexif.ImageIFD.ResolutionUnit: (short, struct.pack("<H", 2)),  # inches
            piexif.ImageIFD.YCbCrPositioning: (short, struct.pack("<H", 1)),  # centered
        }
    )
    return Tiff(blob)
