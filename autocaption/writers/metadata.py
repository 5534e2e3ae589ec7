"""Writing a caption into the photo (EXIF + XMP) or, when that is not safe, into an XMP sidecar.

Order of safety checks before a photo is rewritten: a format we can edit without re-encoding (JPEG,
PNG, WebP); not read-only; a single hard link; a symlink that stays inside its folder; EXIF and XMP
that parse. Anything else leaves the photo byte-identical and sends the caption to the sidecar, with
the reason logged once and recorded in the JSON sidecar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from autocaption.atomic import RefusedError, replace_faithfully, write_atomic
from autocaption.config import OutputConfig
from autocaption.errors import WriteError
from autocaption.images import sniff
from autocaption.paths import display, text
from autocaption.places import Place
from autocaption.textclean import carriable, carriable_keyword
from autocaption.writers import containers, exif, iptc, policy, xmp
from autocaption.writers.containers import Blocks, ContainerError
from autocaption.writers.exif import ExifError, Tiff
from autocaption.writers.xmp import XmpError

log = logging.getLogger(__name__)

_Reader = Callable[[bytes], Blocks]
_Writer = Callable[[bytes, Blocks], bytes]
EDITABLE: dict[str, tuple[_Reader, _Writer]] = {
    "JPEG": (containers.jpeg_blocks, containers.jpeg_with),
    "PNG": (containers.png_blocks, containers.png_with),
    "WEBP": (containers.webp_blocks, containers.webp_with),
}


@dataclass(frozen=True)
class Caption:
    description: str | None  # the answer of the rule that writes `description`
    keywords: tuple[str, ...] | None = ()  # None: leave the photo's keywords as they are (a person's edit)
    asked: bool = False  # some rule writes into the photo (so an empty caption means empty answers)
    # A person's correction (the review page): written as given — description and the whole keyword list —
    # and not marked as autocaption's, so later runs keep it under `existing: keep`.
    person: bool = False
    paths: tuple[str, ...] = ()  # the keywords' places in a hierarchy ("Animals|Dog"): lr:hierarchicalSubject
    # (target, language, text) of the other language-alternative texts (xmp.ALTERNATIVES): a title, an alt text,
    # an extended description, and the description in other languages. Language "x-default" is the default.
    texts: tuple[tuple[str, str, str], ...] = ()
    place: Place | None = None  # where the photo was taken (`output.location`): written only where none is

    @property
    def empty(self) -> bool:
        located = self.place is not None and not self.place.empty
        return self.description is None and not self.keywords and not self.person and not self.texts and not located

    def carriable(self) -> Caption:
        """The caption as XMP, EXIF and IPTC can carry it (textclean.carriable): a control character would
        make the packet unreadable for every later write, a raw CR would come back as LF and our own text
        would read as a person's. Model answers are clean already; this guards every other way in."""
        description = (carriable(self.description) or None) if self.description is not None else None
        words = None if self.keywords is None else map(carriable_keyword, self.keywords)
        keywords = None if words is None else tuple(word for word in words if word)
        texts = tuple((target, lang, carriable(text)) for target, lang, text in self.texts if carriable(text))
        place = self.place
        if place is not None:  # one line each (IPTC's datasets are lines)
            place = Place(
                **{k: carriable_keyword(v) or None if v else None for k, v in dataclasses.asdict(place).items()}
            )
        return dataclasses.replace(self, description=description, keywords=keywords, texts=texts, place=place)


@dataclass(frozen=True)
class WriteRecord:
    """What was written where, for the JSON sidecar's "written" entry."""

    file: str  # "embedded", "unchanged" or "dry-run"
    description: str
    keywords: str
    xmp_sidecar: str | None = None
    reason: str | None = None  # why the photo itself was not changed
    stat: os.stat_result | None = field(default=None, compare=False)  # the photo after writing
    sha256: str | None = None  # of the photo after writing, when it was rewritten
    texts: tuple[tuple[str, str], ...] = ()  # ("title", "written"), ("description (de)", "kept: ..."), ...

    def as_json(self) -> dict[str, Any]:
        record = {"file": self.file, "xmp_sidecar": self.xmp_sidecar, "description": self.description,
                  "keywords": self.keywords, "reason": self.reason}  # fmt: skip
        return record | ({"texts": dict(self.texts)} if self.texts else {})


@dataclass
class _Applied:
    """What `_apply` set: the description text, the merged keywords, and notes for the JSON record."""

    description: str | None = None
    keywords: tuple[str, ...] | None = None  # None: left as they were
    notes: tuple[str, str] = ("none", "none")
    title: str | None = None  # the x-default title set (EXIF XPTitle and IPTC ObjectName follow it)
    withdrawn_title: str | None = None  # our x-default title, taken out: its EXIF and IPTC copies go too
    place: dict[str, str] = field(default_factory=dict)  # the location fields set (IPTC follows them)
    texts: dict[str, str] = field(default_factory=dict)  # notes on the other texts, for the JSON record


@dataclass
class _Found:
    """What the file (or sidecar) already says."""

    descriptions: list[str | None]
    keywords: tuple[str, ...] = ()
    own_description: str | None = None
    own_keywords: tuple[str, ...] = ()
    make: str | None = None
    model: str | None = None
    software: str | None = None
    place: Place = field(default_factory=Place)  # the location fields a person or another tool wrote
    titles: list[str | None] = field(default_factory=list)  # EXIF XPTitle and IPTC ObjectName (XMP's: in it)
    located: bool = False  # the photo has a location field of any kind (output.location then writes none)
    own_place: Place | None = None  # the location autocaption wrote there (output.location)
    packet: xmp.Packet | None = None  # the photo's own XMP (a write to its sidecar heeds a person's texts in it)


@dataclass(frozen=True)
class Given:
    """What a person or another tool gave a photo, for the `{caption}`, `{keywords}` and place placeholders."""

    caption: str | None = None
    keywords: tuple[str, ...] = ()
    place: Place = field(default_factory=Place)


class MetadataWriter:
    def __init__(self, output: OutputConfig) -> None:
        self.output = output

    def carried(self, path: Path) -> tuple[str | None, tuple[str, ...]]:
        """The description and keywords the photo carries now, as a photo library reads them: from its XMP
        sidecar where it has one, else from the file itself (nothing, when neither can be read)."""
        facts = self._sidecar_facts(path)
        if facts is not None:
            return facts.description, facts.keywords
        try:
            found = _facts_of(path.read_bytes())
        except OSError:
            return None, ()
        return next((text for text in found.descriptions if text), None), found.keywords

    def carried_texts(self, path: Path) -> dict[str, str]:
        """The title, alt text and extended description (x-default) the photo carries now, read as `carried`."""
        facts = self._sidecar_facts(path)
        if facts is None:
            try:
                blocks = _blocks_of(path.read_bytes())
                facts = xmp.facts(xmp.parse_all(blocks.xmp, blocks.more_xmp)) if blocks and blocks.xmp else None
            except (OSError, XmpError):
                facts = None
        return facts.texts if facts is not None else {}

    def persons(self, path: Path) -> Given:
        """What a person or another tool gave the photo — its caption, keywords and location fields — for the
        placeholders: never autocaption's own earlier answer, nor a camera's boilerplate text. Read from its
        XMP sidecar where it has one (as `carried`; the file's location fields where the sidecar has none),
        else from the file."""
        try:
            found = _facts_of(path.read_bytes())
        except OSError:
            return Given()
        facts = self._sidecar_facts(path)
        if facts is not None:
            found.descriptions, found.keywords = [facts.description], facts.keywords
            found.own_description, found.own_keywords = facts.own_description, facts.own_keywords
            found.place = found.place if facts.place.empty else facts.place
            found.own_place = facts.own_place or found.own_place
        if found.place == found.own_place:  # autocaption's own earlier location: no person's word on it
            found.place = Place()
        caption = policy.human_part(found.descriptions, found.own_description, found.make, found.model, found.software)
        return Given(caption, tuple(word for word in found.keywords if word not in found.own_keywords), found.place)

    def _sidecar_facts(self, path: Path) -> xmp.XmpFacts | None:
        """What the photo's XMP sidecar says, None without a readable one."""
        try:
            return xmp.facts(xmp.parse(self.sidecar_path(path).read_bytes()))
        except (OSError, XmpError):
            return None

    def sidecar_path(self, image: Path) -> Path:
        name = image.stem + ".xmp" if self.output.sidecar_name == "stem" else image.name + ".xmp"
        return image.with_name(name)

    def write(self, path: Path, root: Path, caption: Caption, *, dry_run: bool = False) -> WriteRecord:
        caption = caption.carriable()
        if caption.empty:
            why = "the answers were empty: nothing to write" if caption.asked else "no rule writes into the photo"
            return WriteRecord("dry-run" if dry_run else "unchanged", "none", "none", reason=why)
        target = path.resolve()
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise WriteError.from_os(f"{display(path)}: cannot read for writing", exc) from None
        reason = self._why_not_embedded(path, target, root, data)
        found = _facts_of(data)
        applied = _Applied()
        new_stat = None
        if reason is None:
            try:
                new_data, applied = self._embed(data, caption, found)
            except (ContainerError, ExifError, XmpError, iptc.IptcError) as exc:
                reason = f"its metadata cannot be rewritten safely ({exc})"
            else:
                if not dry_run:
                    new_stat = self._replace(path, target, new_data)
        notes, texts = applied.notes, applied.texts
        sidecar = None
        if self.output.xmp_sidecar == "always" or (reason and self.output.xmp_sidecar == "auto"):
            sidecar, side = self._sidecar(path, caption, found, dry_run)
            notes, texts = (side.notes, side.texts) if reason else (notes, texts)
        elif reason:
            notes = ("not written: output.xmp_sidecar is never", "not written: output.xmp_sidecar is never")
            texts = dict.fromkeys(texts, "not written: output.xmp_sidecar is never")
        if reason:
            where = f"caption goes to {sidecar.name}" if sidecar else "caption is only in the JSON sidecar"
            log.info("%s: photo left unchanged: %s; %s", display(path), reason, where)
        file_state = "dry-run" if dry_run else "unchanged" if reason else "embedded"
        digest = hashlib.sha256(new_data).hexdigest() if new_stat is not None else None
        name = text(sidecar.name) if sidecar else None  # kept in the JSON sidecar, which is UTF-8
        return WriteRecord(file_state, notes[0], notes[1], name, reason, new_stat, digest, tuple(texts.items()))

    def _why_not_embedded(self, path: Path, target: Path, root: Path, data: bytes) -> str | None:
        kind = sniff(data[:16]) or "unknown format"
        if not self.output.embed:
            return "output.embed is false"
        if kind not in EDITABLE:
            return f"{kind} files are never rewritten (no lossless metadata edit)"
        if path.is_symlink() and not target.is_relative_to(root.resolve()):
            return f"it is a symlink to {display(target)}, outside {display(root)}"
        st = target.stat()
        if not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            return "the file is read-only"
        if st.st_nlink > 1:
            return f"the file has {st.st_nlink} hard links (the other names would keep the old content)"
        return None

    def _embed(self, data: bytes, caption: Caption, found: _Found) -> tuple[bytes, _Applied]:
        kind = sniff(data[:16])
        assert kind is not None
        read_blocks, write_blocks = EDITABLE[kind]
        blocks = read_blocks(data)
        tiff = Tiff(blocks.exif) if blocks.exif is not None else exif.new_block()
        packet = xmp.parse_all(blocks.xmp, blocks.more_xmp)
        applied = self._apply(packet, caption, found)
        updates: dict[int, tuple[int, bytes] | None] = {}
        if applied.description is not None:
            updates[exif.IMAGE_DESCRIPTION] = exif.ascii_value(applied.description)
            updates[exif.XP_COMMENT] = exif.xp_value(applied.description)
        if applied.keywords is not None:
            updates[exif.XP_KEYWORDS] = exif.xp_value(";".join(applied.keywords)) if applied.keywords else None
        if applied.title is not None:
            updates[exif.XP_TITLE] = exif.xp_value(applied.title)
        elif applied.withdrawn_title is not None and tiff.xp_text(exif.XP_TITLE) == applied.withdrawn_title:
            updates[exif.XP_TITLE] = None  # our title's copy for Windows goes with it
        new_exif = tiff.with_tags(updates) if updates else None
        new_iptc = _synced_iptc(blocks.iptc, applied)
        new_data = write_blocks(data, Blocks(new_exif, xmp.serialize(packet), iptc=new_iptc))
        _verify(new_data, data, kind)
        return new_data, applied

    def _apply(self, packet: xmp.Packet, caption: Caption, found: _Found) -> _Applied:
        """Set description and keywords in an XMP packet as the `existing` policy allows (a person's caption
        is kept, our earlier text and keywords replaced); the EXIF tags then mirror what was set."""
        applied = _Applied()
        if caption.person:  # only what the person changed: None leaves that field as the photo has it
            if caption.description is not None:
                xmp.set_description(packet, caption.description, None)
                applied.description = caption.description
            if caption.keywords is not None:
                xmp.set_keywords(packet, caption.keywords, (), person=True)
                applied.keywords = caption.keywords
            for target, lang, words in caption.texts:  # (an alt text: no longer autocaption's)
                xmp.set_alternative(packet, target, lang, words, None)
                applied.texts[_label(target, lang)] = "written: a person's correction"
            applied.notes = ("written: a person's correction", "written: a person's correction")
            return applied
        if caption.description is not None:
            decision = policy.decide_description(
                caption.description, found.descriptions, found.own_description, self.output.existing,
                found.make, found.model, found.software,
            )  # fmt: skip
            applied.notes = (decision.note, applied.notes[1])
            if decision.text is not None:
                xmp.set_description(packet, decision.text, caption.description)
                applied.description = decision.text
        if caption.keywords is not None and not caption.keywords and caption.asked and found.own_keywords:
            # No rule writes keywords for this photo any more (a match narrowed, a `write:` taken out): the
            # keywords autocaption wrote earlier go; a person's and other tools' stay.
            applied.keywords, _ = policy.merge_keywords(found.keywords, found.own_keywords, ())
            xmp.set_keywords(packet, applied.keywords, ())
            applied.notes = (applied.notes[0], "removed: autocaption's earlier keywords (no rule writes keywords)")
        if caption.keywords:
            applied.keywords, owned = policy.merge_keywords(found.keywords, found.own_keywords, caption.keywords)
            xmp.set_keywords(packet, applied.keywords, owned, paths=caption.paths)
            applied.notes = (applied.notes[0], "written")
        for target, lang, words in caption.texts:
            self._alternative(packet, target, lang, words, found, applied)
        if caption.asked:
            _withdraw(packet, caption, applied)
        if caption.place is not None and not caption.place.empty:
            applied.texts["location"] = _locate(packet, caption.place, found, applied)
        return applied

    def _alternative(
        self, packet: xmp.Packet, target: str, lang: str, text: str, found: _Found, applied: _Applied
    ) -> None:
        """One language of a title, alt text, extended description or description, as `existing` allows (the
        x-default title also as EXIF and IPTC have it: a person's title there is theirs, as it is in XMP)."""
        current, own = xmp.alternative(packet, target, lang)
        existing = [current]
        if found.packet is not None and found.packet is not packet:  # writing a sidecar: the photo's own XMP
            theirs, own_there = xmp.alternative(found.packet, target, lang)
            existing.append(theirs)
            own = own or own_there
        if lang == "x-default":  # a person's title in German only: ours must not become what readers show
            existing += [text for where in (packet, found.packet) if where is not None
                         for text in xmp.theirs(where, target)]  # fmt: skip
        if (target, lang) == ("title", "x-default"):  # EXIF's and IPTC's; IPTC's 64-byte copy of ours is ours
            existing += [title for title in found.titles if not _cut_copy(title, own)]
        what = target.replace("_", " ") + (f" in {lang}" if lang != "x-default" else "")
        decision = policy.decide_description(text, existing, own, self.output.existing, None, None, what=what)
        if decision.text is not None:
            xmp.set_alternative(packet, target, lang, decision.text, text)
            if (target, lang) == ("title", "x-default"):
                applied.title = decision.text
        applied.texts[_label(target, lang)] = decision.note

    def _replace(self, path: Path, target: Path, data: bytes) -> os.stat_result:
        try:
            return replace_faithfully(target, data)
        except RefusedError as exc:
            raise WriteError(f"{display(path)}: not rewritten: {exc}") from None
        except OSError as exc:
            raise WriteError.from_os(f"{display(path)}: cannot write", exc) from None

    def _sidecar(self, path: Path, caption: Caption, found: _Found, dry_run: bool) -> tuple[Path, _Applied]:
        """Merge the caption into `<image>.xmp`, keeping everything else in it (darktable history...)."""
        sidecar = self.sidecar_path(path)
        try:
            existing = sidecar.read_bytes()
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise WriteError.from_os(f"{display(sidecar)}: cannot read", exc) from None
        try:
            packet = xmp.parse(existing)
        except XmpError as exc:
            raise WriteError(f"{display(sidecar)}: existing sidecar left untouched: {exc}") from None
        side = xmp.facts(packet)
        where = side.place if not side.place.empty else found.place
        merged = _Found(
            descriptions=[side.description, *found.descriptions],
            keywords=side.keywords,
            own_description=side.own_description or found.own_description,
            own_keywords=side.own_keywords,
            make=found.make,
            model=found.model,
            software=found.software,
            place=where,
            titles=found.titles,
            located=side.located or found.located,
            own_place=side.own_place or found.own_place,
            packet=found.packet,
        )
        applied = self._apply(packet, caption, merged)
        if not dry_run:
            try:
                new = xmp.serialize(packet, padding=0)
                xmp.parse(new)  # a sidecar we could not read back would refuse every later write
                write_atomic(sidecar, new)
            except OSError as exc:
                raise WriteError.from_os(f"{display(sidecar)}: cannot write sidecar", exc) from None
            except XmpError as exc:
                raise WriteError(f"{display(sidecar)}: not written, it would not read back: {exc}") from None
        notes = applied.notes
        applied.notes = (f"{notes[0]} (sidecar)" if notes[0] != "none" else "none", notes[1])
        return sidecar, applied


def _facts_of(data: bytes) -> _Found:
    """Descriptions, keywords, camera make/model already in the file, as a Metadata Working Group reader sees
    them (nothing on unreadable metadata): the EXIF description when it is not blank, then XMP's, or IPTC's
    where the file's IPTC digest says IPTC is the newer (`_believed`)."""
    found = _Found(descriptions=[])
    blocks = _blocks_of(data)
    if blocks is None:
        return found
    facts = None
    if blocks.xmp is not None:
        try:
            found.packet = xmp.parse_all(blocks.xmp, blocks.more_xmp)
            facts = xmp.facts(found.packet)
        except XmpError:
            facts = None
    if facts:
        found.own_description, found.own_keywords = facts.own_description, facts.own_keywords
        found.place, found.located, found.own_place = facts.place, facts.located, facts.own_place
    if blocks.exif is not None:
        try:
            tiff = Tiff(blocks.exif)
        except ExifError:
            tiff = None
        if tiff is not None:
            found.descriptions.append(tiff.text(exif.IMAGE_DESCRIPTION))
            found.make, found.model = tiff.text(exif.MAKE), tiff.text(exif.MODEL)
            found.software = tiff.text(exif.SOFTWARE)
            found.titles.append(tiff.xp_text(exif.XP_TITLE))
    legacy = None
    if blocks.iptc is not None:
        try:
            legacy = iptc.facts(blocks.iptc)
        except iptc.IptcError:
            legacy = None
    if legacy is not None:
        found.titles.append(legacy.title)
        found.located = found.located or legacy.located
    if legacy is not None and legacy.place:  # each field from XMP where it has it, else from IPTC
        written = {name: value for name, value in dataclasses.asdict(found.place).items() if value}
        found.place = Place(**(legacy.place | written))
    xmp_description = facts.description if facts else None
    xmp_keywords = facts.keywords if facts else ()
    if legacy is None:
        found.descriptions.append(xmp_description)
        found.keywords = xmp_keywords
        return found
    in_sync = blocks.iptc_digest is None or blocks.iptc_digest == iptc.digest(blocks.iptc or b"")
    description = _believed(legacy.caption, xmp_description, in_sync, iptc.CAPTION_LIMIT)
    found.descriptions.append(description)
    if xmp_keywords and (in_sync or not legacy.keywords):
        found.keywords = xmp_keywords
    else:
        twins = [xmp_keywords[i] if i < len(xmp_keywords) else None for i in range(len(legacy.keywords))]
        pairs = zip(legacy.keywords, twins, strict=True)
        believed = (_believed(word, twin, False, iptc.KEYWORD_LIMIT) for word, twin in pairs)
        found.keywords = tuple(word for word in believed if word is not None)
    return found


def _withdraw(packet: xmp.Packet, caption: Caption, applied: _Applied) -> None:
    """Take out the texts autocaption wrote earlier that no rule gives now (a rule taken out, a language
    changed, an answer empty or its rule skipped), where they are still autocaption's; one a person changed
    since is theirs now and stays."""
    given = {(target, lang.casefold()) for target, lang, _ in caption.texts}
    for target in xmp.ALTERNATIVES:
        for lang, own, current in xmp.owned(packet, target):
            if (target, lang.casefold()) in given:
                continue
            if current != own:
                xmp.disown(packet, target, lang)
                continue
            xmp.set_alternative(packet, target, lang, None, None)
            applied.texts[_label(target, lang)] = "removed: autocaption's earlier text (no rule gives it now)"
            if (target, lang) == ("title", "x-default"):
                applied.withdrawn_title = own


def _cut_copy(value: str | None, full: str | None) -> bool:
    """`value` is IPTC's copy of `full` cut at ObjectName's limit (so it is not a person's title)."""
    if value is None or full is None or value == full or not full.startswith(value):
        return False
    return len(value.encode("utf-8")) > iptc.OBJECT_NAME_LIMIT - 4  # (a character is cut whole: up to 3 bytes short)


def _label(target: str, lang: str) -> str:
    """A text's name in the JSON record: "title", "description (de)"."""
    return target if lang == "x-default" else f"{target} ({lang})"


def _blocks_of(data: bytes) -> Blocks | None:
    """A file's metadata blocks (None when its container cannot be read)."""
    kind = sniff(data[:16])
    try:
        return EDITABLE[kind][0](data) if kind in EDITABLE else _pillow_blocks(data)
    except (ContainerError, OSError, ValueError):
        return None


def _believed(legacy: str | None, ours: str | None, in_sync: bool, limit: int) -> str | None:
    """The MWG choice between an IPTC value and its XMP twin (exiftool's MWG module reads the same): XMP, when
    it has the value and the IPTC digest matches or is missing (IPTC is a stale copy then); else IPTC, with
    a value that IPTC's length limit cut short taken whole from XMP. One departure, so that nothing is lost:
    where IPTC lacks the value altogether, XMP's counts (exiftool would read nothing)."""
    if ours is not None and (in_sync or legacy is None):
        return ours  # (with no IPTC value at all, XMP's is kept rather than read as deleted)
    if legacy is None or ours is None:
        return legacy
    cut_short = len(legacy.encode("utf-8")) == limit < len(ours.encode("utf-8")) and ours.startswith(legacy)
    return ours if cut_short else legacy


def _synced_iptc(iim: bytes | None, applied: _Applied) -> bytes | None:
    """New IPTC-IIM data carrying what was set in XMP, or None to leave the IPTC block as it is (none in the
    file, nothing set, or a legacy character set that UTF-8 text would change)."""
    title = applied.title
    if title is None and applied.withdrawn_title is not None and iim is not None:
        try:
            legacy = iptc.facts(iim).title
        except iptc.IptcError:
            legacy = None
        if legacy is not None and (legacy == applied.withdrawn_title or _cut_copy(legacy, applied.withdrawn_title)):
            title = ""  # our title's IPTC copy goes with it
    if iim is None or (applied.description is None and applied.keywords is None and title is None
                       and not applied.place):  # fmt: skip
        return None
    try:
        synced = iptc.with_caption(iim, applied.description, applied.keywords, title, applied.place)
    except iptc.IptcError as exc:
        log.info("IPTC left as it is: %s", exc)
        return None
    if synced is None:
        log.info("IPTC left as it is: it holds non-ASCII text in a legacy character set")
    return synced


def _pillow_blocks(data: bytes) -> Blocks:
    """EXIF and XMP of formats we never rewrite (TIFF, HEIC...), read through Pillow."""
    with Image.open(io.BytesIO(data)) as image:
        raw = image.info.get("exif")
        exif_bytes = raw[6:] if isinstance(raw, bytes) and raw.startswith(containers.EXIF_HEADER) else raw
        if exif_bytes is None and image.format == "TIFF":
            exif_bytes = data  # a TIFF file is itself a TIFF structure with IFD0
        packet = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
        legacy = _tiff_iim(data) if image.format == "TIFF" else None
        return Blocks(exif_bytes if isinstance(exif_bytes, bytes) else None,
                      packet.encode() if isinstance(packet, str) else packet, iptc=legacy)  # fmt: skip


_TIFF_IPTC = 33723  # IPTC-NAA: a TIFF's IPTC-IIM data (as UNDEFINED bytes, or as LONGs by older writers)


def _tiff_iim(data: bytes) -> bytes | None:
    """A TIFF's IPTC-IIM data, as stored (Pillow would read LONGs as numbers and warn)."""
    try:
        return Tiff(data).value(_TIFF_IPTC)
    except (ExifError, struct.error):
        return None


def _verify(new: bytes, old: bytes, kind: str) -> None:
    """The new file must parse as the same format with the same pixels size before it replaces the old."""
    read_blocks, _ = EDITABLE[kind]
    blocks = read_blocks(new)
    if blocks.exif is not None:
        Tiff(blocks.exif)
    if blocks.xmp is not None:
        xmp.parse(blocks.xmp)
    if blocks.more_xmp:
        raise ContainerError("the rewritten file still has more than one XMP packet")
    if blocks.iptc is not None:
        iptc.datasets(blocks.iptc)
    with Image.open(io.BytesIO(new)) as after, Image.open(io.BytesIO(old)) as before:
        if after.size != before.size or after.mode != before.mode:
            raise ContainerError("the rewritten file no longer decodes to the same image")


def _locate(packet: xmp.Packet, place: Place, found: _Found, applied: _Applied) -> str:
    """Write where the photo was taken into its location fields, only where it has none (in XMP or IPTC):
    a person's location, even a partial one, is never completed or changed."""
    ours = found.own_place is not None and found.place == found.own_place
    if (found.located or not found.place.empty) and not ours:
        return "kept: the photo already has a location"
    if ours and place == found.own_place:
        return "unchanged: " + (place.named or "")
    xmp.set_place(packet, place)  # (ours of an earlier run, a GPS position since changed: replaced whole)
    applied.place = {name: value or "" for name, value in dataclasses.asdict(place).items()}  # "": none in IPTC
    return "written: " + (place.named or "")
