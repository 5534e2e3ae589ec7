from __future__ import annotations

import pytest

from autocaption.globs import GlobSet
from autocaption.paths import display
from autocaption.placeholders import PromptTemplate, TemplateError
from autocaption.textclean import clean_answer


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["**/*.jpg"], "IMG_1.JPG", True),
        (["**/*.jpg"], "2024/05/IMG_1.jpg", True),
        (["*.jpg"], "2024/05/IMG_1.jpg", True),  # no slash: the name at any depth
        (["2024/*.jpg"], "2024/05/IMG_1.jpg", False),  # `*` stays inside a folder
        (["2024/**/*.jpg"], "2024/IMG_1.jpg", True),
        (["**/.*/**"], "a/.thumbnails/x.jpg", True),
        (["**/.*/**"], "a/b/x.jpg", False),
        (["**/IMG_????.jpg"], "IMG_0001.jpg", True),
        (["**/[!x]*.png"], "a.png", True),
        (["**/[!x]*.png"], "x.png", False),
        ([], "a.jpg", False),
    ],
)
def test_globs(patterns: list[str], path: str, expected: bool) -> None:
    assert GlobSet.of(patterns).matches(path) is expected


def test_placeholders_fill_known_names_only() -> None:
    template = PromptTemplate.parse("Photo {file} in {folder} taken {date} with {camera}. {{literal}}")
    values = {"file": "a.jpg", "folder": "trip", "date": "2024-05-01", "camera": None}
    assert template.render(values) == "Photo a.jpg in trip taken 2024-05-01 with unknown. {literal}"


def test_placeholder_values_are_not_interpreted() -> None:
    template = PromptTemplate.parse("File {file}")
    assert template.render({"file": "{camera} {0.__class__}"}) == "File {camera} {0.__class__}"


@pytest.mark.parametrize("source", ["{file.__class__}", "{0}", "{file!r}", "{}", "x }"])
def test_unsafe_or_unknown_placeholders_are_rejected(source: str) -> None:
    with pytest.raises(TemplateError):
        PromptTemplate.parse(source)


def test_clean_answer_strips_what_metadata_cannot_carry() -> None:
    assert clean_answer("  A fox\x00 in\x07 snow.\ufffe \n") == "A fox in snow."
    assert clean_answer("Café – 東京の夜 🚲") == "Café – 東京の夜 🚲"


def test_prefix_clean_up_is_opt_in() -> None:
    raw = "This image shows a red fox in the snow."
    assert clean_answer(raw) == raw
    assert clean_answer(raw, strip_prefixes=["this image shows"]) == "A red fox in the snow."


def test_display_escapes_control_characters() -> None:
    assert display("/p/a\nb.jpg") == "/p/a\\nb.jpg"
    assert display("/p/café.jpg") == "/p/café.jpg"


def test_invisible_and_bidi_characters_never_reach_the_metadata() -> None:
    """Issue 25.10: U+202E, U+200B, U+2028 and CR/tab inside keywords reached EXIF and XMP."""
    from autocaption.writers.policy import split_keywords

    answer = clean_answer("\u202eA fox\u200b in\u2028the snow\ufeff\r\nby a tree")
    assert answer == "A fox in\nthe snow\nby a tree"
    assert clean_answer("family 👨\u200d👩\u200d👧") == "family 👨\u200d👩\u200d👧"  # joiners inside emoji stay
    words = split_keywords(clean_answer("fox\u202e, snow\u200b,\tred\ttree\rleaf, \u2066x\u2069"))
    assert words == ("fox", "snow", "red tree", "leaf", "x")
