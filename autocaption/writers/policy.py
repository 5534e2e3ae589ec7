"""Whose caption is it? Deciding what to write when a file already has a description."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Boilerplate:
    """A kind of text that cameras and programs put into a description by themselves. A description that is
    wholly one of these is nobody's caption: `existing: keep` replaces it."""

    kind: str
    # A regular expression the whole trimmed text must match, case-insensitively. {make}, {model} and
    # {software} stand for the photo's own EXIF Make, Model and Software (a branch naming one the photo lacks
    # matches nothing).
    pattern: str
    examples: tuple[str, ...]  # made up (with the same placeholders); the tests hold the table to them


_WORD = r"(?:image|images|picture|pictures|photo|photograph|jpeg|jpg)"
_VERSION = r"v?\d+(?:[._]\d+)*[a-z]?"
_DOTTED = r"v?\d+(?:[._]\d+)+[a-z]?"  # "2" alone is a person's number, "1.02" a version
BOILERPLATE: tuple[Boilerplate, ...] = (
    Boilerplate("the camera's own name", r"{make}|{model}|{make}\s+{model}|{software}",
                ("{make}", "{model}", "{make} {model}", "{software}")),
    Boilerplate(
        "a camera maker's default",
        r"(?-i:(?:[A-Z][A-Z0-9.,&-]*\s+){0,4})"  # the maker's name in capitals: "OLYMPUS", not "Our new"
        r"(?:digital\s+(?:still\s+)?camera|dsc|camera\s+pictures?)(?:\s+" + _WORD + ")?",
        ("OLYMPUS DIGITAL CAMERA", "SONY DSC", "KODAK Digital Still Camera", "SAMSUNG CAMERA PICTURES",
         "KODAK EASYSHARE C340 ZOOM DIGITAL CAMERA"),
    ),
    Boilerplate(
        "the model followed by a word",
        r"(?:{make}\s+)?{model}\s+(?:" + _WORD + r"|camera|digital\s+camera)",
        ("{model} Image", "{make} {model} picture", "{model} digital camera"),
    ),
    Boilerplate(
        "a generic placeholder",
        r"exif[_ ]?jpeg(?:[_ ]?(?:picture|image|422|420))?|default|untitled|no\s+description|description|"
        r"(?:digital\s+)?" + _WORD + r"|scanned\s+(?:image|document)|<?none>?|n/?a|null",
        ("Exif_JPEG_PICTURE", "default", "Untitled", "Digital image", "<none>", "Scanned image"),
    ),
    Boilerplate(
        "a path or file name on the memory card",
        r"(?:[a-z]:)?[\\/]?(?:dcim[\\/]\d{3}[a-z0-9_]{5}[\\/])?(?-i:[A-Z_][A-Z0-9_]{2,4}\d{3,5})"
        r"(?:\.(?:jpe?g|heic|hif|tiff?|dng|raw|x3f|arw|nef|cr[23]|orf|rw2))?"
        r"|dcim[\\/]\d{3}[a-z0-9_]{5}",
        ("DCIM\\100MSDCF\\DSC01234.JPG", "DCIM/101CANON/IMG_0042.JPG", "P1010001.JPG", "DSC_0042", "DCIM\\100OLYMP"),
    ),
    Boilerplate(
        "a standard's name and version",
        r"(?:dcf|exif|jfif|dpof|cipa\s+dc-\d+)[\s_-]*(?:ver(?:sion)?\.?\s*)?" + _VERSION
        + r"|print\s+image\s+matching(?:\s+ii)?",
        ("DCF 2.0", "Exif 2.32", "JFIF 1.02", "EXIF 0230", "Print Image Matching II"),
    ),
    Boilerplate(
        "a firmware or program name",
        r"(?:(?:firmware\s+)?(?:ver(?:sion)?\.?|firmware)\s*" + _DOTTED + r"|v\d+(?:[._]\d+)+[a-z]?)"
        r"(?:\s+(?:build|beta|release|final|rc)\s*\d*)?"
        r"|(?:created|edited|processed|made)\s+(?:with|by|in)\s+(?:the\s+)?(?:gimp|photoshop|lightroom|picasa|"
        r"paint\.net|irfanview|acdsee|snapseed|[\w.+-]+\s+" + _DOTTED + r")"
        r"|(?:adobe\s+)?(?:photoshop|lightroom|gimp|picasa|paint\s*shop\s*pro|acdsee|irfanview|snapseed|darktable|"
        r"digikam|hdr\+|lead\s+technologies(?:\s+inc\.?)?)"
        r"(?:\s+(?:cc|cs\d*|elements|express|classic|pro|x\d*|ultimate|" + _VERSION + r"|\(\w+\)|macintosh|windows))*",
        ("Ver.1.00", "Firmware Version 1.02", "V1.01 build", "Created with GIMP", "Adobe Photoshop CS6 (Windows)",
         "HDR+ 1.0.199571065z", "LEAD Technologies Inc. V1.01"),
    ),
)  # fmt: skip


_PLACEHOLDER = re.compile(r"\{(make|model|software)\}")


@functools.lru_cache(maxsize=256)
def _boilerplate(make: str | None, model: str | None, software: str | None) -> re.Pattern[str]:
    """One expression of every class, for a photo with this Make, Model and Software."""
    tags = {"make": make, "model": model, "software": software}

    def tag(match: re.Match[str]) -> str:
        value = (tags[match[1]] or "").strip()
        return re.escape(" ".join(value.split())) if value else "(?!)"  # (?!): a tag the photo lacks

    classes = (_PLACEHOLDER.sub(tag, entry.pattern) for entry in BOILERPLATE)
    return re.compile("|".join(f"(?:{pattern})" for pattern in classes), re.IGNORECASE)


def is_boilerplate(
    text: str | None, make: str | None = None, model: str | None = None, software: str | None = None
) -> bool:
    """Blank, or wholly one of the BOILERPLATE classes for a photo with this Make, Model and Software."""
    value = " ".join((text or "").strip(" \x00\t\r\n").split())
    if not value:
        return True
    return _boilerplate(make, model, software).fullmatch(value) is not None


@dataclass(frozen=True)
class Decision:
    text: str | None  # what to write, or None to leave the description alone
    note: str  # for the JSON record: "written", "kept: ..."


def decide_description(
    ours: str, existing: Sequence[str | None], own_previous: str | None, policy: str, make: str | None,
    model: str | None, software: str | None = None, what: str = "caption",
) -> Decision:  # fmt: skip
    """`existing`: descriptions found in the file/sidecar; `own_previous`: what we wrote last time; `what`: the
    field's name in the notes (a title, an alt text: the same policy)."""
    human = human_part(existing, own_previous, make, model, software)
    if human is None or policy == "overwrite":
        return Decision(ours, "written" if human is None else f"written: replaced a person's {what} (overwrite)")
    if policy == "append":
        return Decision(f"{human}\n\n{ours}", f"written: appended to a person's {what}")
    return Decision(None, f"kept: the file already has a person's {what} (output.existing: keep)")


def human_part(
    existing: Sequence[str | None], own_previous: str | None, make: str | None, model: str | None, software: str | None
) -> str | None:
    """The person's part of the existing description, or None when there is none."""
    for text in existing:
        if text is None or is_boilerplate(text, make, model, software):
            continue
        value = text.strip()
        if own_previous and value == own_previous.strip():
            continue  # our own text from an earlier run: ours to replace
        if own_previous and value.endswith("\n\n" + own_previous.strip()):
            value = value[: -len(own_previous.strip()) - 2].strip()  # appended earlier: keep only theirs
        return value
    return None


def split_keywords(answer: str) -> tuple[str, ...]:
    """Comma/newline/semicolon separated, trimmed (list bullets and quotes too), de-duplicated."""
    seen: dict[str, str] = {}
    for part in re.split(r"[,;\n\r\u2028\u2029]", answer):
        part = " ".join(part.split())  # a tab or any run of white space inside a keyword is one space
        word = part.strip().lstrip("-*•0123456789. ").strip(" \"'.").strip()
        if word and word.casefold() not in seen:
            seen[word.casefold()] = word
    return tuple(seen.values())


def merge_keywords(
    existing: Iterable[str], own_previous: Iterable[str], ours: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the keywords to write, those of them that are ours): every keyword a person or another tool set is
    kept, the ones we set last time are replaced. A word of ours the photo already has from someone else
    (in any letter case: "Dog" for our "dog") stays theirs and is not recorded as ours, or the next run, no
    longer proposing it, would delete their keyword. Ours of last time are matched exactly: one a person
    re-capitalised ("dog" made "Dog") is theirs now."""
    previous = set(own_previous)
    merged: dict[str, str] = {}
    for word in existing:
        if word not in previous:
            merged.setdefault(word.casefold(), word)
    theirs = set(merged)
    owned: dict[str, str] = {}
    for word in ours:
        if word.casefold() not in theirs:
            merged.setdefault(word.casefold(), word)
            owned.setdefault(word.casefold(), word)
    return tuple(merged.values()), tuple(owned.values())
