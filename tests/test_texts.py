"""Title, alt text, extended description, captions in several languages and the location fields (issue 20),
read back by exiftool and exiv2 from copies of the corpus photos: JPEG (with EXIF, with IPTC), PNG, WebP, and
TIFF through its XMP sidecar; every other tag unchanged, pixels identical, no new exiftool warning."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from autocaption.config import OutputConfig, load
from autocaption.places import Place
from autocaption.process import process
from autocaption.writers.metadata import Caption, MetadataWriter, _facts_of
from tests import exiftool
from tests.test_metadata import pixels, writable_copy, xp_text

TEXTS = (
    ("description", "de", "Ein Turm auf einem Platz in der Abenddämmerung"),
    ("title", "x-default", "Tower at dusk"),
    ("title", "de", "Turm in der Dämmerung"),
    ("alt_text", "x-default", "A stone clock tower on a square, lit by the evening sun"),
    ("extended_description", "x-default", "A medieval square; people sit at café tables under umbrellas."),
)
CAPTION = Caption("A tower on a square at dusk", ("tower", "square"), asked=True, texts=TEXTS,
                  place=Place("Arezzo", "Tuscany", "Italy"))  # fmt: skip
# What the new fields are called by exiftool (-G1) and exiv2 (keys), and the values the caption gives them.
EXIFTOOL = {
    "XMP-dc:Title": "Tower at dusk", "XMP-dc:Title-de": "Turm in der Dämmerung",
    "XMP-dc:Description-de": "Ein Turm auf einem Platz in der Abenddämmerung",
    "XMP-iptcCore:AltTextAccessibility": "A stone clock tower on a square, lit by the evening sun",
    "XMP-iptcCore:ExtDescrAccessibility": "A medieval square; people sit at café tables under umbrellas.",
    "XMP-photoshop:City": "Arezzo", "XMP-photoshop:State": "Tuscany", "XMP-photoshop:Country": "Italy",
}  # fmt: skip
NEW = {
    *EXIFTOOL,
    "IFD0:XPTitle",
    "IPTC:ObjectName",
    "IPTC:City",
    "IPTC:Province-State",
    "IPTC:Country-PrimaryLocationName",
    "RIFF:WebP_Flags",
}  # (WebP_Flags: now "XMP, EXIF")


def exiv2(path: Path) -> dict[str, str]:
    """exiv2's reading of the XMP (key -> interpreted value)."""
    exe = shutil.which("exiv2")
    if exe is None:
        pytest.fail("exiv2 is required (Debian: exiv2); tests/run.sh installs it")
    out = subprocess.run([exe, "-PXkt", str(path)], capture_output=True, text=True, check=False).stdout
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        found[key] = value.strip()
    return found


def _png_and_webp(source: Path, folder: Path) -> list[Path]:
    with Image.open(source) as image:
        rgb = image.convert("RGB")
        exif = image.getexif()
        rgb.save(folder / "from_jpeg.png", exif=exif)
        rgb.save(folder / "from_jpeg.webp", lossless=True, exif=exif)
    return [folder / "from_jpeg.png", folder / "from_jpeg.webp"]


def test_every_new_field_is_read_by_exiftool_and_exiv2_and_nothing_else_changes(corpus: Path, tmp_path: Path) -> None:
    photos = [writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "DSCN0010.jpg"),
              writable_copy(corpus / "jpg/xmp/BlueSquare.jpg", tmp_path / "BlueSquare.jpg"),  # XMP and IPTC
              *_png_and_webp(corpus / "jpg/camera/Canon_40D.jpg", tmp_path)]  # fmt: skip
    tiff = writable_copy(corpus / "tiff/Arbitro.tiff", tmp_path / "Arbitro.tiff")
    heic = writable_copy(corpus / "heic/IMG_5195.HEIC", tmp_path / "IMG_5195.HEIC")
    before = {path: (exiftool.tags(path)[path], exiftool.warnings(path), pixels(path)) for path in photos}
    originals = {path: path.read_bytes() for path in (tiff, heic)}
    writer = MetadataWriter(OutputConfig())
    for path in [*photos, tiff, heic]:
        record = writer.write(path, tmp_path, CAPTION)
        # BlueSquare.jpg has a title of its own (XMP dc:title and IPTC ObjectName): kept, as a caption would be.
        title = (
            "kept: the file already has a person's title (output.existing: keep)" if path == photos[1] else "written"
        )
        assert dict(record.texts) == {"description (de)": "written", "title": title, "title (de)": "written",
                                      "alt_text": "written", "extended_description": "written",
                                      "location": "written: Arezzo, Tuscany, Italy"}, path  # fmt: skip
    assert {path: path.read_bytes() for path in originals} == originals  # (their texts are in their .xmp)
    sidecars = [path.with_name(path.name + ".xmp") for path in originals]
    for path in [*photos, *sidecars]:
        after = exiftool.tags(path)[path]
        title = "Blue Square Test File - .jpg" if path == photos[1] else "Tower at dusk"
        assert {key: after.get(key) for key in EXIFTOOL} == EXIFTOOL | {"XMP-dc:Title": title}, path
        assert path == photos[1] or after["XMP-dc:Description"] == "A tower on a square at dusk"  # (theirs: kept)
        assert path in before or exiftool.warnings(path) == set(), path
        read = exiv2(path)
        assert read["Xmp.dc.title"] == f'lang="x-default" {title}, lang="de" Turm in der Dämmerung', path
        assert read["Xmp.iptc.AltTextAccessibility"] == f'lang="x-default" {EXIFTOOL[NEW_ALT]}'
        assert read["Xmp.photoshop.City"] == "Arezzo" and read["Xmp.photoshop.Country"] == "Italy"
        if path in before:
            assert path == photos[1] or xp_text(after["IFD0:XPTitle"]) == "Tower at dusk"
            old, warned, picture = before[path]
            assert exiftool.warnings(path) <= warned, path
            assert pixels(path) == picture
            ignore = exiftool.OURS | NEW
            assert exiftool.comparable(after, ignore=ignore) == exiftool.comparable(old, ignore=ignore), path
    square = exiftool.tags(photos[1])[photos[1]]
    assert square["IPTC:ObjectName"] == "Blue Square Test File - .jpg"
    assert (square["IPTC:City"], square["IPTC:Province-State"], square["IPTC:Country-PrimaryLocationName"]) == (
        "Arezzo", "Tuscany", "Italy")  # fmt: skip


NEW_ALT = "XMP-iptcCore:AltTextAccessibility"


def test_a_persons_title_alt_text_and_location_are_kept_and_ours_replaced(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0012.jpg", tmp_path / "DSCN0012.jpg")
    windows = writable_copy(corpus / "jpg/gps/DSCN0021.jpg", tmp_path / "DSCN0021.jpg")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-dc:Title=Nonna's tower",
                    "-XMP-iptcCore:AltTextAccessibility=Written by hand", "-XMP-photoshop:Country=Italia",
                    str(path)], check=True)  # fmt: skip
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XPTitle=Holiday 2008", str(windows)],
                   check=True)  # fmt: skip
    writer = MetadataWriter(OutputConfig())
    for photo in (path, windows):
        writer.write(photo, tmp_path, CAPTION)
        writer.write(
            photo,
            tmp_path,
            Caption(
                None,
                (),
                asked=True,
                texts=(("title", "de", "Ein anderer Turm"), ("extended_description", "x-default", "Second answer.")),
            ),
        )
    tags = exiftool.tags(path)[path]
    assert tags["XMP-dc:Title"] == "Nonna's tower" and tags["XMP-dc:Title-de"] == "Ein anderer Turm"
    assert tags["XMP-iptcCore:AltTextAccessibility"] == "Written by hand"
    assert tags["XMP-iptcCore:ExtDescrAccessibility"] == "Second answer."  # ours, replaced by ours
    assert tags["XMP-photoshop:Country"] == "Italia" and "XMP-photoshop:City" not in tags  # theirs: not completed
    windows_tags = exiftool.tags(windows)[windows]
    assert xp_text(windows_tags["IFD0:XPTitle"]) == "Holiday 2008" and "XMP-dc:Title" not in windows_tags
    assert windows_tags["XMP-photoshop:City"] == "Arezzo"


RULES = """
- name: caption
  prompt: "Describe this photo."
  max_new_tokens: 6
  write: [description]
- name: caption-de
  prompt: "Beschreibe dieses Foto auf Deutsch."
  max_new_tokens: 6
  language: de
  write: [description]
- name: title
  prompt: "A title for this photo, five words at most."
  max_new_tokens: 4
  write: [title]
- name: alt
  prompt: "Alt text for this photo, taken in {place}."
  max_new_tokens: 6
  write: [alt_text]
"""


def test_rules_write_a_title_an_alt_text_and_a_second_language(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    folder = tmp_path / "photos"
    photo = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", folder / "DSCN0010.jpg")
    summary = process(load(make_config(RULES, extra="output: {location: true}")), [folder])
    assert summary.images == 1 and not summary.failures, summary.failures
    document = json.loads(photo.with_name(photo.name + ".json").read_text())
    answers = {name: entry["answer"] for name, entry in document["rules"].items()}
    assert document["rules"]["alt"]["prompt"] == "Alt text for this photo, taken in Arezzo, Tuscany, Italy."
    assert document["image"]["place"] == {"city": "Arezzo", "region": "Tuscany", "country": "Italy",
                                          "sublocation": None}  # fmt: skip
    tags = exiftool.tags(photo)[photo]
    assert tags["XMP-dc:Description"] == answers["caption"]
    assert tags["XMP-dc:Description-de"] == answers["caption-de"]
    assert tags["XMP-dc:Title"] == answers["title"] and xp_text(tags["IFD0:XPTitle"]) == answers["title"]
    assert tags["XMP-iptcCore:AltTextAccessibility"] == answers["alt"]
    assert tags["XMP-photoshop:City"] == "Arezzo"
    assert document["written"]["texts"]["location"] == "written: Arezzo, Tuscany, Italy"


# --- a hostile tester's cases (issue 20's review) -------------------------------------------------------------

PACKET = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" {attributes}>{body}'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


@pytest.mark.parametrize(
    ("attributes", "body", "caption", "existing", "read"),
    [  # a title another tool wrote in a form other than rdf:Alt: nothing of it is lost, one x-default stays
        ('dc:title="Person title"', "", ("title", "de", "Ours de"), "keep",
         'lang="x-default" Person title, lang="de" Ours de'),
        ("", "<dc:title>Person title</dc:title>", ("title", "x-default", "Ours"), "overwrite", 'lang="x-default" Ours'),
        ("", "<dc:title>Person title</dc:title>", ("title", "x-default", "Ours"), "append",
         'lang="x-default" Person title'),  # (exiv2 prints the rest, "Ours", on the lines after)
        ("", "<dc:title><rdf:Bag><rdf:li>One</rdf:li><rdf:li>Two</rdf:li></rdf:Bag></dc:title>",
         ("title", "de", "Ours de"), "keep", 'lang="x-default" One, Two, lang="de" Ours de'),
    ],
)  # fmt: skip
def test_a_title_in_another_rdf_form_is_kept_whole(
    corpus: Path, tmp_path: Path, attributes: str, body: str, caption: tuple[str, str, str], existing: str, read: str
) -> None:
    tiff = writable_copy(corpus / "tiff/Arbitro.tiff", tmp_path / "Arbitro.tiff")
    sidecar = tiff.with_name(tiff.name + ".xmp")
    sidecar.write_text(PACKET.format(attributes=attributes, body=body), encoding="utf-8")
    MetadataWriter(OutputConfig(existing=existing)).write(
        tiff, tmp_path, Caption(None, (), asked=True, texts=(caption,))
    )
    assert exiv2(sidecar)["Xmp.dc.title"] == read
    assert exiftool.warnings(sidecar) == set()
    if existing == "append":
        assert exiftool.tags(sidecar)[sidecar]["XMP-dc:Title"] == "Person title\n\nOurs"


def test_a_sidecar_write_heeds_a_persons_texts_and_location_in_the_photo(corpus: Path, tmp_path: Path) -> None:
    jpeg = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "DSCN0010.jpg")
    tiff = writable_copy(corpus / "tiff/Arbitro.tiff", tmp_path / "Arbitro.tiff")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-dc:Title=Person title",
                    "-XMP-iptcCore:AltTextAccessibility=Person alt", str(jpeg)], check=True)  # fmt: skip
    legacy = ["-IPTC:ObjectName=Mein Titel", "-IPTC:City=Bern", "-IPTC:Country-PrimaryLocationName=Switzerland"]
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", *legacy, str(tiff)], check=True)
    jpeg.chmod(0o444)  # read-only: the texts go to its XMP sidecar
    texts = (("title", "x-default", "Our title"), ("alt_text", "x-default", "Our alt"))
    ours = Caption(None, (), asked=True, texts=texts, place=Place("Arezzo", "Tuscany", "Italy"))
    for photo in (jpeg, tiff):
        record = MetadataWriter(OutputConfig()).write(photo, tmp_path, ours)
        assert dict(record.texts)["title"].startswith("kept: the file already has a person's title"), photo
        side = exiftool.tags(photo.with_name(photo.name + ".xmp"))[photo.with_name(photo.name + ".xmp")]
        assert "XMP-dc:Title" not in side, photo
    assert dict(record.texts)["location"] == "kept: the photo already has a location"  # (the TIFF's IPTC City)


def test_a_long_title_is_ours_to_replace_though_iptc_cuts_it(corpus: Path, tmp_path: Path) -> None:
    square = writable_copy(corpus / "jpg/xmp/BlueSquare.jpg", tmp_path / "BlueSquare.jpg")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-dc:Title=", "-IPTC:ObjectName=",
                    str(square)], check=True)  # fmt: skip
    writer = MetadataWriter(OutputConfig())
    for n in range(3):
        title = f"A very long title about a clock tower on a square in Arezzo, early at dawn, version {n}"
        record = writer.write(square, tmp_path, Caption(None, (), asked=True, texts=(("title", "x-default", title),)))
        assert dict(record.texts)["title"] == "written", n
    tags = exiftool.tags(square)[square]
    assert tags["XMP-dc:Title"] == title and title.startswith(str(tags["IPTC:ObjectName"]))
    assert len(str(tags["IPTC:ObjectName"]).encode()) == 64


def test_a_location_in_iptc_extension_counts_as_one(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0012.jpg", tmp_path / "DSCN0012.jpg")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-iptcExt:LocationCreatedCity=Bern",
                    "-XMP-iptcExt:LocationCreatedCountryName=Switzerland", str(path)], check=True)  # fmt: skip
    record = MetadataWriter(OutputConfig()).write(
        path, tmp_path, Caption(None, (), place=Place("Arezzo", None, "Italy"))
    )
    assert dict(record.texts)["location"] == "kept: the photo already has a location"
    assert "XMP-photoshop:City" not in exiftool.tags(path)[path]
    from autocaption.writers.metadata import MetadataWriter as Writer

    assert Writer(OutputConfig()).persons(path).place == Place("Bern", None, "Switzerland")  # for `{place}`


def test_repeated_writes_beside_a_kept_camera_description_do_not_grow_the_file(corpus: Path, tmp_path: Path) -> None:
    # DSCN0010's camera ImageDescription stays (no rule writes a description): each write once appended
    # another IFD0, as the kept value before ours stopped the old one from being recognised as ours.
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "DSCN0010.jpg")
    writer = MetadataWriter(OutputConfig())
    sizes = set()
    for n in range(4):
        writer.write(path, tmp_path, Caption(None, ("tower",), asked=True, texts=(("title", "x-default", f"T{n}"),)))
        sizes.add(path.stat().st_size)
    assert len(sizes) == 1, sizes


def test_caption_of_gathers_texts_by_language_and_a_free_answers_hierarchy() -> None:
    from autocaption.config import Rule
    from autocaption.engine.base import Answer
    from autocaption.pipeline import caption_of
    from autocaption.placeholders import PromptTemplate
    from autocaption.sidecar import RuleResult

    def result(name: str, answer: str, write: set[str], language: str | None = None) -> RuleResult:
        rule = Rule(name, PromptTemplate.parse(name), write=frozenset(write), language=language)
        return RuleResult(rule, name, answer, Answer(answer, 1, 1, 0.0))

    caption = caption_of([
        result("caption", "A tower", {"description"}, "en"), result("caption-de", "Ein Turm", {"description"}, "de"),
        result("title", "Tower", {"title"}), result("title-fr", "Tour", {"title"}, "fr"),
        result("other-title", "Ignored: the first title stands", {"title"}),
        result("tags", "Places | Italy|Arezzo, tower, |", {"keywords"}),
    ])  # fmt: skip
    assert caption.description == "A tower"
    assert caption.texts == (("description", "en", "A tower"), ("description", "de", "Ein Turm"),
                             ("title", "x-default", "Tower"), ("title", "fr", "Tour"))  # fmt: skip
    assert caption.keywords == ("Arezzo", "tower") and caption.paths == ("Places|Italy|Arezzo",)


# --- a second hostile pass, end to end (issue 20's review) ----------------------------------------------------

TITLES = """
- {name: t, prompt: "A title.", max_new_tokens: 4, write: [title, alt_text]}
- {name: t2, prompt: "Ein Titel.", max_new_tokens: 4, write: [title, alt_text], language: de}
"""


def test_texts_of_a_rule_taken_out_or_moved_to_another_language_are_taken_out(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    photo = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "photos" / "DSCN0010.jpg")
    assert not process(load(make_config(TITLES)), [photo.parent]).failures
    assert {"XMP-dc:Title-de", "XMP-iptcCore:AltTextAccessibility-de"} <= set(exiftool.tags(photo)[photo])
    french = TITLES.replace("language: de", "language: fr")
    assert not process(load(make_config(french)), [photo.parent], force=True).failures
    tags = exiftool.tags(photo)[photo]
    assert "XMP-dc:Title-de" not in tags and "XMP-autocaption:Title-de" not in tags and "XMP-dc:Title-fr" in tags
    # A person's edit of our French title makes it theirs: it stays when the rule goes.
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-dc:Title-fr=Tour de Nonna", str(photo)],
                   check=True)  # fmt: skip
    only_t = TITLES.split("- {name: t2")[0]
    assert not process(load(make_config(only_t)), [photo.parent], force=True).failures
    tags = exiftool.tags(photo)[photo]
    assert tags["XMP-dc:Title-fr"] == "Tour de Nonna" and "XMP-iptcCore:AltTextAccessibility-fr" not in tags
    assert "XMP-autocaption:Title-fr" not in tags
    # No rule writes a title any more: ours goes, from XMP and from Windows' XPTitle; the person's French stays.
    none = '- {name: c, prompt: "Describe.", max_new_tokens: 4, write: [description]}'
    assert not process(load(make_config(none)), [photo.parent], force=True).failures
    tags = exiftool.tags(photo)[photo]
    assert "XMP-dc:Title" not in tags and "IFD0:XPTitle" not in tags and tags["XMP-dc:Title-fr"] == "Tour de Nonna"


def test_our_location_is_ours_to_replace_when_the_position_changes(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    photo = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "photos" / "DSCN0010.jpg")
    rules = '- {name: c, prompt: "Taken in {place}.", max_new_tokens: 4, write: [description]}'
    config = load(make_config(rules, extra="output: {location: true}"))
    assert not process(config, [photo.parent]).failures
    assert exiftool.tags(photo)[photo]["XMP-photoshop:City"] == "Arezzo"
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-GPSLatitude=48.2085", "-GPSLatitudeRef=N",
                    "-GPSLongitude=16.3725", "-GPSLongitudeRef=E", str(photo)], check=True)  # fmt: skip
    assert not process(config, [photo.parent]).failures  # the photo changed: described again
    tags = exiftool.tags(photo)[photo]
    assert (tags["XMP-photoshop:City"], tags["XMP-photoshop:Country"]) == ("Vienna", "Austria")
    document = json.loads(photo.with_name(photo.name + ".json").read_text())
    assert document["rules"]["c"]["prompt"] == "Taken in Vienna, Austria."
    assert document["written"]["texts"]["location"] == "written: Vienna, Austria"


def test_a_persons_title_in_one_language_keeps_ours_out_of_the_default() -> None:
    from autocaption.writers import xmp

    packet = xmp.parse(PACKET.format(attributes="", body=(
        '<dc:title><rdf:Alt><rdf:li xml:lang="de">Mein Titel</rdf:li></rdf:Alt></dc:title>')).encode())  # fmt: skip
    applied = MetadataWriter(OutputConfig())._apply(packet, Caption(None, (), asked=True, texts=(
        ("title", "x-default", "Tower"), ("title", "fr", "Tour"))), _facts_of(b""))  # fmt: skip
    assert applied.texts["title"].startswith("kept: the file already has a person's title")
    assert xmp.alternative(packet, "title", "x-default") == (None, None)  # no default of ours hides theirs
    assert xmp.alternative(packet, "title", "de") == ("Mein Titel", None)
    assert xmp.alternative(packet, "title", "fr") == ("Tour", "Tour")


def test_one_language_in_two_spellings_is_one_alternative() -> None:
    from autocaption.config import Rule
    from autocaption.engine.base import Answer
    from autocaption.pipeline import caption_of
    from autocaption.placeholders import PromptTemplate
    from autocaption.sidecar import RuleResult

    rules = [Rule(name, PromptTemplate.parse(name), write=frozenset({"title"}), language=lang)
             for name, lang in (("t0", None), ("t1", "DE"), ("t2", "de"))]  # fmt: skip
    results = [RuleResult(rule, rule.name, f"answer {rule.name}", Answer("", 1, 1, 0.0)) for rule in rules]
    assert caption_of(results).texts == (("title", "x-default", "answer t0"), ("title", "DE", "answer t1"))
