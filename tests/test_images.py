from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from autocaption.errors import ImageError
from autocaption.images import open_picture, sniff
from tests.badinputs import make_bad_inputs

LIMIT = 200_000_000


@pytest.fixture
def bad(tmp_path: Path, corpus: Path) -> Path:
    return make_bad_inputs(tmp_path / "bad", corpus)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("zero.jpg", "empty file (0 bytes)"),
        ("truncated.jpg", "corrupt or truncated JPEG"),
        ("notes.jpg", "not an image"),
        ("bomb.png", "20000x20000 is 400 MP, above the limit of 200 MP (images.max_pixels)"),
    ],
)
def test_bad_files_raise_one_clear_line(bad: Path, name: str, message: str) -> None:
    with pytest.raises(ImageError) as info:
        open_picture(bad / name, max_pixels=LIMIT)
    text = str(info.value)
    assert text.startswith(f"{bad / name}: ") and message in text and "\n" not in text


def test_vanished_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="disappeared"):
        open_picture(tmp_path / "gone.jpg", max_pixels=LIMIT)


@pytest.mark.parametrize("name", ["png-named.jpg", "cmyk.jpg", "deep16.png", "animated.gif"])
def test_odd_but_valid_files_become_rgb(bad: Path, name: str) -> None:
    picture = open_picture(bad / name, max_pixels=LIMIT)
    assert picture.image.mode == "RGB"
    assert picture.image.size == (picture.width, picture.height)


def test_format_is_sniffed_from_bytes_not_the_name(bad: Path) -> None:
    assert open_picture(bad / "png-named.jpg", max_pixels=LIMIT).format == "PNG"
    assert sniff((bad / "notes.jpg").read_bytes()[:16]) is None


def test_sixteen_bit_is_scaled_not_clipped(bad: Path) -> None:
    pixel = open_picture(bad / "deep16.png", max_pixels=LIMIT).image.getpixel((0, 0))
    assert pixel == (156, 156, 156)  # 40000 / 256


def test_heic_without_plugin_says_what_to_install(corpus: Path) -> None:
    try:
        import pillow_heif  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(ImageError, match="install pillow-heif"):
            open_picture(corpus / "heic/IMG_5195.HEIC", max_pixels=LIMIT)
    else:
        assert open_picture(corpus / "heic/IMG_5195.HEIC", max_pixels=LIMIT).format == "HEIF"


@pytest.mark.parametrize("n", range(1, 9))
def test_exif_orientation_is_applied(corpus: Path, n: int) -> None:
    reference = open_picture(corpus / "jpg/orientation/landscape_1.jpg", max_pixels=LIMIT).image
    picture = open_picture(corpus / f"jpg/orientation/landscape_{n}.jpg", max_pixels=LIMIT)
    assert picture.image.size == reference.size == (picture.width, picture.height)
    # Upright images agree pixel for pixel up to JPEG noise: compare a coarse thumbnail.
    a = reference.resize((8, 6), Image.Resampling.BOX).tobytes()
    b = picture.image.resize((8, 6), Image.Resampling.BOX).tobytes()
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 40


def test_large_jpeg_is_drafted_but_reports_full_size(corpus: Path) -> None:
    picture = open_picture(corpus / "jpg/large/jolla.jpg", max_pixels=LIMIT, draft_side=1008)
    assert (picture.width, picture.height) == (3264, 2448)
    assert min(picture.image.size) >= 1008 and picture.image.size[0] < 3264


def test_facts_for_placeholders(corpus: Path) -> None:
    facts = open_picture(corpus / "jpg/camera/Canon_40D.jpg", max_pixels=LIMIT).facts
    assert facts == {"date": "2008-05-30", "datetime": "2008-05-30 15:56:01", "camera": "Canon EOS 40D", "gps": None}
    # 43° 28' 2.81" N, 11° 53' 6.46" E as exiftool reads it; the EXIF GPS of every corpus photo that has one
    assert open_picture(corpus / "jpg/gps/DSCN0010.jpg", max_pixels=LIMIT).facts["gps"] == "43.4674 N, 11.8851 E"
    for path in sorted((corpus / "jpg/invalid").glob("*.jpg")):  # damaged EXIF: no fact, never an error
        assert set(open_picture(path, max_pixels=LIMIT).facts) == {"date", "datetime", "camera", "gps"}
    polaroid = open_picture(corpus / "jpg/camera/WWL_(Polaroid)_ION230.jpg", max_pixels=LIMIT).facts
    assert polaroid["camera"] == "WWL ION230"  # cut at the NUL the camera left in Model


def test_damaged_exif_still_decodes(corpus: Path) -> None:
    for path in sorted((corpus / "jpg/invalid").glob("*.jpg")):
        assert open_picture(path, max_pixels=LIMIT).image.mode == "RGB"
