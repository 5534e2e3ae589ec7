"""Several servers for real (issue 21.2): autocaption behind vllm-router (the real router, its consistent_hash
policy keyed by the photo autocaption names in X-Session-ID), and the list form against two real `transformers
serve` processes whose answers must equal the in-process engine's. (vllm-router cannot front `transformers
serve` itself: it adds SGLang's fields to every request, which transformers serve refuses with HTTP 422; vLLM
ignores them. So the router's backends here are the lenient stub servers.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autocaption.config import ModelConfig, load
from autocaption.engine import Job, Prompt, load_engine
from autocaption.images import open_picture
from autocaption.process import process
from tests.stubserver import MODEL, StubServer
from tests.test_daemon import sidecar, wait_for
from tests.test_remote import Server, free_port
from tests.test_remote_faults import photos


def _router_binary() -> Path:
    binary = Path(sys.executable).parent / "vllm-router"
    if not binary.exists():
        pytest.fail("vllm-router is required (pip install vllm-router: the test extra has it)")
    return binary


@pytest.fixture
def stubs() -> Iterator[tuple[StubServer, StubServer]]:
    servers = (StubServer(), StubServer())
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def router(stubs: tuple[StubServer, StubServer], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    workers = [server.base_url.removesuffix("/v1") for server in stubs]
    log = (tmp_path / "router.log").open("wb")
    proc = subprocess.Popen(
        [str(_router_binary()), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
         "--policy", "consistent_hash", "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/models", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for(ready, timeout=30, what="vllm-router")
        yield url
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_behind_vllm_router_each_photo_stays_on_one_server_and_none_is_lost_when_one_dies(
    router: str, stubs: tuple[StubServer, StubServer], make_config: Callable[..., Path], tmp_path: Path
) -> None:
    first, second = stubs
    folder = tmp_path / "photos"
    photos(folder, 40)
    line = f"{{engine: openai, base_url: {router!r}, id: {MODEL}, max_image_side: 64, retries: 3, timeout_seconds: 5}}"
    rules = """
    - {name: caption, prompt: "Describe.", max_new_tokens: 20}
    - {name: tags, prompt: "Keywords.", max_new_tokens: 20}
    """
    config = load(make_config(rules=rules, model_line=line))

    def kill_the_first_after_its_first_answers() -> None:
        wait_for(lambda: first.requests >= 6, what="the first server's answers")
        first.shutdown()
        first.server_close()

    killer = threading.Thread(target=kill_the_first_after_its_first_answers)
    killer.start()
    summary = process(config, [folder])
    killer.join()
    assert summary.images == 40 and not summary.failures, summary.failures  # none lost, each described once
    assert all(sidecar(path).is_file() for path in folder.glob("*.jpg"))
    assert first.requests + second.requests == 80  # no request answered twice
    servers_of: dict[str, set[str]] = defaultdict(set)
    for name, server in (("first", first), ("second", second)):
        for body in server.bodies:
            servers_of[body["messages"][-1]["content"][0]["image_url"]["url"]].add(name)
    # Both prompts of a photo reached one server, but for the photos in flight when the first one died.
    assert len(servers_of) == 40 and sum(len(names) > 1 for names in servers_of.values()) <= 8


def test_two_transformers_servers_answer_as_the_in_process_engine_and_one_can_die(
    tiny_model: Path, corpus: Path, tmp_path: Path
) -> None:
    servers = [Server(tiny_model, tmp_path / f"serve{i}.log") for i in range(2)]
    starting = [threading.Thread(target=server.start) for server in servers]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    try:
        local = load_engine(ModelConfig(id=str(tiny_model)))
        urls = tuple(server.base_url for server in servers)
        remote = load_engine(ModelConfig(engine="openai", base_url=urls, id=str(tiny_model), max_image_side=64,
                                         retries=1, timeout_seconds=30))  # fmt: skip
        names = ["jpg/camera/Canon_40D.jpg", "jpg/orientation/portrait_6.jpg", "jpg/gps/DSCN0010.jpg",
                 "jpg/gps/DSCN0012.jpg", "jpg/exif-org/fujifilm-mx1700.jpg", "jpg/gps/DSCN0021.jpg"]  # fmt: skip
        jobs = [Job(open_picture(corpus / name, max_pixels=10**9, draft_side=64).image,
                    (Prompt("Describe this photo.", 12), Prompt("Keywords?", 6))) for name in names]  # fmt: skip
        expected = [[answer.text for answer in answers] for answers in local.describe(jobs)]
        assert [[answer.text for answer in answers] for answers in remote.describe(jobs)] == expected
        # Kill the one that answered more photos (by its access log): which server owns a photo hangs on the
        # ports, so killing a fixed one could kill a server that owns none of these six.
        answered = [server.log.read_text(errors="replace").count("POST /v1/chat/completions") for server in servers]
        assert sum(answered) == 2 * len(jobs)
        dead = answered.index(max(answered))
        servers[dead].kill()
        started = time.monotonic()
        assert [[answer.text for answer in answers] for answers in remote.describe(jobs)] == expected
        assert time.monotonic() - started < 60  # (the dead one is taken out at its first refusal)
        assert [state[1] for state in remote.pool.states()] == [i != dead for i in range(2)]  # type: ignore[attr-defined]
        remote.close()
    finally:
        for server in servers:
            server.kill()
