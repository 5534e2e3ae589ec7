"""Opening photos safely: one read, format sniffed from the bytes, a pixel limit, EXIF orientation
applied, and every mode (CMYK, 16-bit, palette, alpha) turned into plain RGB for the model."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from autocaption.errors import ImageError
from autocaption.paths import display
from autocaption.writers.containers import jpeg_image_only

log = logging.getLogger(__name__)

# Formats we hand to Pillow. Restricting the list keeps exotic, rarely-audited decoders away from
# files that land in a watched folder. HEIF joins when pillow-heif is installed (see `_heif`).
FORMATS = ["JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP"]

# We enforce our own, configurable pixel limit (images.max_pixels) right after the header is read
# and before any pixel is decoded; Pillow's fixed global limit would refuse 100 MP medium-format files.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every plugin so that `formats=` below can name them

_EXIF_IFD = 0x8769
_TAG_ORIENTATION = 0x0112
_TAG_DATETIME_ORIGINAL = 0x9003
_TAG_DATETIME = 0x0132
_TAG_MAKE = 0x010F
_TAG_MODEL = 0x0110
_GPS_IFD = 0x8825


@dataclass(frozen=True)
class Picture:
    """A decoded photo ready for a model, and what we learnt about the file on the way."""

    image: Image.Image  # RGB, upright
    format: str
    width: int  # upright size of the full-resolution image, before any draft reduction
    height: int
    sha256: str
    size_bytes: int
    facts: dict[str, str | None] = field(default_factory=dict)  # date, datetime, camera, gps: for placeholders
    position: tuple[float, float] | None = None  # EXIF GPS latitude, longitude in degrees (south, west < 0)
    # The file itself when it is a JPEG of exactly `image` (upright as stored, decoded at full size, RGB or
    # grey): a remote server can be sent these bytes instead of an image encoded again.
    jpeg: bytes | None = field(default=None, repr=False)


def _heif_available() -> bool:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    FORMATS.append("HEIF")
    return True


_HEIF = _heif_available()


def sniff(head: bytes) -> str | None:
    """The container format from the first bytes, or None. Used to give precise error messages."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis", b"avif"):
        return "HEIF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":  # reserved fields are zero
        return "BMP"
    return None


# What open_image and not_an_image say, the same words whichever tells it first.
_EMPTY = "{where}: empty file (0 bytes)"
_NO_HEIF = "{where}: HEIC/HEIF image: install pillow-heif (pip install 'autocaption[heic]') to read it"


def _unknown(where: str, kind: str | None) -> str:
    return f"{where}: not an image (content is {kind or 'not a known image format'})"


def not_an_image(path: Path) -> str | None:
    """Why this file is no image we can read, told from its header alone (no pixel decoded), or None. A
    one-shot run refuses a text file this way before it loads the model; damage past the header, and a file
    that cannot be read at all, are left for `open_image` to name."""
    where = display(path)
    kind = None
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
            if not head:
                return _EMPTY.format(where=where)
            kind = sniff(head)
            if kind == "HEIF":
                return None if _HEIF else _NO_HEIF.format(where=where)
            handle.seek(0)
            with Image.open(handle, formats=FORMATS):
                return None
    except UnidentifiedImageError:
        return _unknown(where, kind)
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def _facts(image: Image.Image, where: str) -> tuple[dict[str, str | None], tuple[float, float] | None]:
    """Capture date and time, camera and position for prompt placeholders, and the position in degrees;
    damaged EXIF just gives no facts."""
    try:
        exif = image.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception as exc:  # noqa: BLE001 - damaged EXIF must never cost us the picture
        log.info("%s: EXIF unreadable (%s); {date}, {datetime}, {camera} and {gps} will be 'unknown'", where, exc)
        return {"date": None, "datetime": None, "camera": None, "gps": None}, None
    raw_date = _exif_text(sub.get(_TAG_DATETIME_ORIGINAL) or exif.get(_TAG_DATETIME))
    date = moment = None
    if len(raw_date) >= 10 and raw_date[:4].isdigit():
        date = raw_date[:10].replace(":", "-")
        clock = raw_date[11:19]  # local time as the camera recorded it (EXIF has no zone here)
        moment = f"{date} {clock}" if re.fullmatch(r"\d\d:\d\d:\d\d", clock) else date
    make = _exif_text(exif.get(_TAG_MAKE))
    model = _exif_text(exif.get(_TAG_MODEL))
    # Many models already start with the make ("Canon EOS 40D"); do not say it twice.
    camera = model if make and model.lower().startswith(make.split()[0].lower()) else f"{make} {model}"
    position = _position(exif, where)
    gps = None
    if position is not None:
        (lat, lon) = position
        gps = f"{abs(lat):.4f} {'N' if lat >= 0 else 'S'}, {abs(lon):.4f} {'E' if lon >= 0 else 'W'}"
    return {"date": date, "datetime": moment, "camera": camera.strip() or None, "gps": gps}, position


def _position(exif: Image.Exif, where: str) -> tuple[float, float] | None:
    """The GPS position in degrees (south and west negative), or None without a usable one."""
    try:
        gps = exif.get_ifd(_GPS_IFD)
        parts = []
        for value_tag, ref_tag, sides in ((2, 1, "NS"), (4, 3, "EW")):
            degrees, minutes, seconds = (float(part) for part in gps[value_tag])
            ref = _exif_text(gps.get(ref_tag)).upper()[:1] or sides[0]
            value = degrees + minutes / 60 + seconds / 3600
            if ref not in sides or not math.isfinite(value) or value > (90 if sides == "NS" else 180):
                return None
            parts.append(-value if ref == sides[1] else value)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged GPS block costs the placeholder, never the photo
        log.info("%s: GPS unreadable (%s); {gps} will be 'unknown'", where, exc)
        return None
    return parts[0], parts[1]


def _exif_text(value: object) -> str:
    """An EXIF ASCII value as cameras really store it: cut at the first NUL, padding stripped."""
    return str(value or "").split("\x00", 1)[0].strip()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I")
    if image.mode in ("I", "F"):
        # 16-bit and float greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_TAG_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF means no rotation; `_facts` has logged it
        return 1
    return value if isinstance(value, int) else 1


def _orient(image: Image.Image, where: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:  # noqa: BLE001 - a broken Orientation tag: the pixels are still worth describing
        log.warning("%s: EXIF orientation could not be applied (%s); described as stored", where, exc)
        return image


def position_of(path: Path) -> tuple[float, float] | None:
    """The photo's GPS position from its EXIF, without decoding its pixels (None where it has none)."""
    try:
        with Image.open(path, formats=FORMATS) as opened:
            return _facts(opened, display(path))[1]
    except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError):
        return None


def open_picture(path: Path, *, max_pixels: int, draft_side: int | None = None) -> Picture:
    """Read `path` once, hash it, and decode it into an upright RGB image.

    `draft_side` lets JPEG decoding scale down by DCT (Pillow `draft`) to no less than that many
    pixels on each side: the model never sees more than about 1000 px, and a 50 MP decode is wasted.
    """
    where = display(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{where}: file disappeared before it could be read") from None
    except IsADirectoryError:
        raise ImageError(f"{where}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(_EMPTY.format(where=where))
    kind = sniff(data[:16])
    if kind == "HEIF" and not _HEIF:
        raise ImageError(_NO_HEIF.format(where=where))
    try:
        opened = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = opened.size
        if width * height > max_pixels:
            raise ImageError(
                f"{where}: {width}x{height} is {width * height / 1e6:.0f} MP, above the limit of "
                f"{max_pixels / 1e6:.0f} MP (images.max_pixels)"
            )
        facts, position = _facts(opened, where)
        upright = _orientation(opened) in (0, 1)
        if _orientation(opened) in (5, 6, 7, 8):
            width, height = height, width
        if draft_side and opened.format == "JPEG":
            opened.draft("RGB", (draft_side, draft_side))
        opened.seek(0)  # animated GIF/WebP: the first frame
        opened.load()
        as_is = kind == "JPEG" and upright and opened.mode in ("RGB", "L") and opened.size == (width, height)
        image = _to_rgb(_orient(opened, where))
    except UnidentifiedImageError:
        raise ImageError(_unknown(where, kind)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{where}: corrupt or truncated {kind or 'image'}: {exc}") from None
    return Picture(
        image=image,
        format=kind or str(opened.format),
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        facts=facts,
        position=position,
        jpeg=jpeg_image_only(data) if as_is else None,
    )
