"""Folder fsyncs batched per folder per batch (issue 24.5): the real pipeline and tiny model on corpus copies,
with the folder fsync observed (and, for the failure case, made to fail) at the one function that does it."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from autocaption import atomic
from autocaption.config import load
from autocaption.discover import Candidate
from autocaption.engine import load_engine
from autocaption.pipeline import Described, Failed, Pipeline

RULES = '- {name: caption, prompt: "Describe.", max_new_tokens: 4, write: [description]}'


def photos_in(corpus: Path, tmp_path: Path, counts: dict[str, int]) -> list[Candidate]:
    source = (corpus / "jpg/gps/DSCN0012.jpg").read_bytes()
    candidates = []
    for folder_name, count in counts.items():
        folder = tmp_path / "photos" / folder_name
        folder.mkdir(parents=True)
        for index in range(count):
            path = folder / f"p{index}.jpg"
            path.write_bytes(source)
            candidates.append(Candidate(path, f"{folder_name}/{path.name}", tmp_path / "photos"))
    return candidates


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """Each folder fsync as (folder, how many JSON sidecars the folder held at that moment)."""
    calls: list[tuple[Path, int]] = []
    real = atomic.fsync_dir

    def observe(folder: Path) -> None:
        calls.append((folder, len(list(folder.glob("*.jpg.json")))))
        real(folder)

    monkeypatch.setattr(atomic, "fsync_dir", observe)
    return calls


def test_a_batch_syncs_each_folder_once_after_its_last_write(
    make_config: Callable[..., Path], corpus: Path, tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    config = load(make_config(rules=RULES, extra="output: {xmp_sidecar: always}"))
    candidates = photos_in(corpus, tmp_path, {"a": 4, "b": 2})
    outcomes = Pipeline(config, load_engine(config.model)).run(candidates)
    assert all(isinstance(outcome, Described) for outcome in outcomes), outcomes
    for candidate in candidates:  # photo, XMP sidecar and JSON sidecar: three atomic writes each
        assert candidate.path.with_name(candidate.path.name + ".json").is_file()
        assert candidate.path.with_name(candidate.path.name + ".xmp").is_file()
    # one fsync per folder, each after every photo of that folder was written: 2 instead of 18
    assert synced == [(tmp_path / "photos/a", 4), (tmp_path / "photos/b", 2)]


def test_outside_a_batch_and_on_other_threads_every_write_syncs_at_once(
    tmp_path: Path, synced: list[tuple[Path, int]]
) -> None:
    atomic.write_atomic(tmp_path / "one.jpg.json", b"{}")
    assert synced == [(tmp_path, 1)]
    with atomic.batched_folder_syncs() as syncs:
        atomic.write_atomic(tmp_path / "two.jpg.json", b"{}")
        other = threading.Thread(target=atomic.write_atomic, args=(tmp_path / "three.jpg.json", b"{}"))
        other.start()
        other.join()
        assert synced == [(tmp_path, 1), (tmp_path, 3)]  # the other thread's write, not this one's
        assert list(syncs.waiting) == [tmp_path]
    assert synced == [(tmp_path, 1), (tmp_path, 3), (tmp_path, 3)] and not syncs.failed


def test_a_folder_that_cannot_be_synced_fails_its_photos_for_a_retry(
    make_config: Callable[..., Path], corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(make_config(rules=RULES))
    candidates = photos_in(corpus, tmp_path, {"good": 1, "bad": 2})
    real = atomic.fsync_dir

    def fail_in_bad(folder: Path) -> None:
        if folder.name == "bad":
            raise OSError(errno.EIO, "Input/output error")
        real(folder)

    monkeypatch.setattr(atomic, "fsync_dir", fail_in_bad)
    good, *bad = Pipeline(config, load_engine(config.model)).run(candidates)
    assert isinstance(good, Described)
    for outcome, candidate in zip(bad, candidates[1:], strict=True):
        assert isinstance(outcome, Failed) and outcome.transient, outcome  # retried, never recorded as done
        assert outcome.message == (
            f"{candidate.path}: written, but its folder could not be synced to disk (Input/output error); will retry"
        )
        assert outcome.stat is not None and outcome.stat.st_size == candidate.path.stat().st_size
