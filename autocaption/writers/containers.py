"""Putting EXIF and XMP blocks into JPEG, PNG and WebP files by editing segments/chunks only.

The compressed image data is never decoded or re-encoded: every byte we do not replace is copied.
Each `*_with` function takes the file's bytes and the new blocks (None = leave that block as it is) and
returns the new bytes, or raises `ContainerError` when the file cannot be edited safely.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from autocaption.writers import iptc
from autocaption.writers.exif import ExifError, Tiff

EXIF_HEADER = b"Exif\x00\x00"
XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
MAX_SEGMENT = 65533  # a JPEG segment's payload, length field excluded
MPF_HEADER = b"MPF\x00"  # APP2: the Multi-Picture Format index, a TIFF structure
MP_ENTRY = 0xB002  # its list of images: 16 bytes each, the offset at byte 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_XMP_KEYWORD = b"XML:com.adobe.xmp"


class ContainerError(ValueError):
    """The file's structure cannot be edited safely; the caller falls back to an XMP sidecar."""


@dataclass(frozen=True)
class Blocks:
    """The metadata blocks found in a file (the TIFF bytes of EXIF, the XMP packet)."""

    exif: bytes | None
    xmp: bytes | None
    # Further standard XMP packets (some JPEGs carry two APP1 XMP segments; readers disagree on which
    # counts). They are merged into the first, and the file is written back with one.
    more_xmp: tuple[bytes, ...] = ()
    iptc: bytes | None = None  # JPEG: the IPTC-IIM data in the Photoshop APP13 segment, when there is one
    # The IPTC digest stored beside it (MD5 of the IIM data when XMP was last synced; None when there is none).
    # It says which of IPTC and XMP a Metadata Working Group reader believes.
    iptc_digest: bytes | None = None


# --- JPEG -------------------------------------------------------------------------------------------


def _jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(marker, payload) for each segment before the scan, and where the scan starts (at SOS)."""
    if not data.startswith(b"\xff\xd8"):
        raise ContainerError("not a JPEG (no SOI marker)")
    segments: list[tuple[int, bytes]] = []
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ContainerError(f"JPEG marker structure broken at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xDA:  # SOS: entropy-coded data follows, copied verbatim
            return segments, pos
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            raise ContainerError(f"unexpected JPEG marker 0xFF{marker:02X} before the image data")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            raise ContainerError(f"JPEG segment at byte {pos} runs past the end of the file")
        segments.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length


# What decoding needs besides the tables: JFIF's APP0 and Adobe's APP14 (which says how the colours are coded).
_DECODING_APPS = (0xE0, 0xEE)


def jpeg_image_only(data: bytes) -> bytes | None:
    """The JPEG with nothing but its image: no EXIF, XMP, IPTC, ICC, comments or trailers (a camera's second
    image after EOI), before the first scan or between the scans of a progressive one. The pixels decode the
    same; the photo's GPS position and names stay on this machine. None when its structure cannot be
    followed."""
    try:
        segments, pos = _jpeg_segments(data)
    except ContainerError:
        return None
    out = [b"\xff\xd8", *(marker_segment(marker, payload) for marker, payload in segments if _decoding(marker))]
    while pos + 1 < len(data):  # at a marker: a scan (SOS and its entropy-coded data), a table, or EOI
        marker = data[pos + 1]
        if marker == 0xD9:
            return b"".join(out) + b"\xff\xd9"
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if _decoding(marker):
            out.append(data[pos:end])
        pos = end
        if marker == 0xDA:  # the scan's entropy-coded data, as it is
            pos = _entropy_end(data, end)
            if pos < 0:
                return None
            out.append(data[end:pos])
    return None


def _entropy_end(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data ends: at the next marker that is neither a stuffed 0xFF00 nor a
    restart marker (fill bytes 0xFF before a marker skipped); -1 at the end of the file."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return -1
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:
            pos += 1  # fill byte
        else:
            return pos


def _decoding(marker: int) -> bool:
    """A segment the decoder reads (tables, frame, restart interval, JFIF, Adobe), not metadata (APPn, COM)."""
    return marker in _DECODING_APPS or not (0xE0 <= marker <= 0xEF or marker == 0xFE)


def marker_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_blocks(data: bytes) -> Blocks:
    segments, _ = _jpeg_segments(data)
    exif = next((p[6:] for m, p in segments if m == 0xE1 and p.startswith(EXIF_HEADER)), None)
    packets = [p[len(XMP_HEADER) :] for m, p in segments if m == 0xE1 and p.startswith(XMP_HEADER)]
    iim, digest = _jpeg_iptc(segments)
    return Blocks(exif, packets[0] if packets else None, tuple(packets[1:]), iim, digest)


def _jpeg_iptc(segments: list[tuple[int, bytes]]) -> tuple[bytes | None, bytes | None]:
    """The IIM data of the one Photoshop APP13 segment and its digest. None when there is none, or when it is
    split over several segments or unparseable: then IPTC is left exactly as it is."""
    photoshop = [p for m, p in segments if m == 0xED and p.startswith(iptc.PHOTOSHOP_HEADER)]
    if len(photoshop) != 1:
        return None, None
    try:
        found = {r.id: r.data for r in reversed(iptc.resources(photoshop[0]))}  # the first of each id
    except iptc.IptcError:
        return None, None
    return found.get(iptc.IPTC_RESOURCE), found.get(iptc.DIGEST_RESOURCE)


def jpeg_with(data: bytes, new: Blocks) -> bytes:
    exif, xmp = new.exif, new.xmp
    segments, scan = _jpeg_segments(data)
    for name, header, block in (("EXIF", EXIF_HEADER, exif), ("XMP", XMP_HEADER, xmp)):
        if block is not None and len(header) + len(block) + 2 > MAX_SEGMENT + 2:
            raise ContainerError(f"{name} would need {len(header) + len(block)} bytes, over the 64 KB segment limit")
    out = list(segments)
    if new.iptc is not None:
        at = next(i for i, (m, p) in enumerate(out) if m == 0xED and p.startswith(iptc.PHOTOSHOP_HEADER))
        payload = iptc.with_iim(out[at][1], new.iptc)
        if len(payload) > MAX_SEGMENT:
            raise ContainerError(f"IPTC would need {len(payload)} bytes, over the 64 KB segment limit")
        out[at] = (0xED, payload)
    for header, block in ((EXIF_HEADER, exif), (XMP_HEADER, xmp)):
        if block is None:
            continue
        payload = header + block
        existing = [i for i, (m, p) in enumerate(out) if m == 0xE1 and p.startswith(header)]
        if existing:
            out[existing[0]] = (0xE1, payload)  # in place: the order of segments is kept
            for index in reversed(existing[1:]):  # merged into this one by the caller
                del out[index]
        else:
            out.insert(_insert_at(out, after_exif=header == XMP_HEADER), (0xE1, payload))
    shift = 2 + sum(4 + len(p) for _, p in out) - scan
    out = _mpf_moved(segments, out, shift)
    body = b"\xff\xd8" + b"".join(marker_segment(m, p) for m, p in out)
    return body + _moved_tail(data, scan, shift)


def _mpf_moved(old: list[tuple[int, bytes]], new: list[tuple[int, bytes]], shift: int) -> list[tuple[int, bytes]]:
    """The segments with the MPF index (APP2; cameras use it to point at a preview appended after the image)
    corrected. Its offsets count from its own header, so they only change when a segment after that header
    changed size: then every image it points to is `shift` minus what the header itself moved further away."""
    at_old = next((i for i, (m, p) in enumerate(old) if m == 0xE2 and p.startswith(MPF_HEADER)), None)
    if at_old is None:
        return new
    at_new = next(i for i, segment in enumerate(new) if segment is old[at_old])
    moved = sum(4 + len(p) for _, p in new[:at_new]) - sum(4 + len(p) for _, p in old[:at_old])
    if shift == moved:
        return new
    patched = list(new)
    patched[at_new] = (0xE2, _mpf_with_offsets_moved(old[at_old][1], shift - moved))
    return patched


def _mpf_with_offsets_moved(payload: bytes, delta: int) -> bytes:
    try:
        index = Tiff(payload[len(MPF_HEADER) :])
    except ExifError as exc:
        raise ContainerError(f"its MPF index cannot be read to move it ({exc})") from None
    entry = index.entries.get(MP_ENTRY)
    if entry is None or entry.size() % 16 or entry.size() <= 4:
        raise ContainerError("its MPF index has no image list to move")
    start = len(MPF_HEADER) + index.offset_of(entry)
    out = bytearray(payload)
    for at in range(start, start + entry.size(), 16):
        (offset,) = struct.unpack_from(index.order + "I", out, at + 8)
        if offset:  # 0: the primary image itself, which does not move relative to the file's start
            struct.pack_into(index.order + "I", out, at + 8, offset + delta)
    return bytes(out)


def _moved_tail(data: bytes, scan: int, shift: int) -> bytes:
    """The image data and whatever follows it, moved by `shift` bytes. An AFCP trailer (AXS File
    Concatenation Protocol: IPTC, a thumbnail or text appended after the image) points at its parts with
    offsets from the start of the file; they are moved with it, as exiftool does."""
    tail = data[scan:]
    afcp = _afcp(data) if shift else None
    if afcp is None:
        return tail
    order, start, offsets = afcp
    if start < scan:
        raise ContainerError("its AFCP trailer starts before the image data (it cannot be moved safely)")
    patched = bytearray(tail)
    for at in offsets:  # positions in `data` of the 4-byte offsets to move
        (value,) = struct.unpack_from(order + "I", data, at)
        struct.pack_into(order + "I", patched, at - scan, value + shift)
    struct.pack_into(order + "I", patched, len(data) - 8 - scan, start + shift)
    return bytes(patched)


def _afcp(data: bytes) -> tuple[str, int, list[int]] | None:
    """(byte order, start, where its offsets are) of an AFCP trailer at the end of a JPEG, None without one.
    One whose offsets are already wrong, or point outside it, raises: it cannot be moved safely."""
    end = data[-12:]
    if len(data) < 24 or end[:3] != b"AXS" or end[3:4] not in (b"!", b"*"):
        return None
    order = ">" if end[3:4] == b"!" else "<"
    (start,) = struct.unpack(order + "I", end[4:8])
    if start + 12 > len(data) - 12 or data[start : start + 4] != end[:4]:
        raise ContainerError("its AFCP trailer's offsets are already wrong (it cannot be moved safely)")
    (count,) = struct.unpack_from(order + "H", data, start + 6)
    if start + 12 + 12 * count > len(data) - 12:
        raise ContainerError("its AFCP trailer's directory runs past the end of the file")
    offsets = []
    for index in range(count):
        entry = start + 12 + 12 * index
        size, offset = struct.unpack_from(order + "II", data, entry + 4)
        if not start <= offset <= offset + size <= len(data) - 12:
            raise ContainerError("its AFCP trailer points outside itself (it cannot be moved safely)")
        offsets.append(entry + 8)
    return order, start, offsets


def _insert_at(segments: list[tuple[int, bytes]], *, after_exif: bool) -> int:
    """Where a new segment goes: after the EXIF APP1 (for XMP), else after leading APP0 (JFIF/JFXX)."""
    if after_exif:
        for i, (marker, payload) in enumerate(segments):
            if marker == 0xE1 and payload.startswith(EXIF_HEADER):
                return i + 1
    index = 0
    while index < len(segments) and segments[index][0] == 0xE0:
        index += 1
    return index


# --- PNG --------------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise ContainerError("not a PNG (bad signature)")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ContainerError(f"PNG chunk at byte {pos} is cut short")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise ContainerError(f"PNG chunk {kind!r} runs past the end of the file")
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            if pos != len(data):
                chunks.append((b"", data[pos:]))  # trailing bytes after IEND: kept as they are
            return chunks
    raise ContainerError("PNG has no IEND chunk")


def _png_xmp(body: bytes) -> bytes | None:
    if not body.startswith(PNG_XMP_KEYWORD + b"\x00"):
        return None
    rest = body[len(PNG_XMP_KEYWORD) + 1 :]
    compressed, _method = rest[0], rest[1]
    _language, _, rest = rest[2:].partition(b"\x00")
    _translated, _, text = rest.partition(b"\x00")
    try:
        return zlib.decompress(text) if compressed else text
    except zlib.error as exc:
        raise ContainerError(f"PNG XMP chunk is not valid zlib data ({exc})") from None


def png_blocks(data: bytes) -> Blocks:
    chunks = _png_chunks(data)
    exif = next((body for kind, body in chunks if kind == b"eXIf"), None)
    xmp = next((x for kind, body in chunks if kind == b"iTXt" and (x := _png_xmp(body)) is not None), None)
    if exif is not None and exif.startswith(EXIF_HEADER):
        exif = exif[6:]
    return Blocks(exif, xmp)


def png_with(data: bytes, new: Blocks) -> bytes:
    exif, xmp = new.exif, new.xmp
    chunks = _png_chunks(data)
    replacements: list[tuple[bytes, bytes, object]] = []
    if exif is not None:
        replacements.append((b"eXIf", exif, lambda kind, body: kind == b"eXIf"))
    if xmp is not None:
        itxt = PNG_XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + xmp
        replacements.append((b"iTXt", itxt, lambda kind, body: kind == b"iTXt" and _png_xmp(body) is not None))
    for kind, body, is_it in replacements:
        index = next((i for i, (k, b) in enumerate(chunks) if is_it(k, b)), None)  # type: ignore[operator]
        if index is not None:
            chunks[index] = (kind, body)
        else:
            first_data = next(i for i, (k, _) in enumerate(chunks) if k in (b"IDAT", b"IEND"))
            chunks.insert(first_data, (kind, body))
    out = [PNG_SIGNATURE]
    for kind, body in chunks:
        if not kind:
            out.append(body)
            continue
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


# --- WebP -------------------------------------------------------------------------------------------

_VP8X_EXIF, _VP8X_XMP, _VP8X_ALPHA = 0x08, 0x04, 0x10


def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ContainerError("not a WebP (bad RIFF header)")
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 != len(data):
        raise ContainerError(f"WebP RIFF size {riff_size + 8} does not match the file size {len(data)}")
    chunks: list[tuple[bytes, bytes]] = []
    pos = 12
    while pos < len(data):
        kind = data[pos : pos + 4]
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if pos + 8 + length > len(data):
            raise ContainerError(f"WebP chunk {kind!r} runs past the end of the file")
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length + (length & 1)
    return chunks


def webp_blocks(data: bytes) -> Blocks:
    chunks = dict(_webp_chunks(data))
    exif = chunks.get(b"EXIF")
    if exif is not None and exif.startswith(EXIF_HEADER):
        exif = exif[6:]
    return Blocks(exif, chunks.get(b"XMP "))


def _canvas(chunks: list[tuple[bytes, bytes]]) -> tuple[int, int, bool]:
    """Width, height and alpha of a simple (VP8/VP8L) WebP, to build the VP8X header it lacks."""
    kind, body = chunks[0]
    if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF, False
    raise ContainerError(f"WebP starts with an unexpected {kind!r} chunk")


def webp_with(data: bytes, new: Blocks) -> bytes:
    exif, xmp = new.exif, new.xmp
    chunks = _webp_chunks(data)
    if chunks[0][0] != b"VP8X":
        width, height, alpha = _canvas(chunks)
        flags = _VP8X_ALPHA if alpha else 0
        header = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks.insert(0, (b"VP8X", header))
    flags = chunks[0][1][0]
    for kind, block, flag in ((b"EXIF", exif, _VP8X_EXIF), (b"XMP ", xmp, _VP8X_XMP)):
        if block is None:
            continue
        flags |= flag
        index = next((i for i, (k, _) in enumerate(chunks) if k == kind), None)
        if index is not None:
            chunks[index] = (kind, block)
        else:
            chunks.append((kind, block))  # EXIF and XMP go last, in that order (WebP container spec)
    chunks[0] = (b"VP8X", bytes([flags]) + chunks[0][1][1:])
    body = b"".join(k + struct.pack("<I", len(b)) + b + (b"\x00" if len(b) & 1 else b"") for k, b in chunks)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body
