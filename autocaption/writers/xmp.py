"""XMP packets: read the description and keywords, merge ours in without losing anything else.

Foreign XMP (darktable history, Lightroom develop settings, digiKam tags) is parsed with defusedxml
(no entity expansion, no external entities) and every property we do not own is kept. What
autocaption wrote is recorded in its own namespace (`autocaption:Description`, `autocaption:Keywords`)
so a later run can tell its own text from a person's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import defusedxml.ElementTree as SafeET

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "autocaption": "https://github.com/autocaption/autocaption/ns/1.0/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
}
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
PACKET_ID = "W5M0MpCehiHzreSzNTczkc9d"
_RDF = "{" + NS["rdf"] + "}"
_DC = "{" + NS["dc"] + "}"
_OWN = "{" + NS["autocaption"] + "}"
_LR = "{" + NS["lr"] + "}"
_PI = re.compile(rb"<\?xpacket[^>]*\?>")


class XmpError(ValueError):
    """The existing XMP cannot be parsed; it is then left alone."""


@dataclass(frozen=True)
class XmpFacts:
    description: str | None  # dc:description x-default
    keywords: tuple[str, ...]  # dc:subject
    own_description: str | None  # what autocaption wrote last time
    own_keywords: tuple[str, ...]


def _register(xml: bytes) -> None:
    """Keep the document's own prefixes when re-serialising (ElementTree would invent ns0, ns1)."""
    for prefix, uri in re.findall(rb'xmlns:([A-Za-z_][\w.-]*)="([^"]*)"', xml):
        try:
            ET.register_namespace(prefix.decode(), uri.decode())
        except ValueError:
            continue  # reserved prefixes (xml, ns0...) cannot be registered; ET picks its own


for _prefix, _uri in NS.items():
    ET.register_namespace(_prefix, _uri)


def parse(packet: bytes | None) -> ET.Element:
    """The x:xmpmeta element of a packet (or a new, empty one)."""
    if not packet or not packet.strip():
        return _empty()
    body = _PI.sub(b"", packet).strip().rstrip(b"\x00 \n\r\t")
    _register(body)
    try:
        root = SafeET.fromstring(body)
    except (ET.ParseError, ValueError) as exc:  # defusedxml raises ValueError subclasses for attacks
        raise XmpError(f"unreadable XMP ({exc})") from None
    if root.tag == _RDF + "RDF":  # a bare rdf:RDF without the x:xmpmeta wrapper
        meta = ET.Element("{adobe:ns:meta/}xmpmeta")
        meta.append(root)
        root = meta
    if root.find(_RDF + "RDF") is None:
        raise XmpError("XMP without an rdf:RDF element")
    return root


def parse_all(packet: bytes | None, more: Sequence[bytes] = ()) -> ET.Element:
    """One tree from a file's XMP packets: the first, with the properties only the others have added."""
    root = parse(packet)
    for other in more:
        merge(root, parse(other))
    return root


def merge(root: ET.Element, other: ET.Element) -> None:
    """Add the properties of `other` that `root` does not have (in any form); on a conflict the first wins."""
    about = _RDF + "about"
    present = {
        name for description in _descriptions(root) for name in (*description.attrib, *(c.tag for c in description))
    }
    for name, value in other.attrib.items():  # x:xmpmeta's own attributes (x:xmptk, the toolkit)
        root.attrib.setdefault(name, value)
    target = _descriptions(root)[0]
    rdf = other.find(_RDF + "RDF")
    for description in rdf.findall(_RDF + "Description") if rdf is not None else []:
        for name, value in description.attrib.items():
            if name != about and name not in present:
                target.set(name, value)
                present.add(name)
        for child in list(description):
            if child.tag not in present:
                target.append(child)
                present.add(child.tag)


def _empty() -> ET.Element:
    meta = ET.Element("{adobe:ns:meta/}xmpmeta")
    ET.SubElement(meta, _RDF + "RDF")
    return meta


def _descriptions(root: ET.Element) -> list[ET.Element]:
    rdf = root.find(_RDF + "RDF")
    assert rdf is not None
    found = rdf.findall(_RDF + "Description")
    if not found:
        found = [ET.SubElement(rdf, _RDF + "Description", {_RDF + "about": ""})]
    return found


def _find(root: ET.Element, tag: str) -> ET.Element | None:
    for description in _descriptions(root):
        element = description.find(tag)
        if element is not None:
            return element
    return None


def _items(element: ET.Element | None) -> list[ET.Element]:
    if element is None:
        return []
    container = next(iter(element), None)
    return [] if container is None else container.findall(_RDF + "li")


def facts(root: ET.Element) -> XmpFacts:
    items = _items(_find(root, _DC + "description"))
    default = next((li for li in items if li.get(XML_LANG) == "x-default"), items[0] if items else None)
    own = _find(root, _OWN + "Description")
    return XmpFacts(
        description=(default.text or "") if default is not None else None,
        keywords=tuple(li.text or "" for li in _items(_find(root, _DC + "subject"))),
        own_description=own.text if own is not None else None,
        own_keywords=tuple(li.text or "" for li in _items(_find(root, _OWN + "Keywords"))),
    )


def _replace(
    root: ET.Element, tag: str, container: str, values: Sequence[str], lang: bool, extra: Sequence[ET.Element] = ()
) -> None:
    """Set a property to an rdf:Alt/Bag of `values`, in the Description that already holds it."""
    target = None
    for description in _descriptions(root):
        existing = description.find(tag)
        if existing is not None:
            if target is None:
                target = (description, list(description).index(existing))
            description.remove(existing)
        description.attrib.pop(tag, None)  # a simple-valued attribute form would now be stale
    description, index = target if target else (_descriptions(root)[0], len(_descriptions(root)[0]))
    element = ET.Element(tag)
    box = ET.SubElement(element, _RDF + container)
    for value in values:
        li = ET.SubElement(box, _RDF + "li", {XML_LANG: "x-default"} if lang else {})
        li.text = value
    box.extend(extra)
    description.insert(index, element)


def _set_text(root: ET.Element, tag: str, value: str | None) -> None:
    """Set a simple property (None removes it)."""
    for description in _descriptions(root):
        existing = description.find(tag)
        if existing is not None:
            if value is None:
                description.remove(existing)
            else:
                existing.text = value
            return
    if value is not None:
        ET.SubElement(_descriptions(root)[0], tag).text = value


def set_description(root: ET.Element, text: str, own: str | None) -> None:
    """dc:description x-default = text (other languages kept); remember `own` as ours (None: the text is a
    person's, and nothing in it is autocaption's any more)."""
    tag = _DC + "description"
    others = [li for li in _items(_find(root, tag)) if li.get(XML_LANG) not in (None, "x-default")]
    _replace(root, tag, "Alt", [text], lang=True, extra=others)
    _set_text(root, _OWN + "Description", own)


def set_keywords(root: ET.Element, keywords: Sequence[str], own: Sequence[str]) -> None:
    """dc:subject = keywords; remember `own` as ours. Where the file has Lightroom's hierarchical keywords,
    ours are added there too as top-level entries (Immich and Lightroom ignore dc:subject when
    lr:hierarchicalSubject is present), replacing the ones we added last time; a person's stay."""
    hierarchical = _find(root, _LR + "hierarchicalSubject")
    if hierarchical is not None:
        previous = {(li.text or "").casefold() for li in _items(_find(root, _OWN + "Keywords"))}
        entries = [li.text or "" for li in _items(hierarchical)]
        kept = [entry for entry in entries if entry.casefold() not in previous]
        present = {entry.casefold() for entry in kept}
        _replace(root, _LR + "hierarchicalSubject", "Bag",
                 kept + [word for word in own if word.casefold() not in present], lang=False)  # fmt: skip
    if keywords:
        _replace(root, _DC + "subject", "Bag", keywords, lang=False)
    else:  # none left: no empty Bag (readers show it as an empty keyword)
        for description in _descriptions(root):
            for element in description.findall(_DC + "subject"):
                description.remove(element)
            description.attrib.pop(_DC + "subject", None)
    if own:
        _replace(root, _OWN + "Keywords", "Bag", own, lang=False)
    else:  # a person's keywords: none of them are autocaption's any more
        for description in _descriptions(root):
            for element in description.findall(_OWN + "Keywords"):
                description.remove(element)


def serialize(root: ET.Element, *, padding: int = 2048) -> bytes:
    """A complete packet with the standard wrapper and padding so other tools can edit in place."""
    body = ET.tostring(root, encoding="unicode")
    return (
        f'<?xpacket begin="\ufeff" id="{PACKET_ID}"?>\n{body}\n'
        + (" " * 99 + "\n") * (padding // 100)
        + '<?xpacket end="w"?>'
    ).encode("utf-8")
