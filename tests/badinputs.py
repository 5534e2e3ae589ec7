"""The awkward files users really drop into photo folders, made fresh in a temp folder."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from PIL import Image

# name -> words the one error line must contain; files not listed here must be described.
FAILING = {
    "zero.jpg": "empty file",
    "truncated.jpg": "truncated",
    "notes.jpg": "not an image",
    "bomb.png": "above the limit",
    "self.jpg": "broken symlink or symlink loop",
    "loop": "symlink loop",
    "blocked.jpg": "cannot write sidecar",
}
WORKING = ["png-named.jpg", "cmyk.jpg", "deep16.png", "animated.gif", "café au lait.jpg", "new\nline.jpg"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: the pixel limit must refuse it before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad_inputs(folder: Path, corpus: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = (corpus / "jpg/gps/DSCN0010.jpg").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n", encoding="utf-8")
    (folder / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    Image.new("RGB", (80, 60), (20, 120, 200)).save(folder / "png-named.jpg", format="PNG")
    Image.new("CMYK", (64, 48), (10, 200, 30, 5)).save(folder / "cmyk.jpg", format="JPEG")
    Image.new("I;16", (70, 50), 40000).save(folder / "deep16.png")
    frames = [Image.new("P", (40, 40), i) for i in (1, 2, 3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    (folder / "café au lait.jpg").write_bytes(jpeg)
    (folder / "new\nline.jpg").write_bytes(jpeg)
    os.symlink("self.jpg", folder / "self.jpg")  # points at itself: ELOOP
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.jpg").write_bytes(jpeg)
    os.symlink("..", folder / "sub" / "loop")  # a folder loop back to the top
    (folder / "blocked.jpg").write_bytes(jpeg)
    (folder / "blocked.jpg.json").mkdir()  # the sidecar's name is taken by a folder: cannot be written
    return folder
