"""An OpenAI-compatible server on loopback that can be told to misbehave, and switched while a client runs:
answers cut short, garbage status lines, bodies that are not UTF-8, odd `usage`, content as parts, empty and
refused answers, huge answers, trickling bytes, errors inside a 200, 429 with Retry-After, and a 500 for
panoramas only (a photo the server cannot take while it answers the others)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

MODEL = "stub-model"
OTHER_MODEL = "stub-model-2"  # served too: a model change
ANSWER = "A red fox in the snow"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StubServer

    def log_message(self, *args: object) -> None:
        return

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def do_GET(self) -> None:
        mode = self.server.mode
        if mode == "models-list":
            self._json([{"id": MODEL}])
        elif mode == "models-404":
            self._json({"error": "not found"}, status=404)
        else:
            self._json({"object": "list", "data": [{"id": MODEL}, {"id": OTHER_MODEL}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        with self.server.lock:
            self.server.requests += 1
            self.server.bodies.append(body)
        mode = self.server.mode
        usage: Any = {"prompt_tokens": 12, "completion_tokens": 5}
        content: Any = ANSWER
        if mode == "short-body":
            self._send(200, b'{"choices": [', length=4000)  # Content-Length promises more than comes
            self.close_connection = True
            return
        if mode == "garbage-status":
            self.wfile.write(b"GARBAGE LINE\r\n\r\n")
            self.close_connection = True
            return
        if mode == "not-utf8":
            self._send(200, b'{"choices": [{"message": {"content": "\xff\xfe\xfa"}}]}')
            return
        if mode == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", "4000")
            self.end_headers()
            for _ in range(400):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
            return
        if mode == "hang":  # a server that takes the request and never answers (within the test)
            time.sleep(60)
            self._json({"choices": [{"message": {"content": ANSWER}}]})
            return
        if mode == "no-such-model":
            self._json({"error": {"message": f"The model `{body.get('model')}` does not exist."}}, status=404)
            return
        if mode == "deep-json":
            self._send(200, b"[" * 200_000)
            return
        if mode == "503-odd":  # a Retry-After that is a digit to Python only, and a body that stalls
            self.send_response(503)
            self.send_header("Retry-After", "\u00b2".encode().decode("latin-1"))
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            time.sleep(5)
            return
        if mode == "error-200":
            self._json({"error": {"message": "the engine is overloaded"}})
            return
        if mode == "429":
            self._json({"error": "slow down"}, status=429, headers={"Retry-After": "1"})
            return
        if mode == "fail-wide" and _is_panorama(body):
            self._json({"error": "image too wide"}, status=500)
            return
        if mode == "usage-odd":
            usage = {"prompt_tokens": "12", "completion_tokens": [5]}
        elif mode == "usage-list":
            usage = ["oops"]
        elif mode == "parts":
            content = [{"type": "text", "text": "A red fox "}, {"type": "image_url"},
                       {"type": "text", "text": "in snow"}]  # fmt: skip
        elif mode == "refused":
            content = None
        elif mode == "empty":
            content = ""
        elif mode == "whitespace":
            content = " \n\t "
        elif mode == "structured" and "response_format" in body:  # a server that keeps to the schema
            content = json.dumps(_example(body["response_format"]["json_schema"]["schema"]))
        elif mode == "huge":
            content = "fox " * 250_000
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if mode == "refused":
            message["refusal"] = "I cannot help with that"
        self._json({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}],
                    "usage": usage})  # fmt: skip


def _example(schema: dict[str, Any]) -> Any:
    """A value that fits `schema` (the subset autocaption sends): the first option, the fewest items."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {name: _example(sub) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        item = schema.get("items", {})
        count = max(schema.get("minItems", 1), 1)
        if "enum" in item:
            return item["enum"][:count]
        return [f"thing{i}" for i in range(count)]
    if kind == "integer":
        return schema.get("minimum", 0)
    return "text"


def _is_panorama(body: dict[str, Any]) -> bool:
    for message in body.get("messages", []):
        for part in message.get("content", []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                with Image.open(io.BytesIO(data)) as image:
                    return image.width > 20 * image.height
    return False


class StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:  # a port: a server started again where it was
        super().__init__(("127.0.0.1", port), _Handler)
        self.mode = "ok"
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []  # every chat request, as sent
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@contextmanager
def stub_server(port: int = 0) -> Iterator[StubServer]:
    server = StubServer(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
