"""IPTC-IIM in a JPEG's Photoshop APP13 segment: keeping Caption-Abstract and Keywords in step with XMP.

The Metadata Working Group asks writers to update IPTC-IIM only when a file already has it, and then to
keep it in sync with XMP (Apple Photos, Windows and older Lightroom catalogs read IPTC first). Every other
dataset and every other Photoshop resource (thumbnails, print settings, slices) keeps its bytes.

The IPTC digest (resource 0x0425, MD5 of the IIM data when XMP was last synced) tells Photoshop, Lightroom
and every MWG reader which of the two to believe: a matching or missing digest means XMP, a stale one means
IPTC was changed by a tool that knows no XMP. As exiftool's MWG writer does, a digest that matched is
updated and a missing one is added (IPTC and XMP now agree); a stale one stays stale, because the other IPTC
fields it vouches for (a city, a credit) are still newer than XMP's.

Text is written as UTF-8 and CodedCharacterSet (1:90) says so. A block without 1:90 whose texts are all
ASCII gains it (the texts read the same); one in a legacy character set with non-ASCII text is left alone
(rewriting it would change how its other texts are read): the caption is still in XMP and EXIF.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PHOTOSHOP_HEADER = b"Photoshop 3.0\x00"
IPTC_RESOURCE = 0x0404
DIGEST_RESOURCE = 0x0425
UTF8 = b"\x1b%G"  # ISO 2022 escape sequence for UTF-8
CODED_CHARACTER_SET = (1, 90)
KEYWORDS = (2, 25)
CAPTION = (2, 120)
OBJECT_NAME = (2, 5)  # the title
# The location datasets, in Place's terms: City, Sub-location, Province-State, Country-PrimaryLocationName.
PLACE = {"city": (2, 90), "sublocation": (2, 92), "region": (2, 95), "country": (2, 101)}
COUNTRY_CODE = (2, 100)
RECORD_VERSION = (2, 0)  # binary: the only record-2 dataset that is not text
# bytes, as the IIM specification sets them (exiftool enforces them)
CAPTION_LIMIT, KEYWORD_LIMIT, OBJECT_NAME_LIMIT = 2000, 64, 64


class IptcError(ValueError):
    """The Photoshop/IPTC structure cannot be parsed; the photo is then left unchanged."""


@dataclass(frozen=True)
class _Resource:
    id: int
    name: bytes  # the Pascal string as stored, padding included
    data: bytes


Dataset = tuple[int, int, bytes]  # record, dataset number, value


def resources(payload: bytes) -> list[_Resource]:
    """The image resource blocks of an APP13 payload (after the "Photoshop 3.0" header)."""
    if not payload.startswith(PHOTOSHOP_HEADER):
        raise IptcError("APP13 is not a Photoshop resource block")
    found, pos = [], len(PHOTOSHOP_HEADER)
    while pos < len(payload):
        if payload[pos : pos + 4] != b"8BIM" or pos + 7 > len(payload):
            raise IptcError(f"Photoshop resource at byte {pos} has no 8BIM signature")
        (ident,) = struct.unpack(">H", payload[pos + 4 : pos + 6])
        name_length = payload[pos + 6]
        name_end = pos + 6 + 1 + name_length + ((1 + name_length) & 1)  # padded to an even size
        if name_end + 4 > len(payload):
            raise IptcError(f"Photoshop resource 0x{ident:04x} is cut short")
        (size,) = struct.unpack(">I", payload[name_end : name_end + 4])
        start = name_end + 4
        if start + size > len(payload):
            raise IptcError(f"Photoshop resource 0x{ident:04x} runs past the segment")
        found.append(_Resource(ident, payload[pos + 6 : name_end], payload[start : start + size]))
        pos = start + size + (size & 1)
    return found


def iim_of(payload: bytes) -> bytes | None:
    """The IPTC-IIM data of an APP13 payload, or None when it has none."""
    return next((r.data for r in resources(payload) if r.id == IPTC_RESOURCE), None)


def digest(iim: bytes) -> bytes:
    return hashlib.md5(iim, usedforsecurity=False).digest()


def with_iim(payload: bytes, new: bytes) -> bytes:
    """The APP13 payload with new IIM data; the digest follows when it described the old data, and is added
    when there was none."""
    blocks = resources(payload)
    old = next((r.data for r in blocks if r.id == IPTC_RESOURCE), b"")
    if not any(r.id == DIGEST_RESOURCE for r in blocks):
        blocks.append(_Resource(DIGEST_RESOURCE, b"\x00\x00", digest(old)))
    out = [PHOTOSHOP_HEADER]
    for resource in blocks:
        data = resource.data
        if resource.id == IPTC_RESOURCE:
            data = new
        elif resource.id == DIGEST_RESOURCE and data == digest(old):
            data = digest(new)
        out.append(b"8BIM" + struct.pack(">H", resource.id) + resource.name + struct.pack(">I", len(data)) + data)
        if len(data) & 1:
            out.append(b"\x00")
    return b"".join(out)


def datasets(iim: bytes) -> list[Dataset]:
    found, pos = [], 0
    while pos < len(iim):
        if iim[pos] != 0x1C:
            if not iim[pos:].strip(b"\x00"):
                break  # padding at the end
            raise IptcError(f"IPTC dataset at byte {pos} has no tag marker")
        if pos + 5 > len(iim):
            raise IptcError("IPTC dataset header is cut short")
        record, number = iim[pos + 1], iim[pos + 2]
        (length,) = struct.unpack(">H", iim[pos + 3 : pos + 5])
        pos += 5
        if length & 0x8000:  # extended dataset: the next `length & 0x7FFF` bytes hold the length
            count = length & 0x7FFF
            length = int.from_bytes(iim[pos : pos + count], "big")
            pos += count
        if pos + length > len(iim):
            raise IptcError(f"IPTC dataset {record}:{number} runs past the block")
        found.append((record, number, iim[pos : pos + length]))
        pos += length
    return found


def _encode(items: Sequence[Dataset]) -> bytes:
    out = bytearray()
    for record, number, value in items:
        if len(value) > 0x7FFF:
            out += bytes([0x1C, record, number]) + struct.pack(">HI", 0x8004, len(value)) + value
        else:
            out += bytes([0x1C, record, number]) + struct.pack(">H", len(value)) + value
    return bytes(out)


@dataclass(frozen=True)
class IptcFacts:
    caption: str | None
    keywords: tuple[str, ...]
    place: dict[str, str] = field(default_factory=dict)  # Place's field names -> the first such dataset's text
    title: str | None = None
    located: bool = False  # any location dataset, a country code too


def facts(iim: bytes) -> IptcFacts:
    items = datasets(iim)
    encoding = "utf-8" if _is_utf8(items) else "cp1252"  # exiftool's default for IIM without 1:90
    keys = (CAPTION, KEYWORDS, OBJECT_NAME, *PLACE.values())
    texts = {key: [v.decode(encoding, "replace") for r, n, v in items if (r, n) == key] for key in keys}
    place = {name: texts[key][0].strip() for name, key in PLACE.items() if texts[key] and texts[key][0].strip()}
    title = texts[OBJECT_NAME][0] if texts[OBJECT_NAME] else None
    located = bool(place) or any((r, n) == COUNTRY_CODE and v.strip() for r, n, v in items)
    return IptcFacts(texts[CAPTION][0] if texts[CAPTION] else None, tuple(texts[KEYWORDS]), place, title, located)


def _is_utf8(items: Sequence[Dataset]) -> bool:
    return any((r, n) == CODED_CHARACTER_SET and v == UTF8 for r, n, v in items)


def with_caption(
    iim: bytes, description: str | None, keywords: Sequence[str] | None, title: str | None = None,
    place: Mapping[str, str] | None = None,
) -> bytes | None:  # fmt: skip
    """The IIM data with Caption-Abstract, Keywords, ObjectName and/or the location datasets (`PLACE`'s names)
    set (None: leave that one), or None when the block is in a legacy character set with non-ASCII text that
    UTF-8 would change."""
    items = datasets(iim)
    if not _is_utf8(items):
        legacy = any((r, n) != RECORD_VERSION and r == 2 and not v.isascii() for r, n, v in items)
        if legacy:
            return None
        items = _put(items, CODED_CHARACTER_SET, [UTF8])
    if description is not None:
        items = _put(items, CAPTION, [_cut(description, CAPTION_LIMIT)])
    if keywords is not None:
        items = _put(items, KEYWORDS, [_cut(word, KEYWORD_LIMIT) for word in keywords])
    if title is not None:  # ("": none)
        items = _put(items, OBJECT_NAME, [_cut(title, OBJECT_NAME_LIMIT)] if title else [])
    for name, value in (place or {}).items():  # City 32 bytes, the others 32 and 64 (IIM): exiftool's limits
        items = _put(items, PLACE[name], [_cut(value, 64 if name == "country" else 32)] if value else [])
    return _encode(items)


def _cut(text: str, limit: int) -> bytes:
    """UTF-8, at most `limit` bytes, never cutting a character in two."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def _put(items: list[Dataset], key: tuple[int, int], values: list[bytes]) -> list[Dataset]:
    """Replace every dataset `key` by `values`, where the first was, or in numeric order if there was none."""
    at = next((i for i, (r, n, _) in enumerate(items) if (r, n) == key), None)
    if at is None:
        at = next((i for i, (r, n, _) in enumerate(items) if (r, n) > key), len(items))
    kept = [item for item in items if (item[0], item[1]) != key]  # none of them stood before `at`
    return kept[:at] + [(key[0], key[1], value) for value in values] + kept[at:]
