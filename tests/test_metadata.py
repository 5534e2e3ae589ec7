"""Captions inside photos, checked with exiftool as the independent reader, on copies of real camera
files from ../shared/corpus."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from autocaption.config import OutputConfig
from autocaption.writers.containers import _jpeg_segments, jpeg_blocks
from autocaption.writers.metadata import Caption, MetadataWriter, WriteRecord
from autocaption.writers.policy import is_boilerplate, merge_keywords, split_keywords
from tests import exiftool

CAPTION = 'Café – 東京の夜 <b>&amp; "naïve" 🚲'
KEYWORDS = ("Café", "東京", "night & <city>", "bicycle 🚲")


def writable_copy(source: Path, target: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, target)
        files = [p for p in target.rglob("*") if p.is_file()]
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        files = [target]
    for path in files:
        path.chmod(0o644)  # the shared corpus is read-only; its copies must not be
    return target


def xp_text(value: str) -> str:
    """exiftool decodes XP* tags as UCS-2: an emoji comes back as two CESU-8 surrogates (base64 in JSON)."""
    if not value.startswith("base64:"):
        return value
    import base64

    raw = base64.b64decode(value[7:]).decode("utf-8", "surrogatepass")
    return raw.encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def scan_data(data: bytes) -> bytes:
    return data[_jpeg_segments(data)[1] :]


def segment_counts(path: Path) -> tuple[int, int]:
    segments, _ = _jpeg_segments(path.read_bytes())
    exif = sum(1 for m, p in segments if m == 0xE1 and p.startswith(b"Exif\0\0"))
    xmp = sum(1 for m, p in segments if m == 0xE1 and p.startswith(b"http://ns.adobe.com/xap/1.0/\0"))
    return exif, xmp


DEFAULT_CAPTION = Caption(CAPTION, KEYWORDS)


def write(path: Path, root: Path, caption: Caption = DEFAULT_CAPTION, **output: Any) -> WriteRecord:
    return MetadataWriter(OutputConfig(**output)).write(path, root, caption)


def test_every_corpus_jpeg_gets_the_caption_and_keeps_everything_else(corpus: Path, tmp_path: Path) -> None:
    photos = writable_copy(corpus / "jpg", tmp_path / "jpg")
    files = sorted(photos.rglob("*.jpg"))
    before_tags = exiftool.tags(*files)
    warned = exiftool.warnings_of(*files)
    before = {p: (p.read_bytes(), warned[p], pixels(p)) for p in files}
    for path in files:
        record = write(path, photos, existing="overwrite")
        assert record.file == "embedded", (path, record)
        write(path, photos, existing="overwrite")  # twice: still one EXIF and one XMP segment
    after_tags = exiftool.tags(*files)
    warned = exiftool.warnings_of(*files)
    compared = iptc_files = 0
    for path in files:
        data, warnings, image = before[path]
        new = after_tags[path]
        assert new["XMP-dc:Description"] == CAPTION, path
        assert new["IFD0:ImageDescription"] == CAPTION, path
        assert xp_text(new["IFD0:XPComment"]) == CAPTION, path
        subject = new["XMP-dc:Subject"]
        assert list(KEYWORDS) == (subject if isinstance(subject, list) else [subject])[-len(KEYWORDS) :], path
        if any(key.startswith("IPTC:") for key in before_tags[path]):  # IPTC follows XMP where it exists
            iptc_files += 1
            assert new["IPTC:Caption-Abstract"] == CAPTION and new["IPTC:CodedCharacterSet"] == "UTF8", path
            iptc_keywords = new["IPTC:Keywords"]
            assert (
                list(KEYWORDS)
                == (iptc_keywords if isinstance(iptc_keywords, list) else [iptc_keywords])[-len(KEYWORDS) :]
            ), path
            if "Photoshop:IPTCDigest" in before_tags[path]:  # Photoshop and Lightroom: IPTC and XMP agree
                digests = exiftool.values(path, "IPTCDigest", "CurrentIPTCDigest")
                assert digests["IPTCDigest"] == digests["CurrentIPTCDigest"], path
        old = exiftool.comparable(before_tags[path])
        assert exiftool.comparable(new, ignore=exiftool.OURS) | old == exiftool.comparable(new), path
        lost = {k: v for k, v in old.items() if new.get(k) != v}
        assert lost == {}, path
        compared += len(old)
        assert warned[path] <= warnings, path
        assert scan_data(path.read_bytes()) == scan_data(data), path
        assert pixels(path) == image, path
        assert segment_counts(path) == (1, 1), path
    assert compared > 4000 and iptc_files >= 4


def test_a_persons_caption_is_kept_and_boilerplate_replaced(corpus: Path, tmp_path: Path) -> None:
    human = writable_copy(corpus / "jpg/camera/long_description.jpg", tmp_path / "long_description.jpg")
    blue = writable_copy(corpus / "jpg/xmp/BlueSquare.jpg", tmp_path / "BlueSquare.jpg")
    olympus = writable_copy(corpus / "jpg/exif-org/olympus-c960.jpg", tmp_path / "olympus.jpg")
    blank = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "blank.jpg")
    subprocess.run(
        [exiftool.require(), "-q", "-overwrite_original", "-IFD0:ImageDescription=   ", str(blank)], check=True
    )
    before = exiftool.tags(human, blue)
    for path in (human, blue):
        record = write(path, tmp_path)
        assert record.description.startswith("kept"), record
    after = exiftool.tags(human, blue)
    for path in (human, blue):
        for key in ("IFD0:ImageDescription", "XMP-dc:Description"):
            assert after[path].get(key) == before[path].get(key), (path, key)
        assert "Café" in after[path]["XMP-dc:Subject"]  # keywords are still added
    assert "XMP" in after[blue]["XMP-dc:Subject"]  # ...next to the person's own keywords
    for path in (olympus, blank):
        assert write(path, tmp_path).description == "written"
        assert exiftool.tags(path)[path]["IFD0:ImageDescription"] == CAPTION


def test_overwrite_and_append_policies_and_our_own_text_is_replaced(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/camera/long_description.jpg", tmp_path / "a.jpg")
    theirs = exiftool.tags(path)[path]["IFD0:ImageDescription"]
    write(path, tmp_path, Caption("First answer."), existing="append")
    assert exiftool.tags(path)[path]["XMP-dc:Description"] == f"{theirs}\n\nFirst answer."
    write(path, tmp_path, Caption("Second answer."), existing="append")  # replaces our part only
    assert exiftool.tags(path)[path]["IFD0:ImageDescription"] == f"{theirs}\n\nSecond answer."
    write(path, tmp_path, Caption("Third."), existing="overwrite")
    assert exiftool.tags(path)[path]["XMP-dc:Description"] == "Third."
    record = write(path, tmp_path, Caption("Fourth."))  # keep: the text is ours, so it may be replaced
    assert record.description == "written" and exiftool.tags(path)[path]["IFD0:ImageDescription"] == "Fourth."


def test_keywords_replace_our_previous_ones_and_keep_others(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/xmp/BlueSquare.jpg", tmp_path / "b.jpg")
    write(path, tmp_path, Caption(None, ("fox", "snow")))
    write(path, tmp_path, Caption(None, ("fox", "forest")))
    subject = exiftool.tags(path)[path]["XMP-dc:Subject"]
    assert subject == ["XMP", "Blue Square", "test file", "Photoshop", ".jpg", "fox", "forest"]


def test_png_and_webp_are_edited_without_reencoding(tmp_path: Path) -> None:
    from PIL import PngImagePlugin

    png, webp = tmp_path / "text.png", tmp_path / "lossless.webp"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "scanned at home")
    info.add_itxt("Author", "Jürgen")
    Image.new("RGB", (90, 60), (200, 30, 40)).save(png, pnginfo=info)
    Image.new("RGBA", (50, 40), (0, 100, 200, 128)).save(webp, lossless=True)
    before = {p: (pixels(p), exiftool.tags(p)[p]) for p in (png, webp)}
    for path in (png, webp):
        assert write(path, tmp_path).file == "embedded"
        write(path, tmp_path)
        after = exiftool.tags(path)[path]
        assert after["XMP-dc:Description"] == CAPTION and after["IFD0:ImageDescription"] == CAPTION
        assert pixels(path) == before[path][0]
        assert exiftool.warnings(path) == set()
        old = exiftool.comparable(before[path][1])
        assert {k: v for k, v in old.items() if after.get(k) != v} == {}
    assert exiftool.tags(png)[png]["PNG:Comment"] == "scanned at home"


@pytest.mark.parametrize("name", ["tiff/Arbitro.tiff", "tiff/Picoawards.tiff", "heic/IMG_5195.HEIC"])
def test_tiff_and_heic_stay_byte_identical_with_an_xmp_sidecar(corpus: Path, tmp_path: Path, name: str) -> None:
    path = writable_copy(corpus / name, tmp_path / Path(name).name)
    original = path.read_bytes()
    record = write(path, tmp_path)
    assert record.file == "unchanged" and "never rewritten" in (record.reason or "")
    assert path.read_bytes() == original
    sidecar = path.with_name(path.name + ".xmp")
    assert record.xmp_sidecar == sidecar.name
    tags = exiftool.tags(sidecar)[sidecar]
    assert tags["XMP-dc:Description"] == CAPTION and tags["XMP-dc:Subject"] == list(KEYWORDS)


def test_lightroom_style_sidecar_name(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "tiff/Arbitro.tiff", tmp_path / "Arbitro.tiff")
    write(path, tmp_path, sidecar_name="stem")
    assert (tmp_path / "Arbitro.xmp").is_file()


def test_existing_sidecar_is_merged_not_replaced(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "tiff/Rudless.tiff", tmp_path / "r.tiff")
    sidecar = tmp_path / "r.tiff.xmp"
    sidecar.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:darktable="http://darktable.sf.net/" darktable:history_end="2">'
        '<darktable:history><rdf:Seq><rdf:li darktable:operation="exposure" darktable:enabled="1"/>'
        "</rdf:Seq></darktable:history></rdf:Description></rdf:RDF></x:xmpmeta>",
        encoding="utf-8",
    )
    write(path, tmp_path)
    tags = exiftool.tags(sidecar)[sidecar]
    assert tags["XMP-dc:Description"] == CAPTION
    assert tags["XMP-darktable:History_end"] == 2 and tags["XMP-darktable:HistoryOperation"] == "exposure"


def test_hostile_xmp_is_never_expanded(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "tiff/Rudless.tiff", tmp_path / "r.tiff")
    sidecar = tmp_path / "r.tiff.xmp"
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>'
    )
    sidecar.write_text(bomb, encoding="utf-8")
    from autocaption.errors import WriteError

    with pytest.raises(WriteError, match="existing sidecar left untouched"):
        write(path, tmp_path)
    assert sidecar.read_text(encoding="utf-8") == bomb


def test_xmp_before_exif_keeps_one_of_each_in_place(corpus: Path, tmp_path: Path) -> None:
    source = (corpus / "jpg/xmp/BlueSquare.jpg").read_bytes()
    segments, scan = _jpeg_segments(source)
    exif = next(s for s in segments if s[1].startswith(b"Exif\0\0"))
    xmp = next(s for s in segments if s[1].startswith(b"http://ns.adobe.com/xap/1.0/\0"))
    reordered = [s for s in segments if s not in (exif, xmp)]
    reordered[1:1] = [xmp, exif]  # after JFIF: XMP first, then EXIF
    import struct

    body = b"".join(b"\xff" + bytes([m]) + struct.pack(">H", len(p) + 2) + p for m, p in reordered)
    path = tmp_path / "xmp-first.jpg"
    path.write_bytes(b"\xff\xd8" + body + source[scan:])
    write(path, tmp_path, existing="overwrite")
    write(path, tmp_path, existing="overwrite")
    assert segment_counts(path) == (1, 1)
    order = [p[:4] for m, p in _jpeg_segments(path.read_bytes())[0] if m == 0xE1]
    assert order == [b"http", b"Exif"]
    assert exiftool.tags(path)[path]["IFD0:ImageDescription"] == CAPTION


def test_exif_that_would_exceed_64k_goes_to_the_sidecar(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0021.jpg", tmp_path / "big.jpg")
    subprocess.run(
        [exiftool.require(), "-q", "-overwrite_original", "-ExifIFD:UserComment=" + "x" * 50000, str(path)],
        check=True,
    )
    assert len(jpeg_blocks(path.read_bytes()).exif or b"") > 50000
    original = path.read_bytes()
    record = write(path, tmp_path, Caption("A long caption. " * 400))
    assert record.file == "unchanged" and "64 KB" in (record.reason or "")
    assert path.read_bytes() == original
    assert exiftool.tags(path.with_name("big.jpg.xmp"))[path.with_name("big.jpg.xmp")]["XMP-dc:Description"]


def test_read_only_and_hard_linked_files_are_never_rewritten(corpus: Path, tmp_path: Path) -> None:
    read_only = writable_copy(corpus / "jpg/gps/DSCN0025.jpg", tmp_path / "ro.jpg")
    read_only.chmod(0o444)
    linked = writable_copy(corpus / "jpg/gps/DSCN0027.jpg", tmp_path / "linked.jpg")
    os.link(linked, tmp_path / "other-name.jpg")
    for path, reason in ((read_only, "read-only"), (linked, "2 hard links")):
        original = path.read_bytes()
        record = write(path, tmp_path)
        assert record.file == "unchanged" and reason in (record.reason or ""), record
        assert path.read_bytes() == original
        assert path.with_name(path.name + ".xmp").is_file()


def test_symlink_out_of_the_folder_is_not_followed_for_writing(corpus: Path, tmp_path: Path) -> None:
    outside = writable_copy(corpus / "jpg/gps/DSCN0029.jpg", tmp_path / "outside" / "real.jpg")
    inside = tmp_path / "watched"
    inside.mkdir()
    (inside / "link.jpg").symlink_to(outside)
    original = outside.read_bytes()
    record = write(inside / "link.jpg", inside)
    assert record.file == "unchanged" and "outside" in (record.reason or "")
    assert outside.read_bytes() == original


def test_replacement_keeps_mode_and_times(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0038.jpg", tmp_path / "t.jpg")
    path.chmod(0o640)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    write(path, tmp_path)
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 1_500_000_000_123_456_789)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".autocaption-tmp-")]


KILL_LOOP = """
import sys
from pathlib import Path
from autocaption.config import OutputConfig
from autocaption.writers.metadata import Caption, MetadataWriter, WriteRecord
path = Path(sys.argv[1])
writer = MetadataWriter(OutputConfig(existing="overwrite"))
i = 0
print("ready", flush=True)
while True:
    i += 1
    writer.write(path, path.parent, Caption(f"caption number {i} " + "x" * (i % 7000)))
"""


def test_kill_9_during_writes_leaves_a_complete_file(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/large/jolla.jpg", tmp_path / "jolla.jpg")
    scan = scan_data(path.read_bytes())
    for delay in (0.05, 0.13, 0.29, 0.41, 0.67):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = path.read_bytes()
        assert scan_data(data) == scan  # the image data is complete and untouched
        description = exiftool.tags(path)[path].get("IFD0:ImageDescription", "")
        assert description.startswith("caption number") or description == ""
        with Image.open(io.BytesIO(data)) as image:
            image.load()


def test_boilerplate_and_keyword_helpers() -> None:
    assert is_boilerplate("OLYMPUS DIGITAL CAMERA") and is_boilerplate("SONY DSC") and is_boilerplate("  ")
    assert is_boilerplate("KODAK Digital Still Camera") and is_boilerplate("WWL", make="WWL")
    assert not is_boilerplate("Operation Mountain Viper")
    assert split_keywords("fox, snow\n- Forest; fox ;  'winter'.") == ("fox", "snow", "Forest", "winter")
    assert merge_keywords(["mine", "old ai"], ["old ai"], ["new ai", "Mine"]) == (("mine", "new ai"), ("new ai",))


def test_digest_of_whole_file_changes_only_in_metadata(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0040.jpg", tmp_path / "d.jpg")
    record = write(path, tmp_path)
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def add_xmp_segment_first(path: Path, packet: bytes) -> None:
    """A second standard XMP APP1 segment, before EXIF (the file already has one after its SOF)."""
    import struct

    header = b"http://ns.adobe.com/xap/1.0/\x00"
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(header) + len(packet) + 2) + header + packet
                     + data[2:])  # fmt: skip


EARLY_PACKET = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3">'
    b"<dc:creator><rdf:Seq><rdf:li>Ann Example</rdf:li></rdf:Seq></dc:creator></rdf:Description></rdf:RDF>"
    b'</x:xmpmeta><?xpacket end="w"?>'
)


def test_two_xmp_packets_are_merged_into_one(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "two.jpg")
    add_xmp_segment_first(path, EARLY_PACKET)
    assert segment_counts(path) == (1, 2) and "Duplicate XMP at JPEG-APP1-XMP" in exiftool.warnings(path)
    before = exiftool.tags(path)[path]
    assert before["XMP-xmp:Rating"] == 3 and before["XMP-microsoft:RatingPercent"] == 0
    write(path, tmp_path)
    after = exiftool.tags(path)[path]
    assert segment_counts(path) == (1, 1)
    assert "Duplicate XMP at JPEG-APP1-XMP" not in exiftool.warnings(path)
    assert after["XMP-dc:Description"] == CAPTION
    # the properties of both packets are kept: Rating and Creator from the first, Microsoft's from the second
    assert after["XMP-xmp:Rating"] == 3 and after["XMP-dc:Creator"] == "Ann Example"
    assert after["XMP-microsoft:RatingPercent"] == 0 and after["XMP-x:XMPToolkit"] == before["XMP-x:XMPToolkit"]


def test_iptc_follows_the_caption_and_a_persons_iptc_caption_is_kept(corpus: Path, tmp_path: Path) -> None:
    goalie = writable_copy(corpus / "jpg/xmp/no_exif.jpg", tmp_path / "goalie.jpg")  # IPTC in UTF-8, a caption
    record = write(goalie, tmp_path)  # existing: keep
    tags = exiftool.tags(goalie)[goalie]
    assert record.description.startswith("kept") and tags["IPTC:Caption-Abstract"] == "Der Goalie bin ig"
    assert tags["IPTC:Keywords"] == ["tag", *KEYWORDS] and tags["XMP-dc:Subject"] == ["tag", *KEYWORDS]
    assert tags["IPTC:By-line"] == "CREDIT"  # every other dataset as it was
    digests = exiftool.values(goalie, "IPTCDigest", "CurrentIPTCDigest")
    assert digests["IPTCDigest"] == digests["CurrentIPTCDigest"]

    blue = writable_copy(corpus / "jpg/xmp/BlueSquare.jpg", tmp_path / "blue.jpg")  # IPTC without a charset
    write(blue, tmp_path, existing="overwrite")
    tags = exiftool.tags(blue)[blue]
    assert tags["IPTC:CodedCharacterSet"] == "UTF8" and tags["IPTC:Caption-Abstract"] == CAPTION
    assert tags["IPTC:ObjectName"] == "Blue Square Test File - .jpg"
    assert exiftool.warnings(blue) <= exiftool.warnings(corpus / "jpg/xmp/BlueSquare.jpg")


def test_iptc_in_a_legacy_character_set_is_left_alone(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0012.jpg", tmp_path / "latin.jpg")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-charset", "iptc=Latin", "-IPTC:City=Zürich",
                    "-IPTC:Caption-Abstract=SONY DSC", str(path)], check=True)  # fmt: skip
    before = exiftool.tags(path)[path]
    assert before["IPTC:City"] == "Zürich" and "IPTC:CodedCharacterSet" not in before
    assert write(path, tmp_path).description == "written"
    after = exiftool.tags(path)[path]
    assert after["XMP-dc:Description"] == CAPTION and after["IFD0:ImageDescription"] == CAPTION
    assert {k: v for k, v in after.items() if k.startswith("IPTC:")} == {
        k: v for k, v in before.items() if k.startswith("IPTC:")
    }  # untouched: UTF-8 text would change how Zürich reads


def test_lightroom_hierarchical_keywords_get_ours_too(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0021.jpg", tmp_path / "lr.jpg")
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-lr:HierarchicalSubject=Places|France|Paris",
                    "-XMP-dc:Subject=Paris", str(path)], check=True)  # fmt: skip
    write(path, tmp_path, Caption(None, ("fox", "snow")))
    write(path, tmp_path, Caption(None, ("fox", "forest")))  # replaces our own entries only
    tags = exiftool.tags(path)[path]
    assert tags["XMP-lr:HierarchicalSubject"] == ["Places|France|Paris", "fox", "forest"]
    assert tags["XMP-dc:Subject"] == ["Paris", "fox", "forest"]
    plain = writable_copy(corpus / "jpg/gps/DSCN0025.jpg", tmp_path / "plain.jpg")
    write(plain, tmp_path, Caption(None, ("fox",)))
    assert "XMP-lr:HierarchicalSubject" not in exiftool.tags(plain)[plain]  # not added where there was none


def test_empty_answers_are_named_as_such(corpus: Path, tmp_path: Path) -> None:
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", tmp_path / "a.jpg")
    before = path.read_bytes()
    assert write(path, tmp_path, Caption(None, (), asked=True)).reason == "the answers were empty: nothing to write"
    assert write(path, tmp_path, Caption(None)).reason == "no rule writes into the photo"
    assert path.read_bytes() == before


def test_a_persons_correction_survives_twenty_model_writes_byte_for_byte(corpus: Path, tmp_path: Path) -> None:
    """Issue 17.1: the IFD0 rewrite cut the old tail while the person's ImageDescription/XPComment, kept under
    `existing: keep`, still pointed into it (EXIF became "k", then "points outside the EXIF block")."""
    photos = tmp_path / "photos"
    path = writable_copy(corpus / "jpg/gps/DSCN0010.jpg", photos / "DSCN0010.jpg")
    warnings = exiftool.warnings(path)
    for round_ in range(20):
        long_text = round_ % 2 == 1
        person = ("A much longer correction by a person, " * 6 + f"round {round_}") if long_text else f"short {round_}"
        record = write(path, photos, Caption(person, (f"kw{round_}",), asked=True, person=True))
        assert record.file == "embedded", record
        model = "m" if long_text else "A long model answer about the picture, " * 5
        for _ in range(2):  # describe again, then `process --force`
            record = write(path, photos, Caption(model, ("model", f"word{round_}"), asked=True))
            assert record.file == "embedded" and record.description.startswith("kept"), record
        tags = exiftool.tags(path)[path]
        assert tags["IFD0:ImageDescription"] == person == tags["XMP-dc:Description"], round_
        assert xp_text(tags["IFD0:XPComment"]) == person, round_
        keywords = xp_text(tags["IFD0:XPKeywords"]).split(";")
        assert keywords[0] == f"kw{round_}" and f"word{round_}" in keywords, round_  # the person's first, ours added
        assert exiftool.warnings(path) <= warnings, (round_, exiftool.warnings(path) - warnings)
