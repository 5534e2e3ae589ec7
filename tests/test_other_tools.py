"""Photos that other tools wrote (issue 23): IPTC and XMP reconciled as the Metadata Working Group reads them,
other tools' XMP kept byte for byte, camera boilerplate recognised, AFCP trailers moved with the file.

Every file is built here from a corpus photo with exiftool (IPTC with and without a digest, vendor namespaces)
or by hand (an XMP packet with odd prefixes, an AFCP trailer); exiftool's `-use MWG` is the reference reader.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from autocaption.config import OutputConfig
from autocaption.writers.containers import XMP_HEADER, _jpeg_segments, jpeg_blocks
from autocaption.writers.metadata import Caption, MetadataWriter
from autocaption.writers.policy import BOILERPLATE, is_boilerplate
from tests import exiftool
from tests.test_metadata import writable_copy

OURS = ("fox", "snow")
CAPTION = "A red fox in the snow"
LONG = "a keyword far longer than the sixty-four bytes that an IPTC keyword may hold"
STALE_DIGEST = "00112233445566778899aabbccddeeff"


def run_exiftool(path: Path, *arguments: str) -> None:
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", *arguments, str(path)], check=True)


def mwg(path: Path) -> dict[str, Any]:
    """What a Metadata Working Group reader sees: exiftool -use MWG, keywords always as a list."""
    out = subprocess.run(
        [exiftool.require(), "-j", "-use", "MWG", "-charset", "utf8", "-Keywords", "-Description", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    entry: dict[str, Any] = __import__("json").loads(out)[0]
    keywords = entry.get("Keywords", [])
    return {"Keywords": keywords if isinstance(keywords, list) else [keywords], "Description": entry.get("Description")}


def write(path: Path, caption: Caption, **output: Any) -> Any:
    return MetadataWriter(OutputConfig(**output)).write(path, path.parent, caption)


# --- 1. IPTC and XMP as the MWG reads them ---------------------------------------------------------------


MWG_CASES = {
    # IPTC without a digest beside XMP: MWG takes XMP; IPTC's differing words are a stale copy
    "no digest: XMP believed": ("none", ["fresh"], "fresh caption"),
    # the digest matches IPTC: IPTC and XMP were synced; XMP believed
    "digest matching: XMP believed": ("matching", ["fresh"], "fresh caption"),
    # the digest no longer matches: IPTC was changed since by a tool that knows no XMP; IPTC believed, and a
    # keyword IPTC's 64-byte limit cut short is read whole from XMP
    "digest stale: IPTC believed": ("stale", [LONG, "old2"], "stale caption"),
    # IPTC alone: believed
    "IPTC only": ("iptc-only", [LONG[:64], "old2"], "stale caption"),
}


def mwg_photo(corpus: Path, tmp_path: Path, digest: str) -> Path:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / f"{digest}.jpg")  # no IPTC, no XMP
    iptc = ["-IPTC:Keywords=" + LONG[:64], "-IPTC:Keywords=old2", "-IPTC:Caption-Abstract=stale caption"]
    xmp = ["-XMP-dc:Subject=" + LONG, "-XMP-dc:Subject=fresh", "-XMP-dc:Description=fresh caption"]
    run_exiftool(path, *iptc, *(xmp if digest != "iptc-only" else []))
    if digest == "matching":
        run_exiftool(path, "-Photoshop:IPTCDigest=new")
    elif digest == "stale":
        run_exiftool(path, f"-Photoshop:IPTCDigest={STALE_DIGEST}")
    state = exiftool.values(path, "IPTCDigest", "CurrentIPTCDigest")
    assert ("IPTCDigest" in state) == (digest in ("matching", "stale"))
    assert (state.get("IPTCDigest") == state["CurrentIPTCDigest"]) == (digest == "matching")
    return path


@pytest.mark.parametrize("case", MWG_CASES)
def test_what_an_mwg_reader_reads_is_what_it_read_before_plus_ours(corpus: Path, tmp_path: Path, case: str) -> None:
    digest, believed_keywords, believed_caption = MWG_CASES[case]
    path = mwg_photo(corpus, tmp_path, digest)
    before, warning = mwg(path), exiftool.values(path, "Warning").get("Warning")
    expected_before = [LONG, "fresh"] if digest in ("none", "matching") else believed_keywords
    assert before == {"Keywords": expected_before, "Description": believed_caption}

    record = write(path, Caption(CAPTION, OURS))  # existing: keep
    after = mwg(path)
    assert after == {"Keywords": [*before["Keywords"], *OURS], "Description": believed_caption}
    assert record.description.startswith("kept")  # the believed caption is a person's
    tags = exiftool.tags(path)[path]
    assert tags["XMP-dc:Subject"] == [*before["Keywords"], *OURS]  # nothing stale promoted into XMP
    assert tags["IPTC:Keywords"] == [*(w[:64] for w in before["Keywords"]), *OURS]  # IPTC in step
    state = exiftool.values(path, "IPTCDigest", "CurrentIPTCDigest")
    if digest == "stale":  # still stale: the other IPTC fields it vouches for stay the newer ones
        assert state["IPTCDigest"] == STALE_DIGEST
    else:  # matched, or added as exiftool's MWG writer adds it: IPTC and XMP now agree
        assert state["IPTCDigest"] == state["CurrentIPTCDigest"]
    # ("IPTCDigest is not current. XMP may be out of sync" where it was stale, and nothing else)
    assert exiftool.values(path, "Warning").get("Warning") == warning


def test_overwrite_replaces_the_believed_caption_and_no_stale_one_counts_as_a_persons(
    corpus: Path, tmp_path: Path
) -> None:
    path = mwg_photo(corpus, tmp_path, "none")
    run_exiftool(path, "-XMP-dc:Description=")  # XMP has no caption: the IPTC caption is believed
    assert mwg(path)["Description"] == "stale caption"
    assert write(path, Caption(CAPTION, OURS), existing="overwrite").description.startswith("written: replaced")
    assert mwg(path)["Description"] == CAPTION
    tags = exiftool.tags(path)[path]
    assert tags["IPTC:Caption-Abstract"] == tags["XMP-dc:Description"] == tags["IFD0:ImageDescription"] == CAPTION

    # our own caption in XMP, a stale IPTC copy that no tool vouches for beside it: not a person's caption
    ours = mwg_photo(corpus, tmp_path / "ours", "none")
    write(ours, Caption(CAPTION, OURS), existing="overwrite")
    run_exiftool(ours, "-Photoshop:IPTCDigest=", "-IPTC:Caption-Abstract=stale again")
    assert mwg(ours)["Description"] == CAPTION
    assert write(ours, Caption("A fox again", OURS)).description == "written"
    assert mwg(ours)["Description"] == "A fox again"


# --- 2. other tools' XMP kept byte for byte ---------------------------------------------------------------

VENDOR_PACKET = (
    "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?>\n"
    "<x:xmpmeta xmlns:x='adobe:ns:meta/' x:xmptk='Photo Mechanic 6'>\n"
    "<!-- written by a tool that is not autocaption -->\n"
    "<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>\n"
    "\t<rdf:Description rdf:about=''\n"
    "\t\txmlns:photomechanic='http://ns.camerabits.com/photomechanic/1.0/'\n"
    "\t\txmlns:Iptc4xmpCore='http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/'\n"
    "\t\txmlns:unused='http://example.com/ns/never-used/'\n"
    "\t\tphotomechanic:ColorClass='3' photomechanic:Tagged='True' photomechanic:Prefs='0:3:0:000042'/>\n"
    "\t<rdf:Description rdf:about='' xmlns:acme='http://example.com/ns/acme/1.0/' "
    "xmlns:elements='http://purl.org/dc/elements/1.1/'>\n"
    "\t\t<acme:Rating>5</acme:Rating>\n"
    "\t\t<elements:creator><rdf:Seq><rdf:li>Ann Example</rdf:li></rdf:Seq></elements:creator>\n"
    "\t\t<elements:subject><rdf:Bag><rdf:li>harbour</rdf:li></rdf:Bag></elements:subject>\n"
    "\t</rdf:Description>\n"
    "</rdf:RDF>\n"
    "</x:xmpmeta>\n" + (" " * 99 + "\n") * 20 + "<?xpacket end='w'?>"
).encode("utf-8")
OUR_PROPERTIES = re.compile(
    rb"\s*<(elements|dc):(description|subject)>.*?</\1:\2>|\s*<autocaption:(\w+)>.*?</autocaption:\3>"
    rb'| xmlns:(?:autocaption|dc)="[^"]*"|\s+(?=<\?xpacket end)',
    re.DOTALL,
)


def with_xmp(path: Path, packet: bytes) -> None:
    data = path.read_bytes()
    segment = b"\xff\xe1" + struct.pack(">H", len(XMP_HEADER) + len(packet) + 2) + XMP_HEADER + packet
    path.write_bytes(data[:2] + segment + data[2:])


def test_other_tools_xmp_keeps_its_prefixes_declarations_and_every_byte(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "pm.jpg")  # a photo without XMP
    with_xmp(path, VENDOR_PACKET)
    before = exiftool.tags(path)[path]
    assert before["XMP-photomech:ColorClass"] == "3 (Superior)" and before["XMP-photomech:Tagged"] == "Yes"
    declarations = set(re.findall(rb"xmlns:[\w-]+='[^']*'", VENDOR_PACKET))

    write(path, Caption(CAPTION, OURS))
    write(path, Caption("A fox, written twice", ("fox", "ice")))
    packet = jpeg_blocks(path.read_bytes()).xmp
    assert packet is not None
    after = exiftool.tags(path)[path]
    assert after["XMP-dc:Description"] == "A fox, written twice"
    assert after["XMP-dc:Subject"] == ["harbour", "fox", "ice"]
    vendor = {k: v for k, v in before.items() if k.startswith(("XMP-photomech", "XMP-x:", "XMP-acme", "XMP-dc:Cr"))}
    assert vendor and {k: after[k] for k in vendor} == vendor  # names and print conversions as before
    assert declarations <= set(re.findall(rb"xmlns:[\w-]+='[^']*'", packet))  # every prefix, used or not
    assert b"ns0:" not in packet and b"ns2:" not in packet
    # byte for byte: take our properties (and the padding) out of both, and what is left is the same
    assert OUR_PROPERTIES.sub(b"", packet) == OUR_PROPERTIES.sub(b"", VENDOR_PACKET)
    assert len(packet) == len(VENDOR_PACKET)  # what we added came out of the padding
    assert exiftool.warnings(path) <= exiftool.warnings(corpus / "jpg/camera/Canon_40D.jpg")


def test_an_existing_sidecar_is_edited_in_place_and_a_new_one_is_complete(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "tiff/Rudless.tiff", tmp_path / "r.tiff")
    sidecar = tmp_path / "r.tiff.xmp"
    darktable = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">\n'
        b' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        b'  <rdf:Description rdf:about=""\n    xmlns:darktable="http://darktable.sf.net/"\n'
        b'   darktable:xmp_version="5">\n   <darktable:history>\n    <rdf:Seq>\n'
        b'     <rdf:li darktable:operation="exposure" darktable:enabled="1"/>\n    </rdf:Seq>\n'
        b"   </darktable:history>\n  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
    )
    sidecar.write_bytes(darktable)
    write(path, Caption(CAPTION, OURS))
    edited = sidecar.read_bytes()
    assert OUR_PROPERTIES.sub(b"", edited) == OUR_PROPERTIES.sub(b"", darktable)
    tags = exiftool.tags(sidecar)[sidecar]
    assert tags["XMP-dc:Description"] == CAPTION and tags["XMP-darktable:HistoryOperation"] == "exposure"

    fresh = writable_copy(corpus / "tiff/Rudless.tiff", tmp_path / "new" / "n.tiff")
    write(fresh, Caption(CAPTION, OURS))
    made = (tmp_path / "new" / "n.tiff.xmp").read_bytes()
    assert made.startswith(b"<?xpacket begin=") and made.endswith(b'<?xpacket end="w"?>')
    assert exiftool.tags(tmp_path / "new" / "n.tiff.xmp")[tmp_path / "new" / "n.tiff.xmp"]["XMP-dc:Subject"] == [*OURS]


# --- 3. camera boilerplate --------------------------------------------------------------------------------

MADE_UP_CAMERA = {"make": "ACME Optical Co.", "model": "Zoomer X7", "software": "Zoomer X7 Ver1.02"}
PERSONS_CAPTIONS = (
    "My new camera", "Image of my grandmother", "Camera club outing 2019", "Photo by Jane", "DSC party at the lake",
    "Version 2 of the garden", "GIMP workshop in Leeds", "Untitled (Blue), 1998", "Der Goalie bin ig", "V2 rocket",
    "Oslo 2019", "Room 1234", "2019.07.14", "Zoomer X7 Image of a cat", "DSCN0042 at the beach", "Exif viewer demo",
    # person-like texts a first version of the table took for camera text (a hostile review found them)
    "Pim", "Pim 3", "DPOF", "Tokyo2020", "Xmas2019", "Bob2000", "Room101", "20230815", "Made in Italy 2019",
    "Created by Anna 2021", "Edited by John 2", "Our new digital camera", "Holiday camera pictures", "Dad DSC",
    "Version 2", "Capture One",
)  # fmt: skip


@pytest.mark.parametrize("entry", BOILERPLATE, ids=[entry.kind for entry in BOILERPLATE])
def test_each_boilerplate_class_is_recognised_and_only_it(entry: Any) -> None:
    assert entry.examples
    for example in entry.examples:
        assert is_boilerplate(example.format(**MADE_UP_CAMERA), **MADE_UP_CAMERA), example
        assert is_boilerplate(f"  {example.format(**MADE_UP_CAMERA)}\x00\x00 ", **MADE_UP_CAMERA)  # padded
    for caption in PERSONS_CAPTIONS:
        assert not is_boilerplate(caption, **MADE_UP_CAMERA), caption
    # a class naming the camera's own tags applies only to the photo they are from
    other = {"make": "Other Co.", "model": "Thing 2", "software": None}
    if "{" in entry.pattern:
        assert not is_boilerplate("ACME Optical Co.", **other) and not is_boilerplate("Zoomer X7 Image", **other)
        assert not is_boilerplate("Zoomer X7 Ver1.02 rocks")


def test_the_corpus_cameras_descriptions_are_told_apart(corpus: Path) -> None:
    files = sorted((corpus / "jpg").rglob("*.jpg"))
    tags = exiftool.tags(*files)
    persons = {"no_exif.jpg", "BlueSquare.jpg", "long_description.jpg"}
    seen = 0
    for path in files:
        entry = tags[path]
        description = entry.get("IFD0:ImageDescription")
        if description is None:
            continue
        seen += 1
        camera = {"make": entry.get("IFD0:Make"), "model": entry.get("IFD0:Model"),
                  "software": entry.get("IFD0:Software")}  # fmt: skip
        assert is_boilerplate(str(description), **camera) == (path.name not in persons), (path.name, description)
        if camera["model"]:  # each camera's name with a word after it, as some firmware writes
            assert is_boilerplate(f"{camera['model']} Image", **camera), path.name
            assert not is_boilerplate(f"{camera['model']} at the harbour", **camera), path.name
    assert seen >= 15


@pytest.mark.parametrize("text", ["DCIM\\100MSDCF\\DSC01234.JPG", "DCF 2.0", "Zoomer X7 Image", "Firmware Ver.1.02"])
def test_a_photo_with_camera_text_gets_its_caption_under_keep(corpus: Path, tmp_path: Path, text: str) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "c.jpg")
    run_exiftool(path, f"-IFD0:ImageDescription={text}", "-IFD0:Make=ACME Optical Co.", "-IFD0:Model=Zoomer X7")
    assert write(path, Caption(CAPTION, OURS)).description == "written"
    assert exiftool.tags(path)[path]["IFD0:ImageDescription"] == CAPTION


# --- 4. trailers with absolute offsets ----------------------------------------------------------------------


def with_afcp(path: Path, *, order: str = ">", wrong_by: int = 0) -> None:
    """Append an AFCP trailer (IPTC and a text) whose offsets count from the start of the file."""
    data = path.read_bytes()
    signature = b"AXS!" if order == ">" else b"AXS*"
    start = len(data)
    iim = b"\x1c\x02\x19\x00\x05trail\x1c\x02\x78\x00\x0cAFCP caption"
    entries = [(b"IPTC", iim), (b"TEXT", b"Text kept in the trailer")]
    values_at = start + 12 + 12 * len(entries)
    directory, values = b"", b""
    for tag, value in entries:
        directory += tag + struct.pack(order + "II", len(value), values_at + len(values) + wrong_by)
        values += value
    header = signature + b"\x01\x00" + struct.pack(order + "H", len(entries)) + bytes(4)
    end = signature + struct.pack(order + "I", start + wrong_by) + bytes(4)
    path.write_bytes(data + header + directory + values + end)


def afcp_tags(path: Path) -> dict[str, Any]:
    return {k: v for k, v in exiftool.tags(path)[path].items() if k.startswith(("AFCP:", "IPTC2:"))}


@pytest.mark.parametrize("order", [">", "<"], ids=["big-endian", "little-endian"])
def test_an_afcp_trailer_moves_with_the_file(corpus: Path, tmp_path: Path, order: str) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "afcp.jpg")
    with_afcp(path, order=order)
    before, warnings = afcp_tags(path), exiftool.warnings(path)
    assert before == {"AFCP:Text": "Text kept in the trailer", "IPTC2:Keywords": "trail",
                      "IPTC2:Caption-Abstract": "AFCP caption"}  # fmt: skip
    assert write(path, Caption(CAPTION, OURS)).file == "embedded"
    assert write(path, Caption("A longer caption " * 20, OURS)).file == "embedded"
    assert afcp_tags(path) == before
    assert exiftool.warnings(path) == warnings  # no "[minor] Adjusted AFCP offsets"
    assert exiftool.tags(path)[path]["XMP-dc:Description"] == ("A longer caption " * 20).strip()  # (trimmed)


def test_a_trailer_that_cannot_be_moved_leaves_the_photo_unchanged(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "broken.jpg")
    with_afcp(path, wrong_by=40)  # offsets already wrong: moving them could only guess
    data = path.read_bytes()
    record = write(path, Caption(CAPTION, OURS))
    assert record.file == "unchanged" and "AFCP" in (record.reason or "")
    assert path.read_bytes() == data
    sidecar = tmp_path / "broken.jpg.xmp"
    assert exiftool.tags(sidecar)[sidecar]["XMP-dc:Description"] == CAPTION


def with_mpf(path: Path, preview: bytes) -> None:
    """An MPF index (APP2) pointing at a preview JPEG appended after the image, and after the index an XMP
    packet: as some phones and editors order them, so an XMP that grows moves the preview but not the index."""
    data = path.read_bytes()
    segments, scan = _jpeg_segments(data)

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    head = b"\xff\xd8" + b"".join(segment(m, p) for m, p in segments)
    packet = segment(0xE1, XMP_HEADER + VENDOR_PACKET)

    def index(primary: int, preview_at: int) -> bytes:
        entries = struct.pack(">IIIHH", 0x20030000, primary, 0, 0, 0)
        entries += struct.pack(">IIIHH", 0x00010001, len(preview), preview_at, 0, 0)
        ifd = struct.pack(">H", 3) + struct.pack(">HHI4s", 0xB000, 7, 4, b"0100")
        ifd += struct.pack(">HHII", 0xB001, 4, 1, 2) + struct.pack(">HHII", 0xB002, 7, 32, 8 + 2 + 36 + 4)
        return b"MPF\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd + bytes(4) + entries

    size = len(segment(0xE2, index(0, 0)))
    primary = len(head) + size + len(packet) + len(data) - scan
    header_at = len(head) + 4 + 4  # the TIFF header inside APP2, which MPF offsets count from
    mpf = segment(0xE2, index(primary, primary - header_at))
    path.write_bytes(head + mpf + packet + data[scan:] + preview)


def test_an_mpf_preview_stays_found_when_a_segment_after_its_index_grows(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "mpf.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    with_mpf(path, buffer.getvalue())
    assert preview_of(path) == buffer.getvalue()
    warnings = exiftool.warnings(path)
    write(path, Caption("A caption long enough to outgrow the padding. " * 60, OURS))
    assert exiftool.tags(path)[path]["XMP-dc:Description"].startswith("A caption long enough")
    assert preview_of(path) == buffer.getvalue()  # the index points at the preview where it now is
    assert exiftool.warnings(path) == warnings


def preview_of(path: Path) -> bytes:
    return subprocess.run([exiftool.require(), "-b", "-PreviewImage", str(path)], capture_output=True,
                          check=True).stdout  # fmt: skip


# --- 6. a person's keyword in another letter case ------------------------------------------------------------


def test_a_persons_keyword_that_we_also_propose_in_another_case_survives_the_next_run(
    corpus: Path, tmp_path: Path
) -> None:
    """The photo has "Dog" (a person's, in dc:subject, IPTC and Lightroom's hierarchy). We propose "dog":
    the word is theirs, so it is not recorded as ours, and a later run that no longer proposes it must not
    take theirs away (it did: our "dog" was recorded as ours and matched "Dog" case-insensitively)."""
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "dog.jpg")
    run_exiftool(path, "-XMP-dc:Subject=Dog", "-IPTC:Keywords=Dog", "-XMP-lr:HierarchicalSubject=Animals|Dog",
                 "-XMP-lr:HierarchicalSubject=Dog")  # fmt: skip
    write(path, Caption(CAPTION, ("dog", "snow")))
    first = exiftool.tags(path)[path]
    assert first["XMP-dc:Subject"] == ["Dog", "snow"] and first["IPTC:Keywords"] == ["Dog", "snow"]
    assert first["XMP-lr:HierarchicalSubject"] == ["Animals|Dog", "Dog", "snow"]
    write(path, Caption(CAPTION, ("snow", "winter")))  # "dog" is no longer proposed
    second = exiftool.tags(path)[path]
    assert second["XMP-dc:Subject"] == ["Dog", "snow", "winter"]
    assert second["IPTC:Keywords"] == ["Dog", "snow", "winter"]
    assert second["XMP-lr:HierarchicalSubject"] == ["Animals|Dog", "Dog", "snow", "winter"]
    write(path, Caption(CAPTION, (), asked=True))  # no rule writes keywords any more: ours go, theirs stay
    third = exiftool.tags(path)[path]
    assert third["XMP-dc:Subject"] == "Dog" and third["IPTC:Keywords"] == "Dog"  # (a single value)
    assert third["XMP-lr:HierarchicalSubject"] == ["Animals|Dog", "Dog"]


def test_our_caption_with_a_carriage_return_is_still_ours_on_the_next_run(corpus: Path, tmp_path: Path) -> None:
    """XML reads a raw CR back as LF while EXIF keeps it: a caption of ours with one read as a person's on the
    next run, and `keep` kept it for ever. Line breaks are written as LF everywhere."""
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "cr.jpg")
    write(path, Caption("A fox.\rIn the snow.", ()))
    tags = exiftool.tags(path)[path]
    assert tags["XMP-dc:Description"] == "A fox.\nIn the snow." == tags["IFD0:ImageDescription"]
    record = write(path, Caption(CAPTION, ()))  # existing: keep
    assert not record.description.startswith("kept"), record.description
    assert exiftool.tags(path)[path]["XMP-dc:Description"] == CAPTION


# --- 7. a description or keywords in a form other than the list the standard names -------------------------

RDF_FORMS = {  # dc:description is a Lang Alt and dc:subject a Bag; tools also write these, and exiftool reads them
    "plain elements": "<dc:description>Grandma in the garden</dc:description><dc:subject>garden</dc:subject>",
    "attributes": "",  # on the rdf:Description itself, below
    "rdf:value resources": "<dc:description rdf:parseType='Resource'><rdf:value>Grandma in the garden</rdf:value>"
    "</dc:description><dc:subject><rdf:Bag><rdf:li rdf:parseType='Resource'><rdf:value>garden</rdf:value>"
    "</rdf:li></rdf:Bag></dc:subject>",
}


@pytest.mark.parametrize("form", RDF_FORMS)
def test_a_persons_caption_in_another_rdf_form_is_kept(corpus: Path, tmp_path: Path, form: str) -> None:
    """Read as absent, the person's caption was overwritten under `existing: keep`, their keyword dropped."""
    attributes = " dc:description='Grandma in the garden' dc:subject='garden'" if form == "attributes" else ""
    packet = (
        "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?><x:xmpmeta xmlns:x='adobe:ns:meta/'>"
        "<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description rdf:about=''"
        f" xmlns:dc='http://purl.org/dc/elements/1.1/'{attributes}>{RDF_FORMS[form]}</rdf:Description>"
        "</rdf:RDF></x:xmpmeta><?xpacket end='w'?>"
    ).encode()
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "form.jpg")  # a photo without XMP
    with_xmp(path, packet)
    assert mwg(path) == {"Keywords": ["garden"], "Description": "Grandma in the garden"}
    record = write(path, Caption(CAPTION, OURS))  # existing: keep
    assert record.description.startswith("kept")
    assert mwg(path) == {"Keywords": ["garden", *OURS], "Description": "Grandma in the garden"}


# --- 8. Lightroom's hierarchy, letter case, other tools' odd text (a second hostile review) ----------------


def packet_with(body: str) -> bytes:
    return (
        "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?><x:xmpmeta xmlns:x='adobe:ns:meta/'>"
        "<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description rdf:about=''"
        " xmlns:dc='http://purl.org/dc/elements/1.1/' xmlns:lr='http://ns.adobe.com/lightroom/1.0/'>"
        f"{body}</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end='w'?>"
    ).encode()


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize(
    "hierarchy",
    ["<lr:hierarchicalSubject>Animals|Dog</lr:hierarchicalSubject>",
     "<lr:hierarchicalSubject><rdf:Bag><rdf:li rdf:parseType='Resource'><rdf:value>Animals|Dog</rdf:value>"
     "</rdf:li></rdf:Bag></lr:hierarchicalSubject>"],
    ids=["plain-element", "rdf-value"],
)  # fmt: skip
def test_lightrooms_hierarchy_in_another_rdf_form_keeps_the_persons_entries(
    corpus: Path, tmp_path: Path, hierarchy: str
) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "lr.jpg")
    with_xmp(path, packet_with(f"<dc:subject><rdf:Bag><rdf:li>Dog</rdf:li></rdf:Bag></dc:subject>{hierarchy}"))
    write(path, Caption(CAPTION, ("fox", "dog")))
    assert as_list(exiftool.tags(path)[path]["XMP-lr:HierarchicalSubject"]) == ["Animals|Dog", "fox"]


def test_keywords_matched_exactly_a_persons_recapitalised_or_hierarchy_only_word_stays(
    corpus: Path, tmp_path: Path
) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "case.jpg")
    run_exiftool(path, "-XMP-dc:Subject=snow", "-XMP-lr:HierarchicalSubject=Dog", "-XMP-lr:HierarchicalSubject=snow")
    write(path, Caption(CAPTION, ("dog", "fox")))  # "dog": theirs in the hierarchy as "Dog"
    run_exiftool(path, "-XMP-dc:Subject-=fox", "-XMP-dc:Subject+=Fox")  # a person re-capitalises ours
    write(path, Caption(CAPTION, ("cat",)))
    tags = exiftool.tags(path)[path]
    assert "Dog" in as_list(tags["XMP-lr:HierarchicalSubject"])
    assert "Fox" in as_list(tags["XMP-dc:Subject"]) and "cat" in as_list(tags["XMP-dc:Subject"])


def test_a_persons_correction_reaches_lightrooms_hierarchy(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "person.jpg")
    run_exiftool(path, "-XMP-dc:Subject=Dog", "-XMP-lr:HierarchicalSubject=Animals|Dog",
                 "-XMP-lr:HierarchicalSubject=Dog")  # fmt: skip
    write(path, Caption(CAPTION, ("fox", "snow")))
    write(path, Caption(None, ("fox", "snow", "Cat"), asked=True, person=True))  # Dog taken out, Cat added
    tags = exiftool.tags(path)[path]
    assert as_list(tags["XMP-dc:Subject"]) == ["fox", "snow", "Cat"]
    assert as_list(tags["XMP-lr:HierarchicalSubject"]) == ["Animals|Dog", "fox", "snow", "Cat"]


def test_an_empty_subject_element_is_no_keyword(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "empty.jpg")
    with_xmp(path, packet_with("<dc:subject>\n   </dc:subject>"))
    write(path, Caption(CAPTION, OURS))
    assert mwg(path)["Keywords"] == list(OURS)


@pytest.mark.parametrize("existing", ["keep", "append"])
def test_another_tools_text_with_control_characters_never_makes_our_xmp_unreadable(
    corpus: Path, tmp_path: Path, existing: str
) -> None:
    path = writable_copy(corpus / "jpg/camera/Canon_40D.jpg", tmp_path / "ctl.jpg")
    run_exiftool(path, "-IPTC:Caption-Abstract=Grandma\x0bin the garden", "-IPTC:Keywords=Fa\x01mily")
    for _ in range(2):  # and the next write reads what the first wrote
        record = write(path, Caption(CAPTION, OURS), existing=existing, xmp_sidecar="always")
        assert record.file == "embedded", record.reason
    sidecar = path.with_name(path.name + ".xmp")
    assert "XMP-dc:Subject" in exiftool.tags(sidecar)[sidecar] and "fox" in mwg(path)["Keywords"]
