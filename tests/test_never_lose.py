"""Nothing of a person's is lost and no photo is skipped for good (issue 13): other programs' JSON files,
sidecars of the wrong shape, a full disk, dry runs that touch nothing. The real CLI, the tiny model,
copies of the shared corpus; a real tmpfs for the full disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import exiftool
from tests.conftest import RunCli

WRITING_RULES = """
- {name: caption, prompt: "Describe.", max_new_tokens: 12, write: [description]}
- {name: tags, prompt: "Keywords.", max_new_tokens: 8, write: [keywords]}
"""
TAKEOUT = json.dumps(
    {"title": "IMG_1.jpg", "description": "Grandma's 80th birthday, in the garden", "people": [{"name": "Ann"}],
     "geoData": {"latitude": 48.85, "longitude": 2.35}, "photoTakenTime": {"timestamp": "1526400000"}},
    indent=2,
)  # fmt: skip
NOT_OURS = {  # photo name -> what its `<name>.json` holds
    "takeout.jpg": TAKEOUT,
    "list.jpg": "[1, 2, 3]\n",
    "other.jpg": '{"schema": "other/9", "data": 1}\n',
    "text.jpg": "not JSON at all\n",
    "shape.jpg": '{"schema": "autocaption/1", "image": "x"}\n',
    "rules.jpg": '{"schema": "autocaption/1", "image": {"size": 1, "mtime_ns": 2}, "rules": "oops"}\n',
}


def test_json_files_that_are_not_ours_are_never_overwritten(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, text in NOT_OURS.items():
        (folder / name).write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
        (folder / f"{name}.json").write_text(text, encoding="utf-8")
    config = make_config()
    result = run_cli("process", "--config", config, folder)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"{len(NOT_OURS)} images described")
    for name, text in NOT_OURS.items():
        assert (folder / f"{name}.json").read_text(encoding="utf-8") == text, name  # byte for byte
        ours = json.loads((folder / f"{name}.autocaption.json").read_text(encoding="utf-8"))
        assert ours["schema"] == "autocaption/1" and ours["rules"]["caption"]["answer"], name
        named = [line for line in result.stderr.splitlines() if f"/{name}.json:" in line]
        assert len(named) == 1 and "left as it is" in named[0], (name, result.stderr)
    assert "belongs to another program" in result.stderr and "wrong shape" in result.stderr

    again = run_cli("process", "--config", config, folder)  # ours is found beside theirs: current, skipped
    assert again.returncode == 0 and again.stdout.startswith(f"0 images described, 0 answers, {len(NOT_OURS)} skipped")
    assert "left as it is" not in again.stderr
    assert all((folder / f"{n}.json").read_text(encoding="utf-8") == t for n, t in NOT_OURS.items())


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int) -> Iterator[Path]:
    """A real tmpfs of `size_kb`: writes fail with ENOSPC once it is full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def grow(disk: Path, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(disk)], check=True)


def test_a_photo_write_that_failed_for_lack_of_space_is_done_later_without_the_model(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    config = make_config(rules=WRITING_RULES)
    with small_disk(tmp_path / "disk", 1200) as disk:
        photo = disk / "jolla.jpg"  # 812 KB: its rewrite needs as much again, the JSON sidecar 2 KB
        photo.write_bytes((corpus / "jpg/large/jolla.jpg").read_bytes())
        original = hashlib.sha256(photo.read_bytes()).hexdigest()
        full = run_cli("process", "--config", config, photo)
        assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
        assert hashlib.sha256(photo.read_bytes()).hexdigest() == original  # intact
        document = json.loads((disk / "jolla.jpg.json").read_text(encoding="utf-8"))
        assert document["written"]["file"] == "failed"
        answer = document["rules"]["caption"]["answer"]

        grow(disk, 4096)
        later = run_cli("process", "--config", config, photo)
        assert later.returncode == 0, later.stderr
        assert "1 written again from recorded answers" in later.stdout, later.stdout
        assert "loaded" not in later.stderr  # the answers were recorded: the model was not needed
        assert exiftool.tags(photo)[photo]["XMP-dc:Description"] == answer
        document = json.loads((disk / "jolla.jpg.json").read_text(encoding="utf-8"))
        assert document["written"]["file"] == "embedded"
        assert document["written"]["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
        assert document["rules"]["caption"]["answer"] == answer
        done = run_cli("process", "--config", config, photo)
        assert done.stdout.startswith("0 images described, 0 answers, 1 skipped"), done.stdout


def test_a_missing_xmp_sidecar_is_written_again_from_the_recorded_answers(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "Arbitro.tiff"
    photo.write_bytes((corpus / "tiff/Arbitro.tiff").read_bytes())
    config = make_config(rules=WRITING_RULES)
    assert run_cli("process", "--config", config, photo).returncode == 0
    xmp = tmp_path / "Arbitro.tiff.xmp"
    first = xmp.read_bytes()
    xmp.unlink()
    result = run_cli("process", "--config", config, photo)
    assert result.returncode == 0 and "1 written again from recorded answers" in result.stdout, result.stdout
    assert xmp.read_bytes() == first


def test_dry_run_creates_no_state(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0012.jpg").read_bytes())
    config = make_config()
    result = run_cli("process", "--dry-run", "--config", config, photo)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "state").exists()
    assert f"{photo}: would write" in result.stdout and "JSON sidecar a.jpg.json" in result.stdout


def test_retry_names_paths_it_cannot_queue(run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path) -> None:
    config = make_config()
    assert run_cli("status", "--config", config).returncode == 2  # no journal yet: one line, exit 2
    as_json = run_cli("status", "--json", "--config", config)  # issue 17.16: a monitor still reads JSON
    assert as_json.returncode == 2 and "no journal yet" in json.loads(as_json.stdout)["error"]
    nothing = run_cli("retry", "--config", config)  # ...and retry does not make a journal to say so
    assert nothing.returncode == 2 and "no journal yet" in nothing.stderr
    assert not (tmp_path / "state" / "journal.sqlite3").exists()
    from autocaption.config import load
    from autocaption.journal import Journal

    journal = Journal(load(config).state.dir)
    bad, good = tmp_path / "album" / "bad.jpg", tmp_path / "album" / "good.jpg"
    journal.failed(bad, f"{bad}: not an image", transient=False, max_attempts=5, backoff=1)
    good.parent.mkdir()
    good.write_bytes(b"x")
    journal.done(good, good.stat(), None, "fp")
    journal.close()
    missing = run_cli("retry", "--config", config, tmp_path / "no" / "such.jpg", good)
    assert missing.returncode == 1
    assert f"{tmp_path / 'no' / 'such.jpg'}: not in the journal" in missing.stderr
    assert f"{good}: not failed (it is done)" in missing.stderr
    assert missing.stdout.strip() == "0 images queued again"
    folder = run_cli("retry", "--config", config, tmp_path / "album")  # a folder: its failed images
    assert folder.returncode == 0 and folder.stdout.strip() == "1 image queued again"


def test_status_reads_a_state_dir_it_cannot_write(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI runs as root)")
    from autocaption.config import load
    from autocaption.journal import Journal

    config = make_config()
    state = load(config).state.dir
    journal = Journal(state)
    journal.failed(tmp_path / "x.jpg", "x.jpg: not an image", transient=False, max_attempts=5, backoff=1)
    journal.close()
    subprocess.run(["mount", "--bind", "-o", "ro", str(state), str(state)], check=True)
    try:
        with pytest.raises(OSError):
            (state / "probe").write_text("x", encoding="utf-8")  # really read-only, even for root
        result = run_cli("status", "--config", config)
        assert result.returncode == 0, result.stderr
        assert "failed: 1" in result.stdout and "daemon: not running" in result.stdout
        report = json.loads(run_cli("status", "--json", "--config", config).stdout)
        assert report["failed"] == 1 and report["daemon"] == {"running": False, "pid": None}
        assert report["recent_errors"] == [{"path": str(tmp_path / "x.jpg"), "error": "x.jpg: not an image"}]
    finally:
        subprocess.run(["umount", str(state)], check=False)


def test_bmp_is_named_and_left_unchanged(run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "scan.bmp"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, format="BMP")
    before = photo.read_bytes()
    broken = tmp_path / "broken.bmp"
    broken.write_bytes(before[:40])
    result = run_cli("process", "--config", make_config(rules=WRITING_RULES), tmp_path)
    assert result.returncode == 1
    assert f"{broken}: corrupt or truncated BMP" in result.stderr, result.stderr
    written = json.loads((tmp_path / "scan.bmp.json").read_text(encoding="utf-8"))["written"]
    assert written["reason"].startswith("BMP files are never rewritten"), written
    assert photo.read_bytes() == before and (tmp_path / "scan.bmp.xmp").is_file()
    assert json.loads((tmp_path / "scan.bmp.json").read_text(encoding="utf-8"))["image"]["format"] == "BMP"
