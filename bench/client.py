"""How fast autocaption's own side of a remote run is (issue 21.3): `autocaption process` against an instant
OpenAI-compatible server (fixed answers, in another process), 1 MP camera JPEGs, three rules writing a
description, keywords and a title — discovery, decode and resize, encoding, HTTP, the writes into the photo and
its JSON sidecar: everything but the model. Reported as photos per second of wall time and per CPU-second of
the client process (the server's CPU is not counted), against a naive client in the same run (each photo
decoded whole, encoded once per rule, one request after another, a JSON file written).

    .venv/bin/python bench/client.py [--photos 200] [--servers 1] [--before CHECKOUT]

`--before`: another checkout of autocaption (`git worktree add /tmp/before <commit>`), run the same way in
the same run, for a before/after ratio.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/corpus/jpg"
MESSAGE = {"role": "assistant", "content": "a stone farmhouse, pines, vines"}
ANSWER = {"id": "x", "object": "chat.completion", "usage": {"prompt_tokens": 2000, "completion_tokens": 12},
          "choices": [{"index": 0, "message": MESSAGE}]}  # fmt: skip
RULES = """
model: {{engine: openai, base_url: {urls}, id: stub, max_in_flight: 8, retries: 0}}
state: {{dir: {state}}}
rules:
  - {{name: caption, prompt: "Describe this photo.", max_new_tokens: 80, write: [description]}}
  - {{name: keywords, prompt: "Keywords.", max_new_tokens: 40, write: [keywords]}}
  - {{name: title, prompt: "A title.", max_new_tokens: 16, write: [title]}}
"""


class _Instant(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that use it

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "stub"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(ANSWER)

    def _send(self, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(port: int) -> None:
    """The instant server (run in its own process: `bench/client.py --serve PORT`)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Instant)
    server.daemon_threads = True
    server.serve_forever()


def photos(folder: Path, count: int) -> None:
    """`count` 1 MP camera JPEGs (1152x864 from the corpus's full-size photos, their EXIF kept)."""
    folder.mkdir(parents=True)
    sources = sorted((CORPUS / "large").glob("*.jpg"))
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as image:
            exif = image.getexif()
            small = image.convert("RGB").resize((1152, 864))
            # a different crop each, so no two photos are the same bytes
            small.paste(small.crop((i % 50, 0, 100 + i % 50, 100)), (0, 0))
            small.save(folder / f"IMG_{i:04d}.jpg", quality=90, exif=exif)


def client_seconds(command: list[str], root: Path = ROOT) -> tuple[float, float]:
    """(wall, CPU) seconds of a child process running autocaption from `root`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # (in `root`: `python -m` puts the working folder first on the path, before PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=root, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


NAIVE_PHOTOS = 20  # (rates are compared: the naive loop takes ~0.8 s a photo)


def naive(folder: Path, url: str) -> int:
    """The loop a first version would be: decode whole, encode per rule, one request at a time."""
    paths = sorted(folder.glob("*.jpg"))[:NAIVE_PHOTOS]
    for path in paths:
        answers = {}
        for rule in ("Describe this photo.", "Keywords.", "A title."):
            with Image.open(path) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
            data = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            body = {"model": "stub", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": rule}]}]}  # fmt: skip
            request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request) as response:
                answers[rule] = json.load(response)["choices"][0]["message"]["content"]
        path.with_name(path.name + ".json").write_text(json.dumps(answers))
    return len(paths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--before", type=Path, help="another checkout, measured the same way")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    from tests.test_remote import free_port

    ports = [free_port() for _ in range(args.servers)]
    servers = [subprocess.Popen([sys.executable, __file__, "--serve", str(port)]) for port in ports]
    urls = [f"http://127.0.0.1:{port}/v1" for port in ports]
    try:
        time.sleep(1.0)
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            photos(base / "originals", args.photos)
            shutil.copytree(base / "originals", base / "naive")
            started, cpu0 = time.perf_counter(), time.process_time()
            naive_n = naive(base / "naive", urls[0])
            naive_wall, naive_cpu = time.perf_counter() - started, time.process_time() - cpu0
            config = base / "rules.yaml"
            config.write_text(RULES.format(urls=json.dumps(urls), state=json.dumps(str(base / "state"))))
            measured = {}
            for name, root in (("now", ROOT), ("before", args.before)):
                if root is None:
                    continue
                runs = []
                for n in range(2):
                    folder = base / f"{name}{n}"
                    shutil.copytree(base / "originals", folder)
                    command = [sys.executable, "-m", "autocaption", "process", "--config", str(config), str(folder)]
                    runs.append(client_seconds(command, root.resolve()))
                    shutil.rmtree(base / "state")
                measured[name] = min(runs)
            wall, cpu = measured["now"]
    finally:
        for server in servers:
            server.kill()
    n = args.photos
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{n} photos of 1152x864, 3 rules, {args.servers} instant server(s) in other processes")  # fmt: skip
    print(f"autocaption process: {wall:.2f} s wall, {cpu:.2f} s CPU: {n / wall:.1f} photos/s, "
          f"{n / cpu:.1f} photos per CPU-second (start-up included)")
    print(f"naive loop ({naive_n} photos): {naive_wall:.2f} s wall, {naive_cpu:.2f} s CPU: "
          f"{naive_n / naive_wall:.1f} photos/s, {naive_n / naive_cpu:.1f} photos per CPU-second")
    print(f"ratio (photos per CPU-second, autocaption / naive): {(n / cpu) / (naive_n / naive_cpu):.1f}x")
    if "before" in measured:
        old_wall, old_cpu = measured["before"]
        print(f"before ({args.before}): {old_wall:.2f} s wall, {old_cpu:.2f} s CPU: {n / old_wall:.1f} photos/s, "
              f"{n / old_cpu:.1f} photos per CPU-second")
        print(f"now / before: {(n / cpu) / (n / old_cpu):.2f}x per CPU-second, {old_wall / wall:.2f}x wall")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
