"""The remote engine against a real OpenAI-compatible server on loopback: `transformers serve` with
the tiny local model (and a small HTTP server for the authentication failure)."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autocaption.config import ModelConfig
from autocaption.engine import Job, Prompt, load_engine
from autocaption.images import open_picture
from tests.conftest import RunCli, cli_env

KEY = "sk-test-secret-4f9a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`transformers serve MODEL_DIR --device cpu` on a loopback port; can be killed and restarted."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log, self.port = model, log, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        serve = Path(sys.executable).parent / "transformers"
        self.proc = subprocess.Popen(
            [str(serve), "serve", str(self.model), "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=cli_env(),
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"transformers serve did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    running = Server(tiny_model, tmp_path / "serve.log")
    running.start()
    yield running
    running.kill()


def write_remote(make_config: Callable[..., Path], url: str, model_id: str, extra: str = "", **model: object) -> Path:
    options = "".join(f", {key}: {value}" for key, value in model.items())
    line = f"{{engine: openai, base_url: {url!r}, id: {model_id!r}, max_image_side: 64{options}}}"
    return make_config(rules='- {name: caption, prompt: "Describe.", max_new_tokens: 6}', extra=extra, model_line=line)


def test_remote_answers_equal_in_process_answers(server: Server, tiny_model: Path, corpus: Path) -> None:
    local = load_engine(ModelConfig(id=str(tiny_model)))
    remote = load_engine(ModelConfig(engine="openai", base_url=server.base_url, id=str(tiny_model), max_image_side=64))
    assert remote.info.backend == "openai" and remote.info.max_image_side == local.info.max_image_side == 64
    pictures = [
        open_picture(corpus / name, max_pixels=10**9, draft_side=64)
        for name in ("jpg/camera/Canon_40D.jpg", "jpg/orientation/portrait_6.jpg", "jpg/gps/DSCN0010.jpg")
    ]
    prompts = (Prompt("Describe this photo.", 16), Prompt("Keywords?", 8, system="Be terse."))
    jobs = [Job(p.image, prompts) for p in pictures]
    expected = [[a.text for a in answers] for answers in local.describe(jobs)]
    got = remote.describe(jobs)
    assert [[a.text for a in answers] for answers in got] == expected
    assert all(a.new_tokens > 0 and a.prompt_tokens > 0 for answers in got for a in answers)
    remote.close()


def test_process_through_the_server_and_the_key_is_never_printed(
    server: Server, tiny_model: Path, make_config: Callable[..., Path], run_cli: RunCli, corpus: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AUTOCAPTION_TEST_KEY", KEY)  # transformers serve ignores keys; it is still sent
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("DSCN0010.jpg", "DSCN0012.jpg", "DSCN0021.jpg"):
        (folder / name).write_bytes((corpus / "jpg/gps" / name).read_bytes())
    config = write_remote(make_config, server.base_url, str(tiny_model), api_key_env="AUTOCAPTION_TEST_KEY")
    result = run_cli("process", "--config", config, folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3 images described, 3 answers")
    documents = [json.loads((folder / f"{n}.json").read_text(encoding="utf-8")) for n in ("DSCN0010.jpg",)]
    assert documents[0]["model"]["backend"] == "openai" and documents[0]["rules"]["caption"]["answer"]
    everything = result.stdout + result.stderr + "".join(p.read_text(encoding="utf-8") for p in folder.glob("*.json"))
    assert KEY not in everything


class _Refuses(http.server.BaseHTTPRequestHandler):
    """An authenticating gateway in front of a server: every key is wrong. It echoes the key back in
    its error message, as some servers do, to prove autocaption never repeats it."""

    def _refuse(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args: object) -> None:
        return


def test_wrong_key_unknown_model_and_unreachable_host_are_one_clear_error_each(
    server: Server, tiny_model: Path, make_config: Callable[..., Path], run_cli: RunCli, corpus: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AUTOCAPTION_TEST_KEY", KEY)
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0025.jpg").read_bytes())
    gateway = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        cases = [
            ("refused the API key (HTTP 401); check AUTOCAPTION_TEST_KEY",
             f"http://127.0.0.1:{gateway.server_address[1]}/v1", str(tiny_model),
             {"api_key_env": "AUTOCAPTION_TEST_KEY"}),
            ("is not served by", server.base_url, "no-such-model", {}),
            ("unreachable after 2 attempt(s)", f"http://127.0.0.1:{free_port()}/v1", str(tiny_model),
             {"retries": 1, "timeout_seconds": 5}),
        ]  # fmt: skip
        for expected, url, model_id, options in cases:
            config = write_remote(make_config, url, model_id, **options)
            started = time.monotonic()
            result = run_cli("process", "--config", config, photo)
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            assert result.returncode == 2, (expected, result.stderr)
            assert len(errors) == 1 and expected in errors[0], (expected, result.stderr)
            assert KEY not in result.stdout + result.stderr
            assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    finally:
        gateway.shutdown()


def test_server_killed_in_a_batch_then_restarted_every_image_once(
    server: Server, tiny_model: Path, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    from tests.test_daemon import described_in, photo, start_cli, wait_for

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_remote(
        make_config, server.base_url, str(tiny_model), extra=f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]",
        retries=1, timeout_seconds=10,
    )  # fmt: skip
    log = tmp_path / "daemon.log"
    daemon = start_cli(config, log)
    try:
        wait_for(lambda: "ready:" in log.read_text(encoding="utf-8"), what="ready")
        paths = [inbox / f"r_{i:02d}.jpg" for i in range(40)]
        for i, path in enumerate(paths):
            path.write_bytes(photo(i))
        wait_for(lambda: sum(described_in(log).values()) >= 5, what="some progress")
        server.kill()
        wait_for(lambda: "images stay queued" in log.read_text(encoding="utf-8"), what="the outage")
        server.start()
        wait_for(lambda: all(p.with_name(p.name + ".json").exists() for p in paths), timeout=180, what="all")
        wait_for(lambda: sum(described_in(log).values()) == len(paths), timeout=30, what="every image logged")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    counts: Counter[str] = described_in(log)
    assert len(counts) == len(paths) and max(counts.values()) == 1
    assert "resuming" in log.read_text(encoding="utf-8")
