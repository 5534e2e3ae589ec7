"""The daemon: a real watchdog observer on temp folders, the tiny local model, the real journal.

In-process tests run `Service` in a thread with the real engine wrapped to count calls (every call
still goes to the model); the process-level tests run the real `autocaption run` CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from PIL import Image

from autocaption.config import ModelConfig, load
from autocaption.engine import Answer, Engine, Job, load_engine
from autocaption.journal import DONE, FAILED, MIGRATIONS, QUEUED, RETRY, Journal
from autocaption.service import Service
from tests.conftest import RunCli, cli_env
from tests.test_metadata import segment_counts

FAST_RULES = '- {name: caption, prompt: "Describe.", max_new_tokens: 4, write: [description]}'


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class CountingEngine:
    """The real engine, with a count of the images it was asked about (per file size as a key)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.timings = engine.timings
        self.images = 0
        self.lock = threading.Lock()

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        with self.lock:
            self.images += len(jobs)
        return self.engine.describe(jobs, cancel)

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def daemon(make_config: Callable[..., Path], inbox: Path) -> Iterator[Callable[..., tuple[Service, CountingEngine]]]:
    started: list[tuple[Service, threading.Thread]] = []

    def start(
        rules: str = FAST_RULES, extra: str = "", empty_wait: float | None = None
    ) -> tuple[Service, CountingEngine]:
        config_path = make_config(rules=rules, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.5}}]\n{extra}")
        counter: list[CountingEngine] = []

        def factory(model: ModelConfig) -> Engine:
            counter.append(CountingEngine(load_engine(model)))
            return counter[0]

        service = Service(config_path, load(config_path), engine_factory=factory)
        if empty_wait is not None:
            service.settler.empty_wait = empty_wait  # how long an empty file may stay empty (default a minute)
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        wait_for(lambda: bool(counter) and service.watchers is not None and bool(service.watchers.observers),
                 what="the daemon to start")  # fmt: skip
        started.append((service, thread))
        return service, counter[0]

    yield start
    for service, thread in started:
        service.stop.set()
        thread.join(timeout=30)


def photo(index: int, size: tuple[int, int] = (48, 36)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (index * 37 % 256, index * 91 % 256, index * 13 % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def test_chunked_copy_is_described_once_after_its_last_byte(daemon, inbox: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    _, engine = daemon()
    data = (corpus / "jpg/gps/DSCN0010.jpg").read_bytes()
    target = inbox / "slow.jpg"
    with target.open("wb") as handle:
        for i in range(6):  # 6 chunks over 3 s
            handle.write(data[i * len(data) // 6 : (i + 1) * len(data) // 6])
            handle.flush()
            assert not sidecar(target).exists()
            time.sleep(0.5)
    finished = time.monotonic()
    wait_for(lambda: sidecar(target).exists(), what="the sidecar")
    assert engine.images == 1 and time.monotonic() - finished < 15
    time.sleep(1.5)
    assert engine.images == 1


def test_renames_from_temp_names_and_downloads(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    _, engine = daemon()
    rsync_temp = inbox / ".final.jpg.Xa12bC"  # rsync's temp name, then an atomic rename
    rsync_temp.write_bytes(photo(1))
    rsync_temp.rename(inbox / "final.jpg")
    download = inbox / "picture.jpg.crdownload"  # Chrome; Firefox uses .part
    download.write_bytes(photo(2))
    time.sleep(0.7)
    download.rename(inbox / "picture.jpg")
    wait_for(lambda: sidecar(inbox / "final.jpg").exists() and sidecar(inbox / "picture.jpg").exists())
    assert engine.images == 2
    assert not sidecar(download).exists() and not sidecar(rsync_temp).exists()


def test_file_in_a_new_sub_subfolder(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    _, engine = daemon()
    deep = inbox / "2024" / "05" / "trip"
    deep.mkdir(parents=True)
    (deep / "a.jpg").write_bytes(photo(3))
    moved_in = inbox.parent / "outside" / "event"
    moved_in.mkdir(parents=True)
    (moved_in / "b.jpg").write_bytes(photo(4))
    shutil.move(str(moved_in), str(inbox / "event"))  # a folder moved in from outside the tree
    wait_for(lambda: sidecar(deep / "a.jpg").exists() and sidecar(inbox / "event" / "b.jpg").exists())
    assert engine.images == 2


ODD_NAMES = [
    os.fsdecode(b"bad\xffname.jpg"),  # not UTF-8: it once killed the settler thread
    "x" * 247 + ".jpg",  # 251 bytes: its JSON sidecar's name is too long for the filesystem
    "two\nlines.jpg",
    "100% done.jpg",
]


def test_burst_of_500_files_with_odd_names_each_described_exactly_once(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 17.4, 7, 11: names that are not UTF-8, too long for a sidecar, with a newline or a `%`, in a drop
    of 500; our own writes into the photos never queue them again (done only grows), and the photo whose
    sidecar cannot be written is captioned, failed once, and never described again."""
    service, engine = daemon()
    paths = [inbox / f"burst_{i:03d}.jpg" for i in range(500 - len(ODD_NAMES))]
    paths += [inbox / name for name in ODD_NAMES]
    too_long = inbox / ODD_NAMES[1]
    done_seen: list[int] = []
    for i, path in enumerate(paths):
        path.write_bytes(photo(i, (40, 30)))
        if i % 50 == 0:
            done_seen.append(service.journal.stats().done)

    def finished() -> bool:
        stats = service.journal.stats()
        done_seen.append(stats.done)
        return stats.done == len(paths) - 1 and stats.failed == 1

    wait_for(finished, timeout=240, what="499 described, 1 failed")
    time.sleep(3)  # long enough for the watcher to have seen every write of ours
    stats = service.journal.stats()
    assert (stats.queued, stats.retrying, stats.done, stats.failed) == (0, 0, len(paths) - 1, 1)
    assert done_seen == sorted(done_seen), "described photos went back to the queue"
    assert engine.images == len(paths)  # once each, the one whose sidecar failed included
    assert all(sidecar(p).exists() for p in paths if p != too_long)
    assert "File name too long" in stats.recent_errors[0][1]
    from autocaption.writers.metadata import _facts_of

    assert _facts_of(too_long.read_bytes()).descriptions[0]  # its caption went into the photo all the same
    record = service.journal.get(inbox / ODD_NAMES[0])
    assert record is not None and record.status == DONE
    document = json.loads(sidecar(inbox / ODD_NAMES[0]).read_text(encoding="utf-8"))
    assert document["image"]["file"] == "bad\\xffname.jpg"


def test_own_writes_cause_no_work_and_moves_are_not_redescribed(daemon, inbox: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    _, engine = daemon()
    for name in ("DSCN0012.jpg", "DSCN0021.jpg"):
        target = inbox / name
        target.write_bytes((corpus / "jpg/gps" / name).read_bytes())  # writable: rewritten in place
    wait_for(lambda: all(sidecar(inbox / n).exists() for n in ("DSCN0012.jpg", "DSCN0021.jpg")))
    time.sleep(2.5)  # the rewrites (temp file renamed over the photo) have settled by now
    assert engine.images == 2
    (inbox / "sorted").mkdir()
    (inbox / "DSCN0012.jpg").rename(inbox / "sorted" / "DSCN0012.jpg")
    wait_for(lambda: sidecar(inbox / "sorted" / "DSCN0012.jpg").exists(), what="the sidecar to follow")
    time.sleep(1.5)
    assert engine.images == 2
    assert not sidecar(inbox / "DSCN0012.jpg").exists()


def test_image_present_before_start_is_described(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    (inbox / "old.jpg").write_bytes(photo(5))
    _, engine = daemon()
    wait_for(lambda: sidecar(inbox / "old.jpg").exists())
    assert engine.images == 1


def test_failures_are_recorded_once_and_retry_requeues(daemon, inbox: Path, run_cli, make_config) -> None:  # type: ignore[no-untyped-def]
    service, engine = daemon()
    (inbox / "notes.jpg").write_text("not a photo", encoding="utf-8")
    wait_for(lambda: service.journal.stats().failed == 1, what="the failure")
    stats = service.journal.stats()
    assert "not an image" in stats.recent_errors[0][1]
    assert service.journal.retry() == 1
    wait_for(lambda: service.journal.stats().failed == 1 and service.journal.stats().queued == 0)
    assert engine.images == 0


def test_journal_migrations_queue_and_backoff(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    assert journal.applied_migrations() == [name for name, _ in MIGRATIONS]
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"x")
    assert journal.enqueue([a, b]) == 2 and journal.enqueue([a]) == 0
    assert journal.due(10) == [a, b]
    journal.done(a, a.stat(), "abc", "fp", answers=2)
    assert journal.get(a).status == DONE  # type: ignore[union-attr]
    assert journal.failed(b, "busy", transient=True, max_attempts=2, backoff=60) == RETRY
    assert journal.due(10) == []  # not before its backoff
    assert journal.due(10, now=time.time() + 61) == [b]
    assert journal.failed(b, "busy", transient=True, max_attempts=2, backoff=60) == FAILED
    assert journal.retry() == 1 and journal.get(b).status == QUEUED  # type: ignore[union-attr]
    journal.close()
    reopened = Journal(tmp_path / "state")  # migrations are not applied twice
    assert reopened.applied_migrations() == [name for name, _ in MIGRATIONS]
    assert reopened.get(a).sha256 == "abc"  # type: ignore[union-attr]


# --- the real CLI daemon ---------------------------------------------------------------------------


def start_cli(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "autocaption", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env=env or cli_env(),
    )


@contextlib.contextmanager
def running(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real daemon, ready; stopped with SIGTERM afterwards, which it must answer with exit 0."""
    proc = start_cli(config, log)
    try:
        wait_for(lambda: "ready:" in log.read_text(encoding="utf-8"), what="ready")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def described_in(log: Path) -> Counter[str]:
    return Counter(
        line.split(": ")[1] for line in log.read_text(encoding="utf-8").splitlines() if line.endswith(" s)")
        and ": described (" in line
    )  # fmt: skip


def test_kill_9_in_a_burst_then_restart_loses_nothing_and_repeats_nothing(
    make_config: Callable[..., Path], inbox: Path, tmp_path: Path
) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proc = start_cli(config, first)
    wait_for(lambda: "ready:" in first.read_text(encoding="utf-8"), what="ready")
    paths = [inbox / f"k_{i:03d}.jpg" for i in range(120)]
    for i, path in enumerate(paths):
        path.write_bytes(photo(i))
    wait_for(lambda: sum(described_in(first).values()) >= 20, what="some progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = described_in(first)
    assert 0 < len(done_before) < len(paths)
    proc = start_cli(config, second)
    try:
        wait_for(lambda: all(sidecar(p).exists() for p in paths), timeout=180, what="every sidecar")
        journal = Journal(load(config).state.dir)
        wait_for(lambda: journal.pending() == 0 and journal.stats().done == len(paths), what="an empty queue")
        journal.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    done_after = described_in(second)
    assert not set(done_before) & set(done_after)  # nothing finished before the kill was done again
    assert max((done_before + done_after).values()) == 1
    # Images whose sidecar was written just before the kill, but not yet journaled, are recognised
    # as done by their sidecar after the restart: at most one batch of them, never described again.
    assert len(paths) - len(done_before + done_after) <= load(config).model.batch_size


def test_sighup_with_a_broken_config_keeps_the_old_rules(
    make_config: Callable[..., Path], inbox: Path, tmp_path: Path
) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    log = tmp_path / "daemon.log"
    proc = start_cli(config, log)
    try:
        wait_for(lambda: "ready:" in log.read_text(encoding="utf-8"), what="ready")
        good = config.read_text(encoding="utf-8")
        config.write_text(good.replace("rules:", "rules:\n  - {name: broken}\n"), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in log.read_text(encoding="utf-8"), what="the rejection")
        assert "rules[0].prompt: required" in log.read_text(encoding="utf-8")
        (inbox / "one.jpg").write_bytes(photo(1))
        wait_for(lambda: sidecar(inbox / "one.jpg").exists())
        assert '"caption"' in sidecar(inbox / "one.jpg").read_text(encoding="utf-8")
        config.write_text(good.replace("name: caption", "name: summary"), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(encoding="utf-8"), what="the reload")
        (inbox / "two.jpg").write_bytes(photo(2))
        wait_for(lambda: sidecar(inbox / "two.jpg").exists())
        assert '"summary"' in sidecar(inbox / "two.jpg").read_text(encoding="utf-8")
        assert log.read_text(encoding="utf-8").count("loaded on cpu") == 1  # the model was not reloaded
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sd_notify_messages_on_a_real_socket(make_config: Callable[..., Path], inbox: Path, tmp_path: Path) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.5)
    messages: list[str] = []

    def receive_until(predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    env = {**cli_env(), "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    proc = start_cli(config, tmp_path / "daemon.log", env)
    try:
        receive_until(lambda: any("READY=1" in m for m in messages))
        (inbox / "n.jpg").write_bytes(photo(7))
        receive_until(lambda: any("1 done" in m for m in messages) and sum("WATCHDOG=1" in m for m in messages) >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        receive_until(lambda: any("STOPPING=1" in m for m in messages), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready and "queued" in ready
    assert any(m.startswith("STATUS=") and "1 done" in m for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 2
    assert "STOPPING=1" in messages[-1]


# --- systemd ---------------------------------------------------------------------------------------


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is required (Debian: systemd); tests/run.sh installs it")
    return exe


def check_unit(unit: Path) -> float:
    verify = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    line = next(l for l in security.stdout.splitlines() if "Overall exposure level" in l)  # noqa: E741
    return float(line.split(":")[1].split()[0])


def test_shipped_units_verify_and_are_hardened(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "systemd"
    units = sorted(root.glob("*.service"))
    assert units
    exe = shutil.which("autocaption") or sys.executable  # verify needs an executable ExecStart
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text(encoding="utf-8").replace("/usr/local/bin/autocaption", exe), encoding="utf-8")
        assert check_unit(copy) <= 3.0, unit


def test_service_install_renders_a_unit_for_the_users_folders(
    run_cli,
    make_config: Callable[..., Path],
    inbox: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    spaced = tmp_path / "My Photos"
    spaced.mkdir()
    config = make_config(extra=f"watch: [{{path: {str(inbox)!r}}}, {{path: {str(spaced)!r}}}]")
    result = run_cli("service", "install", "--config", config, "--unit-dir", tmp_path / "units")
    assert result.returncode == 0, result.stderr
    assert "sudo systemctl enable --now autocaption" in result.stdout
    unit = tmp_path / "units" / "autocaption.service"
    text = unit.read_text(encoding="utf-8")
    assert f'ReadWritePaths={inbox.resolve()} "{spaced.resolve()}"' in text or str(inbox.resolve()) in text
    assert f"--config {config}" in text and "Type=notify" in text and "WatchdogSec=" in text
    assert check_unit(unit) <= 3.0
    cache = tmp_path / "my cache" / "huggingface"  # where this user's models are (HF_HOME), a space in it
    user = run_cli("service", "install", "--user", "--config", config, "--unit-dir", tmp_path / "user",
                   env={"HF_HOME": str(cache)})  # fmt: skip
    assert user.returncode == 0 and "loginctl enable-linger" in user.stdout
    text = (tmp_path / "user" / "autocaption.service").read_text(encoding="utf-8")
    assert "User=" not in text
    # The user's own cache: a model they downloaded is not fetched again into the state dir (issue 22).
    assert f'Environment="HF_HOME={cache}"' in text and f' -"{cache}"' in text, text
    assert "HF_HOME=%S/autocaption/huggingface" in unit.read_text(encoding="utf-8")  # a system service: its own
    assert check_unit(tmp_path / "user" / "autocaption.service") <= 3.5


def test_service_install_refuses_paths_that_mean_another_folder_for_the_service_user(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config(extra="watch: [{path: ~/Pictures}]")
    home = {"HOME": str(tmp_path)}
    result = run_cli("service", "install", "--config", config, "--unit-dir", tmp_path / "units", env=home)
    assert result.returncode == 2 and not (tmp_path / "units" / "autocaption.service").exists()
    line = result.stderr.strip()
    assert line == (
        f"autocaption: error: {config}:3: watch[0].path: '~/Pictures' is {tmp_path / 'Pictures'} for you, but the "
        "service runs as 'autocaption' with another home and environment; write the absolute path in the config "
        "for a system service (or install a --user unit)"
    ), line
    user = run_cli("service", "install", "--user", "--config", config, "--unit-dir", tmp_path / "user", env=home)
    assert user.returncode == 0 and f"ReadWritePaths={tmp_path / 'Pictures'}" in (
        tmp_path / "user" / "autocaption.service"
    ).read_text(encoding="utf-8")


def test_status_and_retry_commands(run_cli, make_config: Callable[..., Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config()
    journal = Journal(load(config).state.dir)
    bad = tmp_path / "bad.jpg"
    journal.failed(bad, f"{bad}: not an image", transient=False, max_attempts=5, backoff=1)
    journal.close()
    status = run_cli("status", "--config", config)
    assert status.returncode == 0 and "failed: 1" in status.stdout and "not an image" in status.stdout
    retry = run_cli("retry", "--config", config)
    assert retry.stdout.strip() == "1 image queued again"
    assert "queued: 1" in run_cli("status", "--config", config).stdout


def test_network_mounts_are_recognised() -> None:
    from autocaption.watch import is_network_mount

    assert is_network_mount(Path("/")) is False
    assert os.path.exists("/proc/self/mountinfo")


def test_reconcile_removes_temp_files_left_by_a_killed_write(make_config: Callable[..., Path], inbox: Path) -> None:
    from autocaption.service import reconcile

    config = load(make_config(extra=f"watch: [{{path: {str(inbox)!r}}}]"))
    stale, fresh = inbox / ".autocaption-tmp-old.part", inbox / ".autocaption-tmp-new.part"
    stale.write_bytes(b"half a photo")
    fresh.write_bytes(b"being written right now")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    journal = Journal(config.state.dir)
    assert reconcile(config, journal) == 0  # temp files are never queued
    journal.close()
    assert not stale.exists() and fresh.exists()


# --- issue 13: never skip, never lose --------------------------------------------------------------


def test_deleted_with_its_sidecars_then_added_again_is_described_again(daemon, inbox: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    """Same bytes at a new path after the old one and its results were deleted: no move (nothing to carry)."""
    _, engine = daemon()
    first = inbox / "IMG_1.tiff"  # never rewritten: its bytes stay the ones the journal knows
    first.write_bytes((corpus / "tiff/Arbitro.tiff").read_bytes())
    xmp = inbox / "IMG_1.tiff.xmp"
    wait_for(lambda: sidecar(first).exists() and xmp.exists(), what="the first description")
    for path in (first, sidecar(first), xmp):
        path.unlink()
    (inbox / "2024-05-01").mkdir()
    again = inbox / "2024-05-01" / "IMG_1.tiff"
    again.write_bytes((corpus / "tiff/Arbitro.tiff").read_bytes())
    wait_for(lambda: sidecar(again).exists() and again.with_name("IMG_1.tiff.xmp").exists(), what="described again")
    assert engine.images == 2
    # A real move still carries both sidecars and costs no model call.
    (inbox / "sorted").mkdir()
    moved = inbox / "sorted" / "IMG_1.tiff"
    again.rename(moved)
    wait_for(lambda: sidecar(moved).exists() and moved.with_name("IMG_1.tiff.xmp").exists(), what="the move")
    time.sleep(1.5)
    assert engine.images == 2 and not sidecar(again).exists() and not again.with_name("IMG_1.tiff.xmp").exists()


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(
    make_config: Callable[..., Path], inbox: Path, tmp_path: Path
) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with running(config, first_log) as first:
        second = start_cli(config, second_log)
        assert second.wait(timeout=60) == 2
        text = second_log.read_text(encoding="utf-8")
        assert f"is in use by another autocaption daemon (pid {first.pid})" in text, text
        assert "loaded" not in text and len(text.strip().splitlines()) == 1  # refused before loading the model
        assert first.poll() is None


def test_process_waits_while_another_process_writes_the_photo(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    from autocaption.locks import PhotoLocks

    config = make_config(rules=FAST_RULES)
    photo = tmp_path / "held.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0012.jpg").read_bytes())
    log = tmp_path / "process.log"
    with PhotoLocks(load(config).state.dir).hold(photo):  # as the daemon does while it writes this photo
        proc = subprocess.Popen(
            [sys.executable, "-m", "autocaption", "process", "--config", str(config), str(photo)],
            stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=cli_env(),
        )  # fmt: skip
        wait_for(lambda: "loaded" in log.read_text(encoding="utf-8"), what="the model")
        time.sleep(3)  # described by now; waiting for the lock
        assert proc.poll() is None and not sidecar(photo).exists()
    assert proc.wait(timeout=60) == 0
    assert json.loads(sidecar(photo).read_text(encoding="utf-8"))["written"]["file"] == "embedded"


def test_process_and_the_daemon_on_the_same_photos_leave_each_complete(
    run_cli: RunCli, make_config: Callable[..., Path], inbox: Path, tmp_path: Path, corpus: Path
) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.2}}]")
    names = sorted(p.name for p in (corpus / "jpg/gps").glob("*.jpg"))
    with running(config, tmp_path / "daemon.log"):
        for name in names:
            (inbox / name).write_bytes((corpus / "jpg/gps" / name).read_bytes())
        result = run_cli("process", "--config", config, inbox)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: all(sidecar(inbox / n).exists() for n in names), what="every sidecar")
        time.sleep(2)
        # issue 25.18: with --force, photos the daemon wrote meanwhile were "changed while being described; will
        # retry", and nothing retried them: a one-shot run describes them once more itself
        forced = run_cli("process", "--force", "--config", config, inbox)
        assert forced.returncode == 0 and "will retry" not in forced.stderr, forced.stderr
        assert forced.stdout.startswith(f"{len(names)} images described"), forced.stdout
    for name in names:
        photo = inbox / name
        document = json.loads(sidecar(photo).read_text(encoding="utf-8"))
        assert document["written"]["sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest(), name
        assert document["image"]["size"] == photo.stat().st_size, name
        assert segment_counts(photo) == (1, 1), name


def test_watch_folders_that_appear_later_and_a_reload_that_adds_one(
    make_config: Callable[..., Path], inbox: Path, tmp_path: Path
) -> None:
    """`run` with a folder that does not exist yet (a NAS mounted late) waits for it; SIGHUP with a new missing
    folder keeps the daemon and its watchers (issue 13.5)."""
    late, later = tmp_path / "nas" / "photos", tmp_path / "usb" / "photos"
    watch = f"{{path: {str(inbox)!r}, settle_seconds: 0.3}}, {{path: {str(late)!r}, settle_seconds: 0.3}}"
    config = make_config(rules=FAST_RULES, extra=f"watch: [{watch}]")
    log = tmp_path / "daemon.log"
    with running(config, log) as proc:
        text = config.read_text(encoding="utf-8")
        added = f"{watch}, {{path: {str(later)!r}, settle_seconds: 0.3}}"
        config.write_text(text.replace(f"watch: [{watch}]", f"watch: [{added}]"), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(encoding="utf-8"), what="the reload")
        (inbox / "one.jpg").write_bytes(photo(1))
        wait_for(lambda: sidecar(inbox / "one.jpg").exists(), what="a photo in the folder watched all along")
        for folder, index in ((late, 2), (later, 3)):
            folder.mkdir(parents=True)
            (folder / f"p{index}.jpg").write_bytes(photo(index))
            wait_for(lambda f=folder, i=index: sidecar(f / f"p{i}.jpg").exists(), what=f"a photo in {folder}")
        assert proc.poll() is None
    text = log.read_text(encoding="utf-8")
    for folder in (late, later):
        assert text.count(f"watch: {folder}: folder does not exist (yet)") == 1, text


def test_a_watched_folder_deleted_and_created_again_is_watched_again(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    _, engine = daemon(extra="daemon: {reconcile_minutes: 0}")
    (inbox / "before.jpg").write_bytes(photo(1))
    wait_for(lambda: sidecar(inbox / "before.jpg").exists())
    shutil.rmtree(inbox)
    time.sleep(2.5)  # the daemon notices the folder is gone
    inbox.mkdir()
    time.sleep(2.5)  # ...and watches the new one
    (inbox / "after.jpg").write_bytes(photo(2))
    wait_for(lambda: sidecar(inbox / "after.jpg").exists(), timeout=30, what="a photo in the new folder")
    assert engine.images == 2


def test_an_empty_photo_is_reported(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    service, engine = daemon(empty_wait=1.0)
    (inbox / "empty.jpg").write_bytes(b"")
    wait_for(lambda: service.journal.stats().failed == 1, what="the empty file to be reported")
    assert "empty.jpg: empty file (0 bytes)" in service.journal.stats().recent_errors[0][1]
    assert engine.images == 0


def test_a_disk_full_write_is_retried_by_the_daemon_once_there_is_space(
    make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    from tests.test_never_lose import grow, small_disk

    with small_disk(tmp_path / "disk", 1200) as disk:
        watch = f"watch: [{{path: {str(disk)!r}, settle_seconds: 0.3}}]\ndaemon: {{retry_seconds: 1}}"
        config = make_config(rules=FAST_RULES, extra=watch)
        log = tmp_path / "daemon.log"
        with running(config, log):
            target = disk / "jolla.jpg"
            target.write_bytes((corpus / "jpg/large/jolla.jpg").read_bytes())
            wait_for(lambda: "No space left on device (will retry)" in log.read_text(encoding="utf-8"), what="ENOSPC")
            grow(disk, 4096)
            wait_for(lambda: "recorded answers written" in log.read_text(encoding="utf-8"), what="the late write")
        text = log.read_text(encoding="utf-8")
        # The model ran once, in the attempt whose write failed; every retry wrote the recorded answers.
        assert not described_in(log) and text.count("jolla.jpg: cannot write: No space left on device") >= 1
        document = json.loads(sidecar(target).read_text(encoding="utf-8"))
        assert document["written"]["file"] == "embedded"
        assert document["written"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_folder_moved_out_and_back_prints_no_python_warning(
    make_config: Callable[..., Path], inbox: Path, tmp_path: Path
) -> None:
    config = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    log = tmp_path / "daemon.log"
    with running(config, log):
        (inbox / "sub").mkdir()
        for _ in range(2):
            time.sleep(0.5)
            (inbox / "sub").rename(tmp_path / "sub")
            time.sleep(0.5)
            (tmp_path / "sub").rename(inbox / "sub")
        (inbox / "sub" / "x.jpg").write_bytes(photo(4))
        wait_for(lambda: sidecar(inbox / "sub" / "x.jpg").exists())
    text = log.read_text(encoding="utf-8")
    assert "Warning" not in text and "warnings.warn" not in text, text
    assert all(line.startswith("autocaption: ") for line in text.splitlines()), text


# --- the review page and the daemon ---------------------------------------------------------------------


def test_describe_again_from_the_review_page(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    service, engine = daemon()
    target = inbox / "again.jpg"
    target.write_bytes(photo(11))
    wait_for(lambda: sidecar(target).exists() and engine.images == 1, what="the first description")
    first = json.loads(sidecar(target).read_text(encoding="utf-8"))["rules"]["caption"]["created"]
    time.sleep(1.1)  # "created" has a resolution of seconds
    service.journal.describe_again(target)
    service.worker.wake.set()
    wait_for(lambda: engine.images == 2, what="the second description")
    wait_for(lambda: service.journal.rows("SELECT status, force FROM images WHERE path = ?", [str(target)])
             == [("done", 0)], what="the row to be done")  # fmt: skip
    assert json.loads(sidecar(target).read_text(encoding="utf-8"))["rules"]["caption"]["created"] != first


def test_a_correction_racing_the_daemon_loses_nothing(daemon, inbox: Path, corpus: Path) -> None:  # type: ignore[no-untyped-def]
    """The review page corrects a photo while the daemon describes it again and again: one writer at a time
    (the shared photo lock), the person's caption wins, and the JSON sidecar matches the photo."""
    from autocaption.review import Review
    from tests import exiftool

    service, engine = daemon()
    target = inbox / "raced.jpg"
    target.write_bytes((corpus / "jpg/gps/DSCN0027.jpg").read_bytes())
    wait_for(lambda: sidecar(target).exists(), what="the first description")
    from autocaption.review import Conflict

    review = Review(service.config, service.journal)
    image_id = service.journal.rows("SELECT rowid FROM images WHERE path = ?", [str(target)])[0][0]
    stop = threading.Event()

    def describe_again_and_again() -> None:
        while not stop.is_set():
            service.journal.describe_again(target)
            service.worker.wake.set()
            time.sleep(0.15)

    racer = threading.Thread(target=describe_again_and_again)
    racer.start()
    try:
        for round_ in range(6):
            for _ in range(50):  # the daemon may rewrite the photo between the look and the save: look again
                try:
                    seen = review.detail(image_id).sha256 or ""
                    review.correct(image_id, f"A person's caption, version {round_}", ["person", f"v{round_}"], seen)
                    break
                except Conflict:
                    time.sleep(0.05)
            else:
                raise AssertionError("the correction never got through")
            time.sleep(0.2)
    finally:
        stop.set()
        racer.join()
    wait_for(lambda: service.journal.pending() == 0, what="the daemon to finish")
    assert engine.images >= 3  # it really raced
    tags = exiftool.tags(target)[target]
    assert tags["XMP-dc:Description"] == "A person's caption, version 5" == tags["IFD0:ImageDescription"]
    assert tags["XMP-dc:Subject"] == ["person", "v5"]
    document = json.loads(sidecar(target).read_text(encoding="utf-8"))
    assert document["edited"]["description"] == "A person's caption, version 5"
    assert document["written"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert document["image"]["size"] == target.stat().st_size
    assert segment_counts(target) == (1, 1)


def test_service_install_writes_odd_paths_as_systemd_reads_them_and_checks_the_user(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Issue 17.15: `%` is a specifier in a unit (`%%` stays itself); a newline cannot be written; --run-as is a
    user name and is quoted in the commands printed."""
    odd = tmp_path / "100% Ann's photos"
    odd.mkdir()
    config = make_config(extra=f"watch: [{{path: {str(odd)!r}}}]")
    result = run_cli("service", "install", "--config", config, "--unit-dir", tmp_path / "units")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "units" / "autocaption.service"
    text = unit.read_text(encoding="utf-8")
    assert "100%% Ann's photos" in text and "ReadWritePaths=" in text, text
    check_unit(unit)  # systemd-analyze verify: the unit is valid as written (a lone % there is an error)
    broken = tmp_path / "two\nlines"
    broken.mkdir()
    broken_config = make_config(extra=f"watch: [{{path: {json.dumps(str(broken))}}}]")
    refused = run_cli("service", "install", "--config", broken_config, "--unit-dir", tmp_path / "units2")
    assert refused.returncode == 2 and "line break cannot be written into a systemd unit" in refused.stderr
    for bad in ("root; rm -rf /", "Bad User", "-x"):
        named = run_cli("service", "install", "--config", config, "--unit-dir", tmp_path / "units", "--run-as", bad)
        assert named.returncode == 2 and "not a user name" in named.stderr, (bad, named.stderr)


def test_service_install_carries_the_api_key_variable_into_the_unit(
    run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Issue 25.20: the unit did not see `api_key_env`, so the service exited 2 at once."""
    line = "{engine: openai, base_url: 'http://gpu-box:8000/v1', id: m, api_key_env: AUTOCAPTION_API_KEY}"
    config = make_config(model_line=line)
    result = run_cli("service", "install", "--config", config, "--unit-dir", tmp_path / "units")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "units" / "autocaption.service"
    assert "EnvironmentFile=-/etc/autocaption/autocaption.env" in unit.read_text(encoding="utf-8")
    assert "echo 'AUTOCAPTION_API_KEY=<the API key>' | sudo tee /etc/autocaption/autocaption.env" in result.stdout
    check_unit(unit)


def test_a_disk_mounted_on_a_subfolder_is_watched_at_once(daemon, inbox: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 25.16: a USB disk or a NAS share mounted under a watched tree hid its new photos until the next
    reconcile (an hour by default): inotify kept watching the folder underneath."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    usb = inbox / "usb"
    usb.mkdir()
    _, engine = daemon()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(usb)], check=True)
    try:
        time.sleep(3)  # the folder check notices the mount (every 2 s) and watches the tree again
        (usb / "from-the-disk.jpg").write_bytes(photo(7))
        wait_for(lambda: sidecar(usb / "from-the-disk.jpg").exists(), timeout=30, what="the photo on the disk")
    finally:
        subprocess.run(["umount", "-l", str(usb)], check=False)
    time.sleep(3)  # unmounted: the folder underneath is watched again
    (usb / "underneath.jpg").write_bytes(photo(8))
    wait_for(lambda: sidecar(usb / "underneath.jpg").exists(), timeout=30, what="the photo underneath")
    assert engine.images == 2


def test_a_photo_moved_while_the_daemon_was_stopped_is_recognised_and_a_deleted_one_not_counted(
    make_config: Callable[..., Path], inbox: Path
) -> None:
    """The start-up reconcile marks vanished photos GONE rather than forgetting them: a move made while the daemon
    was stopped is still recognised by its content (not described again), and `done` counts what exists."""
    config_path = make_config(rules=FAST_RULES, extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]")
    counters: list[CountingEngine] = []

    def factory(model: ModelConfig) -> Engine:
        counters.append(CountingEngine(load_engine(model)))
        return counters[-1]

    def run_until(condition: Callable[[Service], bool]) -> None:
        service = Service(config_path, load(config_path), engine_factory=factory)
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: service.watchers is not None and bool(service.watchers.observers), what="the start")
            wait_for(lambda: condition(service), what="the daemon's work")
            time.sleep(1)
        finally:
            service.stop.set()
            thread.join(timeout=30)

    for i in range(3):
        (inbox / f"p{i}.jpg").write_bytes(photo(i))
    run_until(lambda s: s.journal.stats().done == 3)
    (inbox / "sorted").mkdir()
    (inbox / "p0.jpg").rename(inbox / "sorted" / "p0.jpg")  # the photo alone: its sidecar stays behind
    (inbox / "p1.jpg").unlink()
    run_until(lambda s: s.journal.pending() == 0 and s.journal.stats().done == 2)
    assert counters[1].images == 0  # the moved photo was recognised, nothing described again
    assert sidecar(inbox / "sorted" / "p0.jpg").exists()


def test_the_watcher_queues_a_failed_photo_again_when_it_changes(tmp_path: Path) -> None:
    """A photo taken while still being copied fails (truncated); its next change must queue it again. A NULL
    comparison in the queue's condition once kept it failed until `retry`."""
    journal = Journal(tmp_path / "state")
    path = tmp_path / "slow.jpg"
    path.write_bytes(b"\xff\xd8 half a photo")
    assert journal.enqueue([path], unchanged_too=False) == 1
    journal.failed(path, "slow.jpg: truncated", transient=False, max_attempts=5, backoff=1)  # no stat recorded
    path.write_bytes(b"\xff\xd8 the whole photo \xff\xd9")
    assert journal.enqueue([path], unchanged_too=False) == 1 and journal.get(path).status == QUEUED  # type: ignore[union-attr]
    journal.failed(path, "x", transient=False, max_attempts=5, backoff=1, st=path.stat())  # after our own write
    assert journal.enqueue([path], unchanged_too=False) == 0  # unchanged since: stays failed
    journal.close()
