"""Several inference servers (issue 21): every request of a photo goes to one server, chosen by the photo's
content; a server that dies, hangs or is missing hands its photos to the next without losing one; with every
server gone the daemon waits, and goes on when one is back. Stub servers on loopback (tests/stubserver.py)."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocaption.config import load
from autocaption.engine.servers import ServerPool
from autocaption.process import process
from tests.conftest import RunCli
from tests.stubserver import MODEL, StubServer, stub_server
from tests.test_daemon import sidecar, wait_for
from tests.test_remote import free_port
from tests.test_remote_faults import photos, serving

RULES = """
- {name: caption, prompt: "Describe.", max_new_tokens: 20, write: [description]}
- {name: title, prompt: "A title.", max_new_tokens: 8, write: [title]}
- {name: mood, prompt: "The mood, in a word.", max_new_tokens: 4}
"""


def pool_config(make_config: Callable[..., Path], urls: list[str], extra: str = "", **model: object) -> Path:
    options = {"retries": 0, "timeout_seconds": 3, "max_image_side": 64, **model}
    listed = ", ".join(repr(url) for url in urls)
    line = f"{{engine: openai, base_url: [{listed}], id: {MODEL}" + "".join(
        f", {key}: {value}" for key, value in options.items()
    ) + "}"  # fmt: skip
    return make_config(rules=RULES, extra=extra, model_line=line)


def _image(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"][0]["image_url"]["url"])


def _servers_of_each_photo(**servers: StubServer) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for name, server in servers.items():
        for body in server.bodies:
            seen[_image(body)].add(name)
    return seen


def test_each_photos_requests_go_to_one_server_and_the_servers_share_the_photos(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    with stub_server() as a, stub_server() as b:
        folder = tmp_path / "photos"
        photos(folder, 16)
        config = load(pool_config(make_config, [a.base_url, b.base_url]))
        summary = process(config, [folder])
        assert summary.images == 16 and not summary.failures, summary.failures
        first = _servers_of_each_photo(a=a, b=b)
        assert len(first) == 16 and all(len(names) == 1 for names in first.values())
        assert a.requests == 3 * sum(names == {"a"} for names in first.values())  # three rules: three requests
        assert 0 < a.requests < 48  # both serve (all 16 on one server: a chance of 1 in 32,768)
        a.bodies.clear()
        b.bodies.clear()
        assert not process(config, [folder], force=True).failures
        assert _servers_of_each_photo(a=a, b=b) == first  # the same photo, the same server, every time


def test_adding_a_server_moves_only_the_photos_it_takes() -> None:
    three = ServerPool([f"http://gpu{i}:8000/v1" for i in range(3)], 8, probe=lambda url: True)
    four = ServerPool([f"http://gpu{i}:8000/v1" for i in range(4)], 8, probe=lambda url: True)
    keys = [i.to_bytes(4, "big") for i in range(4000)]
    before = [three.route(key)[0].url for key in keys]
    after = [four.route(key)[0].url for key in keys]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == "http://gpu3:8000/v1" for _, new in moved)  # only to the new server
    assert 800 < len(moved) < 1200  # its quarter of the photos


def test_a_server_out_is_probed_after_its_backoff_and_taken_back_when_it_answers() -> None:
    now = [0.0]
    answers = {"http://a/v1": False}
    probed = threading.Event()

    def probe(url: str) -> bool:
        probed.set()
        return answers.get(url, True)

    pool = ServerPool(["http://a/v1", "http://b/v1"], 8, probe=probe, clock=lambda: now[0])
    a, b = pool.servers
    key = next(key for key in (i.to_bytes(2, "big") for i in range(100)) if pool.route(key)[0] is a)
    pool.failed(a, "connection refused")
    assert pool.route(key) == [b, a] and not probed.is_set()  # out: last, and not probed before its time
    now[0] = 10.0
    pool.route(key)
    wait_for(lambda: probed.is_set() and not a.probing, what="the probe")
    assert not a.up and a.backoff == 20.0  # it did not answer: out for twice as long
    answers["http://a/v1"] = True
    probed.clear()
    now[0] = 30.0
    pool.route(key)
    wait_for(lambda: a.up, what="a taken back")
    assert pool.route(key) == [a, b] and pool.states() == [("http://a/v1", True, ""), ("http://b/v1", True, "")]


def test_a_server_killed_mid_run_loses_no_photo(make_config: Callable[..., Path], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    photos(folder, 24)
    with stub_server() as b:
        a = StubServer()
        threading.Thread(target=a.serve_forever, daemon=True).start()
        config = load(pool_config(make_config, [a.base_url, b.base_url], max_in_flight=2))

        def kill_a_after_its_first_answers() -> None:
            wait_for(lambda: a.requests >= 3, what="a's first answers")
            a.shutdown()
            a.server_close()  # refused from now on

        killer = threading.Thread(target=kill_a_after_its_first_answers)
        killer.start()
        summary = process(config, [folder])
        killer.join()
    assert summary.images == 24 and not summary.failures, summary.failures
    assert all(sidecar(path).is_file() for path in folder.glob("*.jpg"))
    assert a.requests >= 3 and b.requests >= 3 * 24 - a.requests  # b took over a's photos


def test_a_hanging_server_hands_its_photos_on_and_is_not_asked_again(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    photos(folder, 16)
    with stub_server() as a, stub_server() as b:
        a.mode = "hang"  # takes requests and never answers
        config = load(pool_config(make_config, [a.base_url, b.base_url], timeout_seconds=2, retries=1))
        summary = process(config, [folder])
    assert summary.images == 16 and not summary.failures, summary.failures
    assert b.requests == 48  # every answer came from b
    # a was asked only what was in flight to it when its first request timed out (2 per photo-slot at most),
    # then never again while it was out
    assert a.requests <= 8


def test_with_every_server_gone_the_daemon_waits_and_goes_on_when_one_is_back(
    make_config: Callable[..., Path], tmp_path: Path, run_cli: RunCli
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
    extra = f"watch: [{{path: {str(inbox)!r}, settle_seconds: 0.3}}]\ndaemon: {{retry_seconds: 1}}"
    config_path = pool_config(make_config, urls, extra=extra, timeout_seconds=2)
    with serving(config_path) as (service, _):
        waiting = photos(inbox, 3)
        wait_for(lambda: "waiting for the server" in service._status(), what="the outage")
        assert "unreachable" in service._status() and not any(sidecar(path).exists() for path in waiting)
        wait_for(lambda: "servers: 0 of 2 servers up; out: " in run_cli("status", "--config", config_path).stdout,
                 what="status to name the servers")  # fmt: skip
        with stub_server(ports[1]) as back:
            wait_for(lambda: all(sidecar(path).is_file() for path in waiting), timeout=60, what="the photos")
            wait_for(lambda: "1 of 2 servers up; out: " + urls[0] in service._status(), what="the status line")
            wait_for(lambda: json.loads(run_cli("status", "--json", "--config", config_path).stdout)["servers"]
                     .startswith("1 of 2 servers up"), what="status --json")  # fmt: skip
    assert back.requests == 9


def test_a_jpeg_is_sent_as_its_own_image_without_its_metadata(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    import base64
    import io
    import shutil

    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    original = corpus / "jpg/gps/DSCN0010.jpg"  # 640x480, upright: sent as it is (nothing encoded again)
    shutil.copyfile(original, folder / original.name)
    rotated = corpus / "jpg/orientation/portrait_6.jpg"  # Orientation 6: encoded upright
    shutil.copyfile(rotated, folder / rotated.name)
    with stub_server() as server:
        config = load(pool_config(make_config, [server.base_url], max_image_side=1008))
        assert not process(config, [folder]).failures
    sent = {base64.b64decode(_image(body).split(",", 1)[1]) for body in server.bodies}
    assert len(server.bodies) == 6 and len(sent) == 2  # three rules each: one image per photo
    with Image.open(original) as photo:
        as_is = next(data for data in sent if Image.open(io.BytesIO(data)).size == photo.size)
        assert as_is.startswith(b"\xff\xd8") and b"Exif\x00\x00" not in as_is and b"NIKON" not in as_is  # no EXIF, GPS
        assert Image.open(io.BytesIO(as_is)).tobytes() == photo.convert("RGB").tobytes()  # the very pixels


# --- a hostile review's cases (issue 21) ----------------------------------------------------------------------


def test_one_outage_counts_once_and_a_probe_alone_does_not_forgive_it() -> None:
    now = [0.0]
    pool = ServerPool(["http://a/v1", "http://b/v1"], 8, probe=lambda url: True, clock=lambda: now[0])
    a = pool.servers[0]
    for _ in range(8):  # the eight requests in flight when it went down
        pool.failed(a, "timed out")
    assert a.backoff == 10.0
    now[0] = 10.0
    pool.route(b"photo")
    wait_for(lambda: a.up, what="the probe")  # its model list answers: back, on trial
    pool.failed(a, "timed out")  # but its chat still hangs: out twice as long
    assert (a.up, a.backoff) == (False, 20.0)
    pool.answered(a)  # a photo answered: forgiven
    assert (a.up, a.backoff) == (True, 0.0)


def test_servers_with_long_shared_url_prefixes_still_share_the_photos() -> None:
    base = "http://localhost:8000/some/long/reverse/proxy/prefix/for/the/inference/gpu-server-"
    pool = ServerPool([base + "1/v1", base + "2/v1"], 8, probe=lambda url: True)
    firsts = {pool.route(i.to_bytes(4, "big"))[0].url for i in range(100)}
    assert len(firsts) == 2


def test_a_server_that_does_not_serve_the_model_hands_its_photos_on(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    photos(folder, 8)
    with stub_server() as a, stub_server() as b:
        b.mode = "no-such-model"  # restarted with another model: 404 for every chat request
        summary = process(load(pool_config(make_config, [a.base_url, b.base_url])), [folder])
    assert summary.images == 8 and not summary.failures, summary.failures
    assert a.requests == 24


def test_the_image_sent_has_no_metadata_even_between_the_scans_of_a_progressive_jpeg() -> None:
    import io
    import struct

    from PIL import Image

    from autocaption.writers.containers import jpeg_image_only

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(buffer, format="JPEG", progressive=True)
    plain = buffer.getvalue()
    second = plain.find(b"\xff\xda", plain.find(b"\xff\xda") + 2)
    xmp = b"\xff\xe1" + struct.pack(">H", 2 + 17) + b"SECRET xmpmeta!!!"
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 4) + b"\xff\xd9ab"  # an EOI's bytes inside a comment
    sent = jpeg_image_only(plain[:second] + xmp + comment + plain[second:])
    assert sent is not None and b"SECRET" not in sent
    assert Image.open(io.BytesIO(sent)).tobytes() == Image.open(io.BytesIO(plain)).tobytes()
