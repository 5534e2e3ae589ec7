"""XMP packets: read the description and keywords, merge ours in without losing anything else.

A packet is edited, never rebuilt. It is parsed twice: by defusedxml into a tree (no entity expansion, no
external entities) that is read and changed, and by expat for where each element lies in the bytes. On
writing, only the properties that changed (dc:description, dc:subject, lr:hierarchicalSubject, autocaption's
own) are cut out and written again where they were; every other byte stays as it was: other tools'
properties, their namespace prefixes and declarations (used or not), comments, white space, the xpacket
wrapper. A property we add takes the prefix already in scope for its namespace, and a declaration on its
rdf:Description when there is none. What autocaption wrote is recorded in its own namespace
(`autocaption:Description`, `autocaption:Keywords`) so a later run can tell its own text from a person's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from xml.parsers import expat

import defusedxml.ElementTree as SafeET

from autocaption.places import Place
from autocaption.textclean import NOT_XML

NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "autocaption": "https://github.com/autocaption/autocaption/ns/1.0/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/",
}
_PREFERRED = {uri: prefix for prefix, uri in NS.items()}
XML_NS = "http://www.w3.org/XML/1998/namespace"
XML_LANG = "{" + XML_NS + "}lang"
PACKET_ID = "W5M0MpCehiHzreSzNTczkc9d"
_RDF = "{" + NS["rdf"] + "}"
_DC = "{" + NS["dc"] + "}"
_OWN = "{" + NS["autocaption"] + "}"
_LR = "{" + NS["lr"] + "}"
_PS = "{" + NS["photoshop"] + "}"
_CORE = "{" + NS["Iptc4xmpCore"] + "}"
# The language-alternative texts a rule can write (`write:` targets), and where autocaption records its own
# text of each, language by language (dc:description's x-default has autocaption:Description, from before).
ALTERNATIVES = {
    "description": _DC + "description",
    "title": _DC + "title",
    "alt_text": _CORE + "AltTextAccessibility",
    "extended_description": _CORE + "ExtDescrAccessibility",
}
_OWN_ALTERNATIVES = {"description": _OWN + "DescriptionLanguages", "title": _OWN + "Title",
                     "alt_text": _OWN + "AltText", "extended_description": _OWN + "ExtendedDescription"}  # fmt: skip
_EXT = "{" + "http://iptc.org/std/Iptc4xmpExt/2008-02-29/" + "}"
# IPTC Extension's location structures, whose fields name a place when the legacy ones do not, in Place's terms.
_LOCATIONS = (_EXT + "LocationCreated", _EXT + "LocationShown")
_LOCATION_FIELDS = {"city": _EXT + "City", "region": _EXT + "ProvinceState", "country": _EXT + "CountryName",
                    "sublocation": _EXT + "Sublocation"}  # fmt: skip
# Where a photo's place is written (IPTC Core's location fields as XMP has them), in Place's terms.
PLACE_TAGS = {"city": _PS + "City", "region": _PS + "State", "country": _PS + "Country",
              "sublocation": _CORE + "Location"}  # fmt: skip
_LOCATED = (*PLACE_TAGS.values(), *_LOCATIONS, _CORE + "CountryCode")  # a photo with any of them has a location
_OWN_PLACE = _OWN + "Location"  # "city|region|country|sublocation", as autocaption wrote them
_EMPTY = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    b'  <rdf:Description rdf:about=""/>\n </rdf:RDF>\n</x:xmpmeta>'
)
_SPACE = b" \t\r\n"
_START_TAG = re.compile(rb"""<[^\s/>]+(?:\s+[^\s=/>]+\s*=\s*(?:"[^"]*"|'[^']*'))*\s*/?>""")
_ATTRIBUTE = re.compile(rb"""\s+([^\s=/>]+)\s*=\s*(?:"[^"]*"|'[^']*')""")
_ENCODING = re.compile(rb"""\A<\?xml[^>]*?encoding\s*=\s*["']([^"']+)""")
_TRAILER = re.compile(rb"[ \t\r\n]*<\?xpacket\s+end\b")
_Edit = tuple[int, int, bytes]  # a splice of the parsed bytes: start, end, what goes there


class XmpError(ValueError):
    """The existing XMP cannot be parsed; it is then left alone."""


@dataclass(frozen=True)
class XmpFacts:
    description: str | None  # dc:description x-default
    keywords: tuple[str, ...]  # dc:subject
    own_description: str | None  # what autocaption wrote last time
    own_keywords: tuple[str, ...]
    place: Place = field(default_factory=Place)  # photoshop:City, State, Country; Iptc4xmpCore:Location
    located: bool = False  # the packet has any location field (a country code, a LocationCreated...)
    own_place: Place | None = None  # the location autocaption wrote (output.location)
    texts: dict[str, str] = field(default_factory=dict)  # the x-default title, alt text... (ALTERNATIVES)


@dataclass(frozen=True)
class _Span:
    """Where an element lies in the packet's bytes, and the names in force inside its start tag."""

    start: int  # its "<"
    tag_end: int  # just after its start tag
    end: int  # just after its end tag (tag_end for an empty-element tag)
    qname: str  # as written: "rdf:Description"
    names: dict[str, str]  # prefix -> namespace URI ("" for a default namespace)
    attributes: frozenset[str]  # the start tag's attributes, {uri}local

    @property
    def empty(self) -> bool:
        return self.tag_end == self.end


@dataclass
class Packet:
    """An XMP packet: a tree to read and change, and the bytes it came from."""

    raw: bytes
    root: ET.Element  # x:xmpmeta (made up around a bare rdf:RDF)
    spans: dict[ET.Element, _Span]  # every element that came from `raw`
    children: dict[ET.Element, list[ET.Element]]  # the children each rdf:Description had when parsed
    prefixes: dict[str, str]  # namespace URI -> a prefix the document (or a merged one) gave it
    fresh: bool = False  # made here: gets the xpacket wrapper on writing
    changed: set[str] = field(default_factory=set)  # properties (and root attributes) set since parsing


def parse(packet: bytes | None) -> Packet:
    """A packet's tree and layout (a new, empty packet for None or blank bytes)."""
    if not packet or not packet.strip(_SPACE + b"\x00"):
        return _parse(_EMPTY, fresh=True)
    return _parse(packet, fresh=False)


def _parse(raw: bytes, *, fresh: bool) -> Packet:
    lead, trail = _body(raw)
    body = raw[lead:trail]
    encoding = _ENCODING.match(body)
    if body.startswith((b"\xff\xfe", b"\xfe\xff")) or (encoding and encoding[1].lower() not in (b"utf-8", b"utf8")):
        raise XmpError("XMP in an encoding other than UTF-8")
    try:
        tree = SafeET.fromstring(body)
    except (ET.ParseError, ValueError) as exc:  # defusedxml raises ValueError subclasses for attacks
        raise XmpError(f"unreadable XMP ({exc})") from None
    spans = _layout(body)
    elements = list(tree.iter())
    if len(elements) != len(spans):
        raise XmpError("XMP elements could not be located in the packet")
    root = tree
    if root.tag == _RDF + "RDF":  # a bare rdf:RDF without the x:xmpmeta wrapper
        root = ET.Element("{adobe:ns:meta/}xmpmeta")
        root.append(tree)
    rdf = root.find(_RDF + "RDF")
    if rdf is None:
        raise XmpError("XMP without an rdf:RDF element")
    return Packet(
        raw=raw,
        root=root,
        spans=dict(zip(elements, spans, strict=True)),
        children={description: list(description) for description in rdf.findall(_RDF + "Description")},
        prefixes={uri: prefix for span in spans for prefix, uri in span.names.items() if prefix},
        fresh=fresh,
    )


def _body(raw: bytes) -> tuple[int, int]:
    """Where the XML of a packet starts and ends (white space and NUL padding outside it are kept as bytes)."""
    lead = len(raw) - len(raw.lstrip(_SPACE))
    trail = len(raw.rstrip(_SPACE + b"\x00"))
    return lead, max(lead, trail)


def _layout(body: bytes) -> list[_Span]:
    """Every element's span, in document order (the order of ElementTree's iter())."""
    parser = expat.ParserCreate()
    spans: list[_Span | None] = []
    open_: list[tuple[int, int, int, str, dict[str, str], frozenset[str]]] = []

    def start(qname: str, attributes: dict[str, str]) -> None:
        at = parser.CurrentByteIndex
        names = dict(open_[-1][4]) if open_ else {}
        for key, value in attributes.items():
            if key == "xmlns" or key.startswith("xmlns:"):
                names[key[6:]] = value
        tag = _START_TAG.match(body, at)
        if tag is None:
            raise XmpError(f"XMP start tag at byte {at} could not be located")
        clark = frozenset(_clark(key, names, attribute=True) for key in attributes if not _is_declaration(key))
        open_.append((len(spans), at, tag.end(), qname, names, clark))
        spans.append(None)

    def end(qname: str) -> None:
        index, at, tag_end, name, names, attributes = open_.pop()
        here = parser.CurrentByteIndex
        if here == tag_end and body[tag_end - 2 : tag_end] == b"/>":
            finish = tag_end  # <x/>: expat reports its end just after the tag
        else:
            finish = body.index(b">", here) + 1
        spans[index] = _Span(at, tag_end, finish, name, names, attributes)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise XmpError(f"unreadable XMP ({exc})") from None
    return [span for span in spans if span is not None]


def _is_declaration(name: str) -> bool:
    return name == "xmlns" or name.startswith("xmlns:")


def _clark(qname: str, names: dict[str, str], *, attribute: bool = False) -> str:
    prefix, _, local = qname.rpartition(":")
    if prefix == "xml":
        return "{" + XML_NS + "}" + local
    uri = names.get(prefix) if prefix or not attribute else None
    return "{" + uri + "}" + local if uri else local


def parse_all(packet: bytes | None, more: Sequence[bytes] = ()) -> Packet:
    """One packet from a file's XMP packets: the first, with the properties only the others have added."""
    first = parse(packet)
    for other in more:
        merge(first, parse(other))
    return first


def merge(packet: Packet, other: Packet) -> None:
    """Add the properties of `other` that `packet` does not have (in any form); on a conflict the first wins."""
    root = packet.root
    about = _RDF + "about"
    present = {
        name for description in _descriptions(root) for name in (*description.attrib, *(c.tag for c in description))
    }
    for name, value in other.root.attrib.items():  # x:xmpmeta's own attributes (x:xmptk, the toolkit)
        if name not in root.attrib:
            root.set(name, value)
            packet.changed.add(name)
    for uri, prefix in other.prefixes.items():
        packet.prefixes.setdefault(uri, prefix)
    target = _descriptions(root)[0]
    rdf = other.root.find(_RDF + "RDF")
    for description in rdf.findall(_RDF + "Description") if rdf is not None else []:
        for name, value in description.attrib.items():
            if name != about and name not in present:
                target.set(name, value)
                present.add(name)
                packet.changed.add(name)
        for child in list(description):
            if child.tag not in present:
                target.append(child)
                present.add(child.tag)
                packet.changed.add(child.tag)


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


def _simple(root: ET.Element, tag: str) -> str | None:
    """A simple property, written as an element or as an attribute of its rdf:Description."""
    for description in _descriptions(root):
        element = description.find(tag)
        if element is not None:
            return element.text or ""
        if tag in description.attrib:
            return description.attrib[tag]
    return None


def _values(root: ET.Element, tag: str) -> list[tuple[str | None, str]] | None:
    """A property's values with their xml:lang, in whichever RDF form a tool wrote it: an rdf:Alt/Bag/Seq
    of rdf:li, a plain element, an attribute of its rdf:Description, or a resource holding rdf:value
    (exiftool reads all of them; a form read as "absent" would be overwritten under `existing: keep`).
    None when the property is not there."""
    for description in _descriptions(root):
        element = description.find(tag)
        if element is not None:
            container = next(iter(element), None)
            if container is None:  # a plain element (a lang-alt written as a simple text); empty: no value
                text = element.text or ""
                return [(element.get(XML_LANG), text)] if text.strip() else []
            if container.tag in (_RDF + "Alt", _RDF + "Bag", _RDF + "Seq"):
                return [(li.get(XML_LANG), _value_of(li)) for li in container.findall(_RDF + "li")]
            return [(element.get(XML_LANG), _value_of(element))]
        if tag in description.attrib:
            return [(None, description.attrib[tag])]
    return None


def _value_of(element: ET.Element) -> str:
    """The text of an rdf:li or property element; of its rdf:value where it is a resource (qualifiers)."""
    value = element.find(_RDF + "value")
    if value is None:
        value = next((d.find(_RDF + "value") for d in element.findall(_RDF + "Description")), None)
    if value is not None:
        return value.text or ""
    attribute = element.get(_RDF + "value")
    return attribute if attribute is not None else element.text or ""


def facts(packet: Packet) -> XmpFacts:
    root = packet.root
    descriptions = _values(root, _DC + "description")
    default = next((text for lang, text in descriptions or () if lang == "x-default"), None)
    if default is None and descriptions:
        default = descriptions[0][1]
    return XmpFacts(
        description=default,
        keywords=tuple(text for _, text in _values(root, _DC + "subject") or ()),
        own_description=_simple(root, _OWN + "Description"),
        own_keywords=tuple(text for _, text in _values(root, _OWN + "Keywords") or ()),
        own_place=_own_place(root),
        place=_place(root),
        located=any(_values(root, tag) is not None for tag in _LOCATED),
        texts=_defaults(root),
    )


def _place(root: ET.Element) -> Place:
    """The place the location fields name: IPTC Core's (photoshop:City...), else where the photo was taken as
    IPTC Extension's LocationCreated says, else what it shows (LocationShown)."""
    legacy = {name: (_simple(root, tag) or "").strip() or None for name, tag in PLACE_TAGS.items()}
    if any(legacy.values()):
        return Place(**legacy)
    for tag in _LOCATIONS:
        element = _find(root, tag)
        if element is None:
            continue
        found = {name: next((e.text.strip() for e in element.iter(field) if e.text and e.text.strip()), None)
                 for name, field in _LOCATION_FIELDS.items()}  # fmt: skip
        if any(found.values()):
            return Place(**found)
    return Place()


def _defaults(root: ET.Element) -> dict[str, str]:
    """The x-default text of each alternative target but the description (which XmpFacts has on its own)."""
    found = {target: _in_language(_values(root, tag), "x-default") for target, tag in ALTERNATIVES.items()}
    return {target: text for target, text in found.items() if text and target != "description"}


def _remove(packet: Packet, tag: str) -> tuple[ET.Element, int] | None:
    """Take a property out of every rdf:Description (element and attribute forms); where it first was."""
    packet.changed.add(tag)
    where = None
    for description in _descriptions(packet.root):
        for existing in description.findall(tag):
            if where is None:
                where = (description, list(description).index(existing))
            description.remove(existing)
        description.attrib.pop(tag, None)
    return where


def _replace(
    packet: Packet, tag: str, container: str, values: Sequence[str], lang: bool, extra: Sequence[ET.Element] = ()
) -> None:
    """Set a property to an rdf:Alt/Bag of `values`, in the Description that already holds it."""
    where = _remove(packet, tag)
    description, index = where if where else _home(packet, tag)
    element = ET.Element(tag)
    box = ET.SubElement(element, _RDF + container)
    for value in values:
        li = ET.SubElement(box, _RDF + "li", {XML_LANG: "x-default"} if lang else {})
        li.text = value
    box.extend(extra)
    description.insert(index, element)


def _home(packet: Packet, tag: str) -> tuple[ET.Element, int]:
    """Where a new property goes: at the end of the rdf:Description that declares its namespace (beside its
    kin), else of the first one with properties, else of the first."""
    uri = tag[1:].partition("}")[0]
    descriptions = _descriptions(packet.root)
    declaring = (d for d in descriptions if d in packet.spans and uri in packet.spans[d].names.values())
    home = next(declaring, None) or next((d for d in descriptions if len(d)), descriptions[0])
    return home, len(home)


def _set_text(packet: Packet, tag: str, value: str | None) -> None:
    """Set a simple property (None removes it)."""
    where = _remove(packet, tag)
    if value is None:
        return
    description, index = where if where else _home(packet, tag)
    element = ET.Element(tag)
    element.text = value
    description.insert(index, element)


def set_description(packet: Packet, text: str, own: str | None) -> None:
    """dc:description x-default = text (other languages kept); remember `own` as ours (None: the text is a
    person's, and nothing in it is autocaption's any more)."""
    tag = _DC + "description"
    others = [li for li in _items(_find(packet.root, tag)) if li.get(XML_LANG) not in (None, "x-default")]
    _replace(packet, tag, "Alt", [text], lang=True, extra=others)
    _set_text(packet, _OWN + "Description", own)


def set_keywords(packet: Packet, keywords: Sequence[str], own: Sequence[str], *, person: bool = False,
                 paths: Sequence[str] = ()) -> None:  # fmt: skip
    """dc:subject = keywords; remember `own` as ours. Where the file has Lightroom's hierarchical keywords,
    ours are added there too as top-level entries (Immich and Lightroom ignore dc:subject when
    lr:hierarchicalSubject is present), replacing exactly the ones we added last time; a person's stay, in
    any letter case. `person`: the keywords are a person's whole list (the review page): the hierarchy's
    top-level entries become that list, its `a|b` paths stay. `paths`: our keywords' places in a hierarchy
    (`Animals|Dog`, from a rule's vocabulary): written there instead of the bare keyword, the hierarchy made
    when the file has none (holding every keyword of dc:subject too, or those readers would lose them)."""
    root = packet.root
    entries = _values(root, _LR + "hierarchicalSubject")
    placed = {path.rsplit("|", 1)[-1].strip().casefold() for path in paths}
    ours = list(paths)  # the paths recorded as autocaption's: not those the photo had from someone else
    if entries is not None or paths:
        texts = [text for _, text in entries or () if text.strip()]
        if person:
            kept = [entry for entry in texts if "|" in entry]
            added: Sequence[str] = keywords
        else:
            previous = {text for _, text in _values(root, _OWN + "Keywords") or ()}
            kept = [entry for entry in texts if entry not in previous]
            if entries is None:  # a new hierarchy: every keyword the photo shows, theirs too
                kept = [word for word in keywords if word not in own]
            theirs = {entry.casefold() for entry in kept}
            ours = [path for path in paths if path.casefold() not in theirs]
            added = [*ours, *(word for word in own if word.casefold() not in placed)]
        present = {entry.casefold() for entry in kept}
        _replace(packet, _LR + "hierarchicalSubject", "Bag",
                 kept + [word for word in added if word.casefold() not in present], lang=False)  # fmt: skip
    if keywords:
        _replace(packet, _DC + "subject", "Bag", keywords, lang=False)
    else:  # none left: no empty Bag (readers show it as an empty keyword)
        _remove(packet, _DC + "subject")
    if own:  # (our paths too: the next run replaces exactly those)
        _replace(packet, _OWN + "Keywords", "Bag", [*own, *ours], lang=False)
    else:  # a person's keywords: none of them are autocaption's any more
        _remove(packet, _OWN + "Keywords")


def alternative(packet: Packet, target: str, lang: str) -> tuple[str | None, str | None]:
    """(the text, autocaption's own text) of one language of a target (`ALTERNATIVES`); x-default falls back
    to the only value of a property written without languages, as readers show it."""
    return _in_language(_values(packet.root, ALTERNATIVES[target]), lang), _in_language(
        _values(packet.root, _OWN_ALTERNATIVES[target]), lang)  # fmt: skip


def _in_language(values: Sequence[tuple[str | None, str]] | None, lang: str) -> str | None:
    for code, text in values or ():
        if (code or "x-default").casefold() == lang.casefold():
            return text
    if lang == "x-default" and values and all(code is None for code, _ in values):
        return values[0][1]
    return None


def owned(packet: Packet, target: str) -> list[tuple[str, str, str | None]]:
    """(language, autocaption's text, the text there now) of every language autocaption wrote a target in."""
    return [(code or "x-default", own, _in_language(_values(packet.root, ALTERNATIVES[target]), code or "x-default"))
            for code, own in _values(packet.root, _OWN_ALTERNATIVES[target]) or ()]  # fmt: skip


def theirs(packet: Packet, target: str) -> list[str]:
    """A target's texts, in any language, that are not autocaption's (a person's title in German only)."""
    own = {(code or "x-default").casefold(): text
           for code, text in _values(packet.root, _OWN_ALTERNATIVES[target]) or ()}  # fmt: skip
    return [text for code, text in _values(packet.root, ALTERNATIVES[target]) or ()
            if text.strip() and own.get((code or "x-default").casefold()) != text]  # fmt: skip


def set_alternative(packet: Packet, target: str, lang: str, text: str | None, own: str | None) -> None:
    """One language of a target's rdf:Alt = text (the others kept, x-default first; None: that language
    removed); remember `own` as autocaption's text in that language (None: no text there is autocaption's)."""
    _set_language(packet, ALTERNATIVES[target], lang, text)
    _set_language(packet, _OWN_ALTERNATIVES[target], lang, own)


def disown(packet: Packet, target: str, lang: str) -> None:
    """The text of a target in a language is no longer autocaption's (a person changed it)."""
    _set_language(packet, _OWN_ALTERNATIVES[target], lang, None)


def _set_language(packet: Packet, tag: str, lang: str, value: str | None) -> None:
    items = _alternatives(packet.root, tag)
    kept = [li for li in items if (li.get(XML_LANG) or "x-default").casefold() != lang.casefold()]
    if value is not None:
        kept.append(_li(lang, value))
    elif len(kept) == len(items):
        return  # nothing to remove: the property stays as it is written
    kept.sort(key=lambda li: (li.get(XML_LANG) or "x-default") != "x-default")  # readers take the first
    if kept:
        _replace(packet, tag, "Alt", [], lang=True, extra=kept)
    else:
        _remove(packet, tag)


def _alternatives(root: ET.Element, tag: str) -> list[ET.Element]:
    """A property's values as the rdf:li of an rdf:Alt, in whichever form a tool wrote it: an Alt's own items
    (their qualifiers kept); a plain element, an attribute or a resource as the x-default; a Bag or Seq
    (no language alternative, though some tools write one) as one x-default of its untagged items joined
    with ", " (as exiftool shows them), beside its tagged ones. Nothing a reader showed is dropped."""
    element = _find(root, tag)
    container = next(iter(element), None) if element is not None else None
    if container is not None and container.tag == _RDF + "Alt":
        return container.findall(_RDF + "li")
    values = _values(root, tag) or []
    untagged = [text for code, text in values if not code]
    tagged = [_li(code, text) for code, text in values if code]
    return ([_li("x-default", ", ".join(untagged))] if untagged else []) + tagged


def _li(lang: str, text: str) -> ET.Element:
    li = ET.Element(_RDF + "li", {XML_LANG: lang})
    li.text = text
    return li


def set_place(packet: Packet, place: Place) -> None:
    """The location fields (photoshop:City, State, Country; Iptc4xmpCore:Location) = the place's parts (an
    unknown part: none), recorded as autocaption's so a later run can tell them from a person's."""
    for name, tag in PLACE_TAGS.items():
        _set_text(packet, tag, getattr(place, name))
    _set_text(packet, _OWN_PLACE, _place_record(place))


def _place_record(place: Place) -> str:
    return "|".join(getattr(place, name) or "" for name in PLACE_TAGS)


def _own_place(root: ET.Element) -> Place | None:
    record = _simple(root, _OWN_PLACE)
    parts = record.split("|") if record is not None else []
    return (
        Place(**{name: part or None for name, part in zip(PLACE_TAGS, parts, strict=True)}) if len(parts) == 4 else None
    )


# --- writing --------------------------------------------------------------------------------------------------


def serialize(packet: Packet, *, padding: int = 2048) -> bytes:
    """The packet with its changes. A packet that came from a file keeps every other byte; in its xpacket
    wrapper's padding it keeps its size when the padding allows. A new one gets the standard wrapper with
    `padding` bytes so other tools can edit it in place."""
    lead, trail = _body(packet.raw)
    body = packet.raw[lead:trail]
    edits = _edits(packet, body)
    new = _spliced(body, edits)
    if packet.fresh:
        return (f'<?xpacket begin="\ufeff" id="{PACKET_ID}"?>\n'.encode() + new + b"\n" + _padding(padding)
                + b'<?xpacket end="w"?>')  # fmt: skip
    new = _repadded(new, packet.spans[_document(packet)].end + len(new) - len(body), len(new) - len(body), padding)
    return packet.raw[:lead] + new + packet.raw[trail:]


def _document(packet: Packet) -> ET.Element:
    """The document element as parsed (x:xmpmeta, or the bare rdf:RDF)."""
    return packet.root if packet.root in packet.spans else packet.root[0]


def _padding(size: int) -> bytes:
    return (b" " * 99 + b"\n") * (size // 100)


def _repadded(body: bytes, document_end: int, grown: int, padding: int) -> bytes:
    """Take what the packet grew by out of the white space between its XML and `<?xpacket end`, or give back
    what it shrank by; a packet without such padding is left as it is."""
    trailer = _TRAILER.match(body, document_end)
    if trailer is None or grown == 0:
        return body
    pad_end = trailer.end() - len(b"<?xpacket end")
    pad = body[document_end:pad_end]
    if len(pad) < 2:
        return body
    if grown < 0:
        pad = pad[:1] + b" " * -grown + pad[1:]
    elif grown <= len(pad) - 2:
        pad = pad[:1] + pad[1 + grown :]
    else:
        pad = b"\n" + _padding(padding)
    return body[:document_end] + pad + body[pad_end:]


def _spliced(body: bytes, edits: Iterable[_Edit]) -> bytes:
    out, at = [], 0
    for start, end, text in sorted(edits, key=lambda edit: (edit[0], edit[1])):
        out += [body[at:start], text]
        at = max(at, end)
    out.append(body[at:])
    return b"".join(out)


class _Names:
    """Prefixes for rendering inside one element: those in scope, and new declarations where none is."""

    def __init__(self, in_scope: dict[str, str], known: dict[str, str]) -> None:
        self.in_scope = in_scope  # prefix -> URI
        self.known = known  # URI -> a prefix the document used for it
        self.declared: dict[str, str] = {}  # URI -> prefix, to be declared on the element

    def prefix(self, uri: str, *, attribute: bool) -> str:
        if uri == XML_NS:
            return "xml"
        scoped = [p for p, u in self.in_scope.items() if u == uri and (p or not attribute)]
        if scoped:
            return scoped[-1]
        if uri not in self.declared:
            base = self.known.get(uri) or _PREFERRED.get(uri) or "ns"
            prefix, n = base, 1
            taken = set(self.in_scope) | set(self.declared.values())
            while prefix in taken or prefix.lower().startswith("xml"):
                prefix, n = f"{base}{n}", n + 1
            self.declared[uri] = prefix
        return self.declared[uri]

    def qname(self, clark: str, *, attribute: bool = False) -> str:
        if not clark.startswith("{"):
            return clark
        uri, local = clark[1:].split("}", 1)
        prefix = self.prefix(uri, attribute=attribute)
        return f"{prefix}:{local}" if prefix else local

    def declarations(self) -> str:
        return "".join(f' xmlns:{prefix}="{_attribute_text(uri)}"' for uri, prefix in self.declared.items())


def _edits(packet: Packet, body: bytes) -> list[_Edit]:
    """(start, end, replacement) splices that turn the parsed bytes into the changed packet."""
    edits: list[_Edit] = []
    root = packet.root
    if packet.root in packet.spans:
        edits += _start_tag_edits(packet, body, root, _Names(packet.spans[root].names, packet.prefixes), b"")
    rdf = root.find(_RDF + "RDF")
    assert rdf is not None
    for description in rdf.findall(_RDF + "Description"):
        span = packet.spans.get(description)
        if span is None:  # added here (the packet had none): written whole, at the end of rdf:RDF
            edits += _appended(packet, body, rdf, [description])
        else:
            edits += _description_edits(packet, body, description, span)
    return edits


def _description_edits(packet: Packet, body: bytes, description: ET.Element, span: _Span) -> list[_Edit]:
    names = _Names(span.names, packet.prefixes)
    indent = _child_indent(body, span, packet, description)
    old = [child for child in packet.children.get(description, []) if child.tag in packet.changed]
    new = [child for child in description if child.tag in packet.changed]
    edits: list[_Edit] = []
    placed: set[str] = set()
    for child in old:
        child_span = packet.spans[child]
        if child.tag not in placed and any(n.tag == child.tag for n in new):
            placed.add(child.tag)
            text = _separated([n for n in new if n.tag == child.tag], names, indent, first=False)
            edits.append((child_span.start, child_span.end, text))
        else:
            edits.append((_line_start(body, child_span.start), child_span.end, b""))
    rest = [n for n in new if n.tag not in placed]
    content = _separated(rest, names, indent, first=True) if rest else b""
    if content and not span.empty:
        close = body.rindex(b"</", span.start, span.end)
        edits.append((_content_end(body, span.tag_end, close), _content_end(body, span.tag_end, close), content))
    edits += _start_tag_edits(packet, body, description, names, content)
    return edits


def _appended(packet: Packet, body: bytes, parent: ET.Element, elements: list[ET.Element]) -> list[_Edit]:
    """Whole new elements at the end of `parent`'s content."""
    span = packet.spans[parent]
    indent = _child_indent(body, span, packet, parent)
    parts = []
    for element in elements:
        names = _Names(span.names, packet.prefixes)
        parts.append(b"\n" + indent + _render(element, names, indent, declare=True))
    content = b"".join(parts)
    if span.empty:
        tag = body[span.start : span.tag_end]
        end_tag = b"\n" + _indent_of(body, span.start) + b"</" + span.qname.encode("utf-8") + b">"
        closed = tag[:-2].rstrip(_SPACE) + b">" + content + end_tag
        return [(span.start, span.tag_end, closed)]
    close = body.rindex(b"</", span.start, span.end)
    at = _content_end(body, span.tag_end, close)
    return [(at, at, content)]


def _start_tag_edits(packet: Packet, body: bytes, element: ET.Element, names: _Names, content: bytes) -> list[_Edit]:
    """The start tag again when one of its attributes changed, a namespace must be declared on it, or an
    empty-element tag gets content."""
    span = packet.spans[element]
    removed = span.attributes & packet.changed
    added = [(k, v) for k, v in element.attrib.items() if k in packet.changed]
    rendered_added = "".join(f' {names.qname(k, attribute=True)}="{_attribute_text(v)}"' for k, v in added)
    declarations = names.declarations()
    if not (removed or added or declarations or (content and span.empty)):
        return []
    tag = body[span.start : span.tag_end]

    def kept(match: re.Match[bytes]) -> bytes:
        name = match[1].decode("utf-8")
        gone = not _is_declaration(name) and _clark(name, span.names, attribute=True) in removed
        return b"" if gone else match[0]

    empty = tag.endswith(b"/>")
    inner = tag[: -2 if empty else -1]
    trailing = inner[len(inner.rstrip(_SPACE)) :]
    inner = _ATTRIBUTE.sub(kept, inner.rstrip(_SPACE)) + (declarations + rendered_added).encode("utf-8") + trailing
    if not empty:
        return [(span.start, span.tag_end, inner + b">")]
    if not content:
        return [(span.start, span.tag_end, inner + b"/>")]
    end_tag = b"\n" + _indent_of(body, span.start) + b"</" + span.qname.encode("utf-8") + b">"
    return [(span.start, span.tag_end, inner.rstrip(_SPACE) + b">" + content + end_tag)]


def _separated(elements: list[ET.Element], names: _Names, indent: bytes, *, first: bool) -> bytes:
    parts = [_render(element, names, indent) for element in elements]
    joined = (b"\n" + indent).join(parts)
    return b"\n" + indent + joined if first else joined


def _line_start(body: bytes, at: int) -> int:
    """`at`, or the start of the white space before it back to (and with) its line break: a removed
    property takes its indentation with it."""
    start = at
    while start > 0 and body[start - 1 : start] in (b" ", b"\t"):
        start -= 1
    if start > 0 and body[start - 1 : start] == b"\n":
        start -= 1
        if start > 0 and body[start - 1 : start] == b"\r":
            start -= 1
        return start
    return at


def _content_end(body: bytes, tag_end: int, close: int) -> int:
    """Just after the last content before an end tag (the white space that indents the end tag stays after)."""
    at = close
    while at > tag_end and body[at - 1 : at] in (b" ", b"\t", b"\n", b"\r"):
        at -= 1
    return at


def _indent_of(body: bytes, at: int) -> bytes:
    line = body.rfind(b"\n", 0, at) + 1
    before = body[line:at]
    return before if not before.strip(b" \t") else b""


def _child_indent(body: bytes, span: _Span, packet: Packet, element: ET.Element) -> bytes:
    """The indentation of the element's children as written, or its own plus one space."""
    first = next((packet.spans[c] for c in packet.children.get(element, list(element)) if c in packet.spans), None)
    if first is not None and first.start > span.tag_end:
        gap = body[span.tag_end : first.start]
        if not gap.strip(_SPACE) and b"\n" in gap:
            return gap.rsplit(b"\n", 1)[1]
    return _indent_of(body, span.start) + b" "


def _render(element: ET.Element, names: _Names, indent: bytes, *, declare: bool = False) -> bytes:
    """An element we set, with the prefixes in scope (new ones declared on it when `declare`)."""
    inner = indent + b" "
    attributes = "".join(
        f' {names.qname(k, attribute=True)}="{_attribute_text(v)}"' for k, v in element.attrib.items()
    ).encode("utf-8")
    text = element.text or ""
    if len(element):
        children = b"".join(b"\n" + inner + _render(child, names, inner) for child in element)
        content = (_text(text) if text.strip() else b"") + children + b"\n" + indent
    else:
        content = _text(text)
    qname = names.qname(element.tag).encode("utf-8")
    declarations = names.declarations().encode("utf-8") if declare else b""
    if not content:
        return b"<" + qname + declarations + attributes + b"/>"
    return b"<" + qname + declarations + attributes + b">" + content + b"</" + qname + b">"


# Text of another tool's that we write into a property (an IPTC caption with a control character) loses what
# XML cannot hold: it must not make the packet unreadable for every later write.


def _text(value: str) -> bytes:
    value = NOT_XML.sub("", value)
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").encode("utf-8")


def _attribute_text(value: str) -> str:
    value = NOT_XML.sub("", value)
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return value.replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
