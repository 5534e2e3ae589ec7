"""End to end: the real `autocaption process` CLI, the tiny model, copies of the shared corpus."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from autocaption.config import load
from autocaption.discover import Candidate
from autocaption.engine import load_engine
from autocaption.images import open_picture
from autocaption.pipeline import Failed, Pipeline
from autocaption.sidecar import SCHEMA
from tests.badinputs import FAILING, WORKING, make_bad_inputs
from tests.conftest import RunCli, copy_tree


def digests(folder: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.name.endswith(".json")
    }


def test_process_corpus_writes_a_sidecar_for_every_image(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photos = copy_tree(corpus / "jpg", tmp_path / "jpg")
    before = digests(photos)
    config = make_config()
    result = run_cli("process", "--config", config, photos)
    assert result.returncode == 0, result.stderr
    images = sorted(p for p in photos.rglob("*.jpg"))
    assert len(images) == len(before) > 60
    for image in images:
        document = json.loads(image.with_name(image.name + ".json").read_text(encoding="utf-8"))
        assert document["schema"] == SCHEMA
        assert document["image"]["file"] == image.name
        assert document["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert set(document["rules"]) == {"caption", "keywords"}
        caption = document["rules"]["caption"]
        assert caption["prompt"] == f"Describe {image.name}."
        assert caption["answer"] and caption["tokens"]["answer"] > 0 and caption["tokens"]["prompt"] > 0
        assert document["model"]["device"] == "cpu" and document["model"]["dtype"] == "float32"
    assert digests(photos) == before  # the originals are untouched
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{len(images)} images described, {2 * len(images)} answers, 0 skipped, 0 failed")

    again = run_cli("process", "--config", config, photos)
    assert again.returncode == 0
    assert again.stdout.strip().startswith(f"0 images described, 0 answers, {len(images)} skipped")
    assert "loaded" not in again.stderr  # nothing to do: the model is not even loaded


def test_rerun_with_a_changed_rule_redoes_that_rule_and_keeps_others(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "photos" / "DSCN0010.jpg"
    photo.parent.mkdir()
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    sidecar = photo.with_name(photo.name + ".json")
    first = make_config(
        rules="""
        - {name: caption, prompt: "Describe.", max_new_tokens: 8}
        - {name: camera, prompt: "Shot with {camera} on {date}.", max_new_tokens: 8}
        """
    )
    assert run_cli("process", "--config", first, photo).returncode == 0
    original = json.loads(sidecar.read_text(encoding="utf-8"))
    assert original["rules"]["camera"]["prompt"] == "Shot with NIKON COOLPIX P6000 on 2008-10-22."

    second = make_config(rules='- {name: caption, prompt: "Describe it again.", max_new_tokens: 8}')
    result = run_cli("process", "--config", second, photo)
    assert result.returncode == 0 and result.stdout.startswith("1 image described, 1 answer")
    updated = json.loads(sidecar.read_text(encoding="utf-8"))
    assert updated["rules"]["camera"] == original["rules"]["camera"]  # the other rule's entry is kept
    assert updated["rules"]["caption"]["prompt"] == "Describe it again."

    forced = run_cli("process", "--config", second, "--force", photo)
    assert forced.stdout.startswith("1 image described, 1 answer, 0 skipped")


def test_bad_inputs_are_reported_one_line_each_and_never_stop_the_rest(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    folder = make_bad_inputs(tmp_path / "inbox", corpus)
    result = run_cli("process", "--config", make_config(), folder)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("autocaption: error: ")]
    assert "Traceback" not in result.stderr
    for name, reason in FAILING.items():
        matching = [line for line in errors if f"/{name}" in line]
        assert len(matching) == 1, (name, errors)
        assert reason in matching[0], matching[0]
    assert len(errors) == len(FAILING)
    for name in [*WORKING, "sub/inner.jpg"]:
        sidecar = folder / (name + ".json")
        assert json.loads(sidecar.read_text(encoding="utf-8"))["rules"]["caption"]["answer"], name
    assert any("new\\nline.jpg" in line for line in result.stderr.splitlines()) is False  # it worked: no line
    summary = result.stdout.strip()
    assert summary.startswith(f"{len(WORKING) + 1} images described") and f"{len(FAILING)} failed" in summary


def test_a_file_deleted_between_listing_and_reading_fails_alone(
    make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    config = load(make_config())
    keep, gone = tmp_path / "keep.jpg", tmp_path / "gone.jpg"
    for path in (keep, gone):
        path.write_bytes((corpus / "jpg/gps/DSCN0012.jpg").read_bytes())
    candidates = [Candidate(gone, gone.name, tmp_path), Candidate(keep, keep.name, tmp_path)]
    gone.unlink()
    outcomes = Pipeline(config, load_engine(config.model)).run(candidates)
    assert isinstance(outcomes[0], Failed) and "disappeared" in outcomes[0].message
    assert keep.with_name("keep.jpg.json").is_file()


def test_process_named_files_and_missing_paths(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "one.jpg"
    photo.write_bytes((corpus / "jpg/camera/Nikon_D70.jpg").read_bytes())
    result = run_cli("process", "--config", make_config(), photo, tmp_path / "missing.jpg")
    assert result.returncode == 1
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder" in result.stderr
    assert photo.with_name("one.jpg.json").is_file()


def test_files_that_are_no_images_are_refused_before_the_model_loads(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """`process notes.txt` loaded the whole model before saying it is not an image (issue 22)."""
    notes, disguised, empty = tmp_path / "notes.txt", tmp_path / "holiday.jpg", tmp_path / "zero.jpg"
    notes.write_text("shopping list", encoding="utf-8")
    disguised.write_bytes(b"<html>not a photo</html>")
    empty.write_bytes(b"")
    result = run_cli("process", "--config", make_config(), notes, disguised, empty)
    assert result.returncode == 1 and result.stdout.startswith("0 images described, 0 answers, 0 skipped, 3 failed")
    assert f"{notes}: not an image (content is not a known image format)" in result.stderr
    assert f"{disguised}: not an image" in result.stderr and f"{empty}: empty file (0 bytes)" in result.stderr
    assert "loaded on" not in result.stderr, result.stderr  # the model was never loaded
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("rotation", ["landscape_6.jpg", "portrait_8.jpg"])
def test_sidecar_records_upright_size(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path, rotation: str
) -> None:
    photo = tmp_path / rotation
    photo.write_bytes((corpus / "jpg/orientation" / rotation).read_bytes())
    assert run_cli("process", "--config", make_config(), photo).returncode == 0
    image = json.loads(photo.with_name(rotation + ".json").read_text(encoding="utf-8"))["image"]
    upright = open_picture(photo, max_pixels=10**9).image.size
    assert (image["width"], image["height"]) == upright


WRITING_RULES = """
- {name: caption, prompt: "Describe.", max_new_tokens: 16, write: [description]}
- {name: tags, prompt: "Keywords, comma separated.", max_new_tokens: 12, write: [keywords]}
"""


def test_process_writes_answers_into_photos_and_records_where(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    from tests import exiftool

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("jpg/gps/DSCN0010.jpg", "jpg/camera/long_description.jpg", "tiff/Arbitro.tiff"):
        target = folder / Path(name).name
        target.write_bytes((corpus / name).read_bytes())
    tiff_bytes = (folder / "Arbitro.tiff").read_bytes()
    config = make_config(rules=WRITING_RULES)
    result = run_cli("process", "--config", config, folder)
    assert result.returncode == 0, result.stderr
    read = exiftool.tags(*sorted(folder.glob("*.jpg")), folder / "Arbitro.tiff.xmp")

    gps = json.loads((folder / "DSCN0010.jpg.json").read_text(encoding="utf-8"))
    caption = gps["rules"]["caption"]["answer"]
    assert gps["written"]["file"] == "embedded" and gps["written"]["description"] == "written"
    assert read[folder / "DSCN0010.jpg"]["XMP-dc:Description"] == caption
    assert read[folder / "DSCN0010.jpg"]["IFD0:ImageDescription"] == caption
    assert gps["written"]["sha256"] == hashlib.sha256((folder / "DSCN0010.jpg").read_bytes()).hexdigest()

    human = json.loads((folder / "long_description.jpg.json").read_text(encoding="utf-8"))
    assert human["written"]["description"].startswith("kept")
    assert read[folder / "long_description.jpg"]["IFD0:ImageDescription"].startswith("Operation Mountain Viper")

    tiff = json.loads((folder / "Arbitro.tiff.json").read_text(encoding="utf-8"))
    assert tiff["written"]["file"] == "unchanged" and tiff["written"]["xmp_sidecar"] == "Arbitro.tiff.xmp"
    assert "TIFF files are never rewritten" in tiff["written"]["reason"]
    assert read[folder / "Arbitro.tiff.xmp"]["XMP-dc:Description"] == tiff["rules"]["caption"]["answer"]
    assert (folder / "Arbitro.tiff").read_bytes() == tiff_bytes

    again = run_cli("process", "--config", config, folder)  # our own write does not make it stale
    assert again.stdout.startswith("0 images described, 0 answers, 3 skipped"), again.stdout


def test_dry_run_prints_the_plan_and_touches_nothing(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("jpg/gps/DSCN0012.jpg", "tiff/Jobagent.tiff"):
        (folder / Path(name).name).write_bytes((corpus / name).read_bytes())
    before = {p: p.read_bytes() for p in folder.iterdir()}
    result = run_cli("process", "--dry-run", "--config", make_config(rules=WRITING_RULES), folder)
    assert result.returncode == 0, result.stderr
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    assert f"{folder / 'DSCN0012.jpg'}: would write into the photo (EXIF + XMP)" in result.stdout
    assert "would write into Jobagent.tiff.xmp (TIFF files are never rewritten" in result.stdout
    assert "  caption: " in result.stdout and result.stdout.strip().endswith(
        "0 failed in " + result.stdout.split()[-2] + " s"
    )


def test_stale_redescribes_only_images_whose_rules_changed(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    (folder / "scans").mkdir(parents=True)
    (folder / "a.jpg").write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    (folder / "scans" / "b.jpg").write_bytes((corpus / "jpg/gps/DSCN0012.jpg").read_bytes())
    watch = f"watch: [{{path: {str(folder)!r}}}]"
    rules = """
    - {name: caption, prompt: "Describe.", max_new_tokens: 6}
    - {name: decade, prompt: "Which decade?", max_new_tokens: 4, match: ["**/scans/**"]}
    """
    config = make_config(rules=rules, extra=watch)
    assert run_cli("process", "--config", config, folder).stdout.startswith("2 images described")
    assert run_cli("process", "--stale", "--config", config).stdout.startswith("0 images described")
    make_config(rules=rules.replace("Which decade?", "Which decade, roughly?"), extra=watch)
    result = run_cli("process", "--stale", "--config", config)
    assert result.returncode == 0 and result.stdout.startswith("1 image described, 2 answers"), result.stdout


def test_odd_file_names_are_described_beside_good_ones(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    """Issue 17.4 and 7: a name that is not UTF-8 stopped `process` with a TypeError and the good photos beside
    it were not described; a name too long for its sidecar is captioned and named in one failure line."""
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    names = [os.fsdecode(b"bad\xffname.jpg"), "x" * 247 + ".jpg", "two\nlines.jpg", "100% done.jpg", "good.jpg"]
    for name in names:
        (folder / name).write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    config = make_config(rules='- {name: caption, prompt: "Describe {file}.", max_new_tokens: 8, write: [description]}')
    result = run_cli("process", "--config", config, folder)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1 and result.stdout.startswith("4 images described, 4 answers, 0 skipped, 1 failed")
    failures = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(failures) == 1 and "xxxx.jpg.json: cannot write sidecar: File name too long" in failures[0]
    document = json.loads((folder / (names[0] + ".json")).read_text(encoding="utf-8"))
    assert document["image"]["file"] == "bad\\xffname.jpg"
    assert document["rules"]["caption"]["prompt"] == "Describe bad\\xffname.jpg."
    again = run_cli("process", "--config", config, folder)
    assert again.stdout.startswith("0 images described") and "bad\\xffname.jpg" not in again.stderr


def test_a_symlinked_folder_leading_outside_the_tree_is_never_written(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    """Issue 25.9: a photo reached through a symlinked folder pointing outside the watched tree was rewritten
    in place and got a sidecar there."""
    watched, elsewhere = tmp_path / "watched", tmp_path / "elsewhere"
    watched.mkdir()
    elsewhere.mkdir()
    outside = elsewhere / "theirs.jpg"
    outside.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    (watched / "mine.jpg").write_bytes((corpus / "jpg/gps/DSCN0012.jpg").read_bytes())
    (watched / "link").symlink_to(elsewhere, target_is_directory=True)
    before = outside.read_bytes()
    config = make_config(rules='- {name: caption, prompt: "Describe.", max_new_tokens: 6, write: [description]}',
                         extra=f"watch: [{{path: {str(watched)!r}}}]")  # fmt: skip
    result = run_cli("process", "--config", config, watched)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 image described, 1 answer, 1 skipped"), result.stdout
    assert "outside" in result.stderr and "left alone" in result.stderr
    assert outside.read_bytes() == before and sorted(p.name for p in elsewhere.iterdir()) == ["theirs.jpg"]
    assert (watched / "mine.jpg.json").exists()
