"""A misbehaving OpenAI-compatible server (tests/stubserver.py, on loopback) never stops, blocks or misleads
autocaption (issue 25.1–3, 5–8, 17, 21): each bad answer fails the photo it was for with one line, nothing
the model did not say is written, the answers received are kept, and the daemon goes on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from autocaption.config import load
from autocaption.process import process
from autocaption.service import Service
from tests.conftest import RunCli
from tests.stubserver import ANSWER, MODEL, StubServer, stub_server
from tests.test_daemon import photo, sidecar, wait_for


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with stub_server() as server:
        yield server


@contextmanager
def serving(config_path: Path) -> Iterator[tuple[Service, threading.Thread]]:
    """The real daemon in a thread, started (its watchers armed), stopped and joined at the end."""
    service = Service(config_path, load(config_path))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: service.watchers is not None and bool(service.watchers.observers), what="the start")
        yield service, thread
    finally:
        service.stop.set()
        thread.join(timeout=30)


def remote_config(make_config: Callable[..., Path], server: StubServer, extra: str = "", **model: object) -> Path:
    options = {"retries": 0, "timeout_seconds": 3, **model}
    line = f"{{engine: openai, base_url: {server.base_url!r}, id: {MODEL}, max_image_side: 64" + "".join(
        f", {key}: {value}" for key, value in options.items()
    ) + "}"  # fmt: skip
    rules = '- {name: caption, prompt: "Describe.", max_new_tokens: 20, write: [description]}'
    return make_config(rules=rules, extra=extra, model_line=line)


def photos(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = [folder / f"p{i}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_bytes(photo(i))
    return paths


BAD = {  # mode -> what the one line says
    "short-body": "kept failing after 1 attempt(s): the answer was not JSON",
    "garbage-status": "kept failing after 1 attempt(s)",
    "not-utf8": "not JSON",
    "error-200": "the engine is overloaded",
    "refused": "refused: I cannot help with that",
    "empty": "an empty answer",
    "whitespace": "an empty answer",
    "huge": "an answer of 1000000 characters for at most 20 tokens",
    "429": "is unavailable after 1 attempt(s): HTTP 429",
    "503-odd": "is unavailable after 1 attempt(s): HTTP 503",
    "deep-json": "the answer was not JSON",
}


@pytest.mark.parametrize("mode", list(BAD))
def test_a_bad_answer_fails_the_photo_and_writes_nothing(
    mode: str, stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    paths = photos(tmp_path / "photos", 2)
    before = {path: path.read_bytes() for path in paths}
    stub.mode = mode
    config = load(remote_config(make_config, stub))
    try:
        summary = process(config, paths)
    except Exception as exc:  # noqa: BLE001 - the point: nothing may escape
        pytest.fail(f"{mode}: {type(exc).__name__}: {exc}")
    said = " | ".join(summary.failures)
    if mode in ("429", "503-odd"):  # the server says it serves nobody now: it is down, the run stops with one line
        assert summary.stopped and BAD[mode] in summary.stopped, (mode, summary)
    else:  # it answers (its model list too) but not these photos: each fails alone
        assert len(summary.failures) == 2 and BAD[mode] in said and not summary.stopped, (mode, said)
    for path in paths:
        assert path.read_bytes() == before[path] and not sidecar(path).exists(), mode


@pytest.mark.parametrize(("mode", "tokens"), [("parts", 5), ("usage-odd", 0), ("usage-list", 0), ("ok", 5)])
def test_odd_but_usable_answers_are_read_as_the_model_said_them(
    mode: str, tokens: int, stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    paths = photos(tmp_path / "photos", 1)
    stub.mode = mode
    summary = process(load(remote_config(make_config, stub)), paths)
    assert not summary.failures, summary.failures
    document = json.loads(sidecar(paths[0]).read_text(encoding="utf-8"))
    answer = document["rules"]["caption"]["answer"]
    assert answer == ("A red fox in snow" if mode == "parts" else ANSWER), answer  # never a Python repr
    assert document["rules"]["caption"]["tokens"]["answer"] == tokens


@pytest.mark.parametrize("mode", ["models-list", "models-404"])
def test_a_model_list_of_another_shape_or_none_does_not_stop_the_run(
    mode: str, stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    stub.mode = mode
    config = load(remote_config(make_config, stub))
    stub.mode = mode
    summary = process(config, photos(tmp_path / "photos", 1))
    assert summary.images == 1 and not summary.failures


def test_a_trickling_server_is_cut_off_at_timeout_seconds(
    stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """timeout_seconds was per socket read: one byte every 0.5 s kept a request open for minutes."""
    stub.mode = "trickle"
    config = load(remote_config(make_config, stub, timeout_seconds=2))
    started = time.monotonic()
    summary = process(config, photos(tmp_path / "photos", 2))
    assert time.monotonic() - started < 15
    assert summary.stopped and "timeout_seconds" in summary.stopped


def test_a_photo_the_server_cannot_take_fails_alone_and_the_others_are_written(
    stub: StubServer, make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path
) -> None:
    """One panorama made the server answer 500: every 5xx was "server unreachable" for the whole batch and the
    good answers were thrown away each round."""
    folder = tmp_path / "photos"
    paths = photos(folder, 3)
    Image.new("RGB", (2000, 40), (9, 9, 9)).save(folder / "panorama.jpg")
    stub.mode = "fail-wide"
    result = run_cli("process", "--config", remote_config(make_config, stub, batch_size=8), folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("3 images described, 3 answers, 0 skipped, 1 failed"), result.stdout
    failures = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(failures) == 1 and "panorama.jpg" in failures[0] and "answered other photos" in failures[0]
    assert all(sidecar(path).exists() for path in paths) and not sidecar(folder / "panorama.jpg").exists()
    assert stub.requests == 4  # the good answers were kept, not asked again


def test_the_daemon_keeps_working_through_every_fault_and_ends_a_hopeless_photo_failed(
    stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config_path = remote_config(
        make_config, stub, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]\n"
        "daemon: {max_attempts: 5, retry_seconds: 1}", batch_size=4,
    )  # fmt: skip
    with serving(config_path) as (service, thread):
        for mode in ("short-body", "garbage-status", "not-utf8", "usage-list", "error-200"):
            stub.mode = mode
            (inbox / f"{mode}.jpg").write_bytes(photo(len(mode)))
            time.sleep(1.5)
            assert thread.is_alive() and service.crashed is None, mode
        stub.mode = "fail-wide"
        Image.new("RGB", (2000, 40), (9, 9, 9)).save(inbox / "panorama.jpg")
        wait_for(lambda: service.journal.stats().done == 5, timeout=90, what="the five photos")
        wait_for(lambda: service.journal.stats().failed == 1, timeout=60, what="the panorama to fail for good")
        record = service.journal.get(inbox / "panorama.jpg")
        assert record is not None and "answered other photos" in (record.last_error or "")
        assert thread.is_alive() and service.crashed is None


def test_sigterm_while_the_server_hangs_exits_within_seconds_and_sends_nothing_more(
    stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Issue 25.4: "stopped" after 60 s, exit after 615 s, requests still sent after the stop."""
    import signal

    from tests.test_daemon import start_cli

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = remote_config(make_config, stub, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]",
                           timeout_seconds=120, retries=4, max_in_flight=2)  # fmt: skip
    stub.mode = "hang"
    log = tmp_path / "daemon.log"
    daemon = start_cli(config, log)
    try:
        wait_for(lambda: "ready:" in log.read_text(encoding="utf-8"), what="ready")
        photos(inbox, 6)
        wait_for(lambda: stub.requests >= 2, what="requests in flight")
        daemon.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert daemon.wait(timeout=20) == 0
        assert time.monotonic() - stopped < 10, "the daemon waited for the hanging server"
        sent = stub.requests
        time.sleep(1)
        assert stub.requests == sent == 2  # nothing sent after the stop (max_in_flight: 2)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "stopped" in log.read_text(encoding="utf-8")


# --- wrong results after a change (issue 25.11–13, 15, 20, 21) -----------------------------------------------


def test_a_model_change_with_redo_stale_describes_again_and_an_output_change_only_writes_again(
    stub: StubServer, make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path
) -> None:
    from autocaption.writers.metadata import _facts_of
    from tests.stubserver import OTHER_MODEL

    folder = tmp_path / "photos"
    paths = photos(folder, 3)
    watch = f"watch: [{{path: {str(folder)!r}, settle_seconds: 0.3}}]\n"
    first = remote_config(make_config, stub, extra=watch)
    assert not process(load(first), [folder]).failures
    asked = stub.requests
    # 13: a rule now also writes keywords: `process --stale` writes the recorded answers again, no request
    text = first.read_text(encoding="utf-8").replace("write: [description]", "write: [description, keywords]")
    first.write_text(text, encoding="utf-8")
    stale = run_cli("process", "--stale", "--config", first)
    assert stale.returncode == 0, stale.stderr
    assert "3 written again from recorded answers" in stale.stdout and stub.requests == asked, stale.stdout
    assert all(_facts_of(path.read_bytes()).keywords for path in paths)  # the keywords are in the photos now
    # 11: another model, redo_stale, a restart: every photo is described again by it (it was "queued", 0 sent)
    second = first.read_text(encoding="utf-8").replace(f"id: {MODEL}", f"id: {OTHER_MODEL}")
    first.write_text(second + "daemon: {redo_stale: true}\n", encoding="utf-8")
    service = Service(first, load(first))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: stub.requests == asked + 3, timeout=60, what="three requests to the new model")
        wait_for(lambda: service.journal.stats().queued == 0, what="the queue to drain")
        for path in paths:
            document = json.loads(sidecar(path).read_text(encoding="utf-8"))
            assert document["rules"]["caption"]["model"] == OTHER_MODEL
    finally:
        service.stop.set()
        thread.join(timeout=30)
    again = run_cli("process", "--stale", "--config", first)
    assert again.stdout.startswith("0 images described"), again.stdout  # nothing stale any more


def test_a_reload_that_drops_a_folder_or_changes_rules_acts_at_once(
    stub: StubServer, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """25.12: redo_stale did nothing on a reload that made photos stale; 25.15: the queued photos of a folder
    removed by a reload were still described; 25.21: `done` kept counting deleted photos."""
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    photos(kept, 2)
    config_path = remote_config(
        make_config, stub, extra=f"watch: [{{path: {str(kept)!r}, settle_seconds: 0.3}}]\n"
        "daemon: {redo_stale: true}",
    )  # fmt: skip
    with serving(config_path) as (service, _):
        wait_for(lambda: service.journal.stats().done == 2, what="two photos")
        asked = stub.requests
        text = config_path.read_text(encoding="utf-8").replace('prompt: "Describe."', 'prompt: "Describe it."')
        config_path.write_text(text, encoding="utf-8")
        service.reload_requested.set()
        wait_for(lambda: stub.requests == asked + 2, timeout=30, what="the stale photos described again")
        (kept / "p0.jpg").unlink()
        (kept / "p0.jpg.json").unlink()
        service.reconcile_requested.set()
        wait_for(lambda: service.journal.stats().done == 1, what="the deleted photo no longer counted")
        # a folder added, its photos queued while the server is away, then the folder dropped by a reload
        paths = photos(dropped, 3)
        service.journal.enqueue(paths)
        stub.mode = "hang"
        text = config_path.read_text(encoding="utf-8")
        config_path.write_text(text.replace("watch: [", f"watch: [{{path: {str(dropped)!r}}}, "), encoding="utf-8")
        service.reload_requested.set()
        time.sleep(1)
        config_path.write_text(text, encoding="utf-8")
        asked = stub.requests
        stub.mode = "ok"
        service.reload_requested.set()
        wait_for(lambda: service.journal.pending() == 0, timeout=60, what="the queue to empty")
        assert not any(sidecar(path).exists() for path in paths)
        assert all(service.journal.get(path) is None for path in paths)


def test_a_url_with_a_password_is_refused(make_config: Callable[..., Path], run_cli: RunCli) -> None:
    line = "{engine: openai, base_url: 'http://me:s3cret@gpu-box:8000/v1', id: m}"
    result = run_cli("check", "--config", make_config(model_line=line))
    assert result.returncode == 2 and "never put a user or password in the URL" in result.stderr
    assert "s3cret" not in result.stderr


def test_a_narrowed_match_then_stale_keeps_the_photo_writable_and_whole(
    stub: StubServer, make_config: Callable[..., Path], run_cli: RunCli, corpus: Path, tmp_path: Path
) -> None:
    """25.14: "IFD0 tag 0x9c9c points outside the EXIF block" and a competing .xmp after a rule's match was
    narrowed (the IFD0 rewrite cut the tail that a kept value still pointed into)."""
    from tests import exiftool

    folder = tmp_path / "photos"
    folder.mkdir()
    path = folder / "DSCN0010.jpg"
    path.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    warnings = exiftool.warnings(path)
    line = f"{{engine: openai, base_url: {stub.base_url!r}, id: {MODEL}, max_image_side: 64, retries: 0}}"
    rules = """
    - {name: caption, prompt: "Describe.", max_new_tokens: 20, write: [description]}
    - {name: tags, prompt: "Keywords.", max_new_tokens: 20, write: [keywords]}
    """
    config = make_config(rules=rules, model_line=line, extra=f"watch: [{{path: {str(folder)!r}}}]")
    assert run_cli("process", "--config", config, folder).returncode == 0
    text = config.read_text(encoding="utf-8")
    narrowed = text.replace('prompt: "Keywords.",', 'prompt: "Keywords.", match: [x.png],')
    config.write_text(narrowed.replace('"Describe."', '"Describe it."'), encoding="utf-8")
    stale = run_cli("process", "--stale", "--config", config)
    assert stale.returncode == 0 and "outside the EXIF block" not in stale.stderr, stale.stderr
    assert stale.stdout.startswith("1 image described"), stale.stdout
    assert not (folder / "DSCN0010.jpg.xmp").exists()
    tags = exiftool.tags(path)[path]
    assert tags["IFD0:ImageDescription"] == ANSWER and tags["XMP-dc:Description"] == ANSWER
    # the rule that no longer applies takes its keywords back (they were autocaption's, nobody else's)
    assert "XMP-dc:Subject" not in tags and "IFD0:XPKeywords" not in tags, tags
    assert exiftool.warnings(path) <= warnings


def test_status_says_the_daemon_waits_for_the_server_during_an_outage(
    make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path
) -> None:
    """25.21: `status` said nothing while every photo waited for a server that was down."""
    from tests.test_remote import free_port

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    line = f"{{engine: openai, base_url: 'http://127.0.0.1:{free_port()}/v1', id: m, retries: 0, timeout_seconds: 2}}"
    config_path = make_config(model_line=line, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    with serving(config_path) as (service, _):
        photos(inbox, 2)
        wait_for(lambda: "waiting for the server" in service._status(), what="the outage")
        wait_for(lambda: "waiting for the server" in run_cli("status", "--config", config_path).stdout,
                 what="status to say so")  # fmt: skip
        report = json.loads(run_cli("status", "--json", "--config", config_path).stdout)
        assert "unreachable" in report["waiting"] and report["queued"] == 2
    assert "waiting" not in run_cli("status", "--config", config_path).stdout  # not once it has stopped
