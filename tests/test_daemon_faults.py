"""A daemon that says "running" is describing photos (issue 17.5, 6, 8): a thread that dies takes the daemon
down, a full state.dir is waited out, a damaged journal is named by every command and rebuilt from the
sidecars. The real journal, watcher and tiny model; a real tmpfs for the full disk; the real CLI."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from autocaption.config import ModelConfig, load
from autocaption.engine import Answer, Engine, Job, load_engine
from autocaption.errors import ExitCode
from autocaption.service import Service
from tests.conftest import RunCli
from tests.test_daemon import FAST_RULES, CountingEngine, photo, sidecar, wait_for
from tests.test_never_lose import small_disk


class BrokenEngine(CountingEngine):
    """The real engine, which then fails in a way nobody planned for."""

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        raise RuntimeError("an unexpected bug")


def watching(make_config: Callable[..., Path], inbox: Path) -> Path:
    return make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")


def test_a_thread_that_dies_takes_the_daemon_down(
    make_config: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(photo(1))
    config_path = watching(make_config, inbox)

    def factory(model: ModelConfig) -> Engine:
        return BrokenEngine(load_engine(model))

    service = Service(config_path, load(config_path), engine_factory=factory)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(service.run()), daemon=True)
    with caplog.at_level(logging.INFO, logger="autocaption"):
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the daemon kept running without its worker"
    assert outcome == [ExitCode.CRASHED]
    assert "the worker thread died: an unexpected bug" in caplog.text
    assert "exiting so that the service manager restarts autocaption" in caplog.text


def test_a_full_state_dir_is_waited_out_and_nothing_is_lost(
    make_config: Callable[..., Path], tmp_path: Path, run_cli: RunCli
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with small_disk(tmp_path / "state", 1024) as state:  # make_config puts state.dir here
        config_path = watching(make_config, inbox)
        counter: list[CountingEngine] = []

        def factory(model: ModelConfig) -> Engine:
            counter.append(CountingEngine(load_engine(model)))
            return counter[0]

        service = Service(config_path, load(config_path), engine_factory=factory)
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: service.watchers is not None and bool(service.watchers.observers), what="the start")
            filler = state / "filler"
            with filler.open("wb") as handle, pytest.raises(OSError):  # fill the disk to the last block
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            paths = [inbox / f"p{i}.jpg" for i in range(6)]
            for i, path in enumerate(paths):
                path.write_bytes(photo(i))
            wait_for(lambda: "waiting for space" in service._status(), what="the status to say why it waits")
            status = run_cli("status", "--config", config_path)
            assert "waiting: state.dir" in status.stdout and "is full" in status.stdout, status.stdout
            assert thread.is_alive() and service.crashed is None
            filler.unlink()
            wait_for(lambda: service.journal.stats().done == len(paths), timeout=90, what="every photo, once")
            assert all(sidecar(path).exists() for path in paths)
            assert "waiting" not in service._status()
            assert thread.is_alive() and service.crashed is None
        finally:
            service.stop.set()
            thread.join(timeout=30)


def test_a_damaged_journal_is_named_by_every_command_and_rebuilt_from_the_sidecars(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    from autocaption.journal import JOURNAL_NAME, Journal
    from autocaption.process import process
    from autocaption.review import Review
    from autocaption.web.app import create_app

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("DSCN0010.jpg", "DSCN0012.jpg"):
        (folder / name).write_bytes((corpus / "jpg/gps" / name).read_bytes())
    config_path = make_config(
        rules='- {name: caption, prompt: "Describe.", max_new_tokens: 8, write: [description]}',
        extra=f"watch: [{{path: {str(folder)!r}}}]",
    )
    config = load(config_path)
    assert not process(config, [folder]).failures
    answer = json.loads(sidecar(folder / "DSCN0010.jpg").read_text(encoding="utf-8"))["rules"]["caption"]["answer"]
    word = next(w for w in answer.split() if w.isalnum())
    web = Journal(config.state.dir)  # the review page, open while the file is damaged under it
    (config.state.dir / JOURNAL_NAME).write_bytes(b"")  # truncated to 0 bytes

    for command in (["status"], ["status", "--json"], ["search", word], ["retry"]):
        result = run_cli(*command, "--config", config_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr)
        said = result.stdout if "--json" in command else result.stderr
        assert "the journal is damaged" in said and "autocaption rebuild" in said, (command, said)
    assert json.loads(run_cli("status", "--json", "--config", config_path).stdout)["error"]
    client = create_app(config, Review(config, web), "t" * 20).test_client()
    page = client.get("/api/images", headers={"Authorization": "Bearer " + "t" * 20})
    assert page.status_code == 503 and "autocaption rebuild" in page.json["error"]
    web.close()
    doctor = run_cli("doctor", "--config", config_path)
    assert "✗" in doctor.stdout and "journal is damaged" in doctor.stdout, doctor.stdout

    rebuilt = run_cli("rebuild", "--config", config_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.startswith("journal rebuilt from the sidecars: 2 described, 0 queued; the old journal")
    assert any(p.name.startswith(JOURNAL_NAME + ".damaged-") for p in config.state.dir.iterdir())
    found = run_cli("search", "--config", config_path, word, "--json")
    assert found.returncode == 0 and str(folder / "DSCN0010.jpg") in found.stdout  # answers are back
    journal = Journal(config.state.dir)
    record = journal.get(folder / "DSCN0010.jpg")
    assert record is not None and record.status == "done" and record.sha256  # moves are recognised again
    assert journal.stats().done == 2
    journal.close()
