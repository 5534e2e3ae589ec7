"""A remote OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp server, `transformers serve`).

One chat completion per prompt, with the same system/user structure as the in-process engine and the
image as a lossless PNG data URL. The prompts of one image are sent back to back, so a server with
automatic prefix caching (vLLM) computes the image once; up to `max_in_flight` requests are open at a
time on each server so it can batch them. Several servers (`base_url` as a list): every request of a
photo goes to one of them, chosen by the photo's content, the next one while it is down (servers.py).
Only the standard library is used (urllib, threads).

The API key comes from an environment variable or a file, and never appears in logs or errors.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Any

from PIL import Image

from autocaption.config import ModelConfig
from autocaption.engine.base import (
    Answer,
    Cancelled,
    EngineInfo,
    Job,
    PartlyAnswered,
    Prompt,
    flattened,
    next_round,
    skipped,
)
from autocaption.engine.servers import Server, ServerPool
from autocaption.errors import EngineError, ModelUnavailable, ServerUnreachable
from autocaption.structure import Structure

log = logging.getLogger(__name__)

MAX_BODY = 16 * 2**20  # bytes of one answer's JSON: far beyond any caption; more is a server fault
CHARS_PER_TOKEN = 32  # an answer longer than this many characters per asked token was not made of tokens
ANSWERING_SECONDS = 600.0  # a server that answered within this time is up: a photo it fails on is the trouble
LOSSLESS_PIXELS = 256 * 256  # pictures up to this size go as PNG (a few ms), larger ones as JPEG
MAX_RETRY_AFTER = 120.0  # seconds: a server asking for longer is waited out by the daemon, not by a request


def _api_key(config: ModelConfig) -> str | None:
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ModelUnavailable(f"model.api_key_env: the environment variable {config.api_key_env} is not set")
        return key.strip()
    if config.api_key_file:
        try:
            return config.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ModelUnavailable(f"model.api_key_file: {config.api_key_file}: {exc.strerror or exc}") from None
    return None


class _Refused(EngineError):
    """A 4xx: the request refused for good; `photo`: because of what it asks (not the server's own state)."""

    def __init__(self, message: str, *, photo: bool = True) -> None:
        super().__init__(message)
        self.photo = photo


class _Retry(Exception):
    """One attempt failed in a way the next may not: connection, timeout, 5xx, 429, a garbled answer."""

    def __init__(self, problem: str, wait: float | None = None, *, answered: bool = True, busy: bool = False) -> None:
        super().__init__(problem)
        self.wait = wait  # what the server asked for (Retry-After), in seconds
        self.answered = answered  # it answered (badly), as opposed to not at all
        self.busy = busy  # it said it cannot serve anyone now (429, 502, 503, 504): the server's state, not a photo's


def _retry_after(value: str | None) -> float | None:
    text = (value or "").strip()
    if text.isascii() and text.isdigit():  # "²" is a digit to Python, not a number of seconds
        return min(max(float(text), 1.0), MAX_RETRY_AFTER)
    return None


def _count(value: object) -> int:
    """A token count from `usage`, which some servers fill with strings or lists: 0 for anything not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text_of(message: object) -> str | None:
    """The answer text of a chat message: a string, or the text parts of a list of parts; None when it
    holds no text (null content, a refusal, something else)."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        texts = [part for part in parts if isinstance(part, str)]
        return "".join(texts) if texts else None
    return None


class OpenAIEngine:
    def __init__(self, config: ModelConfig, key: str | None) -> None:
        assert config.base_urls
        self.config = config
        self.base_url = ", ".join(config.base_urls)  # in messages that are about no one server
        self._key = key
        servers = len(config.base_urls)
        self.info = EngineInfo(
            backend="openai", model_id=config.id, device=self.base_url, dtype="server",
            max_image_side=config.max_image_side,
            batch_images=config.batch_size or config.max_in_flight * servers,
        )  # fmt: skip
        self.timings: dict[str, float] = {"encode": 0.0, "server": 0.0}
        self.pool = ServerPool(config.base_urls, config.max_in_flight, self._probe)
        self._slots = threading.BoundedSemaphore(config.max_in_flight * servers)  # request threads at once
        self._answering = -float("inf")  # when the server last answered a prompt (monotonic seconds)
        self._closed = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: ModelConfig) -> OpenAIEngine:
        engine = cls(config, _api_key(config))
        engine._check_model()
        return engine

    def close(self) -> None:
        self._closed.set()  # requests still waiting for a slot are not sent; open ones are abandoned

    # --- errors never carry the key -------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    def _check_model(self) -> None:
        """A definite answer that the model is not served is fatal; an unreachable server is not
        (the daemon waits for it, a one-shot run fails at its first request)."""
        for server in self.pool.servers:
            self._check_server(server)

    def _check_server(self, server: Server) -> None:
        try:
            listing = self._request("GET", "/models", None, attempts=1, servers=[server])
        except ServerUnreachable as exc:
            log.warning("%s; will keep trying", exc)
            return
        except EngineError as exc:
            if "HTTP 404" in str(exc):  # some servers have no model list; the chat endpoint may still work
                log.warning("%s: no model list (HTTP 404); going on with model %s", server.url, self.config.id)
                return
            raise ModelUnavailable(str(exc)) from None
        items = listing.get("data", []) if isinstance(listing, dict) else listing  # some answer a bare list
        served = [str(item.get("id")) for item in (items if isinstance(items, list) else []) if isinstance(item, dict)]
        if served and self.config.id not in served:
            raise ModelUnavailable(
                f"model {self.config.id!r} is not served by {server.url} (it serves: {', '.join(served)}); "
                "set model.id to the served model name"
            )
        log.info("using model %s at %s", self.config.id, server.url)

    def _probe(self, url: str) -> bool:
        """Whether a server that was out answers again (its model list, one short try)."""
        server = next(server for server in self.pool.servers if server.url == url)
        request = urllib.request.Request(url + "/models", headers=self._headers(), method="GET")
        try:
            with server.slots:
                self._once(request, min(self.config.timeout_seconds, 10.0), url)
        except (_Retry, EngineError):
            return False
        return True

    def _headers(self, key: bytes = b"") -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if key:  # the photo, for a router in front of several servers (vllm-router's consistent_hash policy)
            headers["X-Session-ID"] = key.hex()
        return headers

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, attempts: int | None = None,
        cancel: threading.Event | None = None, key: bytes = b"", servers: Sequence[Server] | None = None,
    ) -> Any:  # fmt: skip
        """One HTTP call with retries (exponential backoff and jitter, or what the server asks for with
        Retry-After) on connection errors, timeouts, 5xx, 429 and garbled answers. `timeout_seconds` bounds
        each attempt as a whole, not each socket read: a server trickling bytes is cut off in time. Each
        attempt tries the photo's servers in its order (`key`: the photo's; `servers`: just these): a server
        that fails hands the request on at once, and is taken out while it is down."""
        return self._ask(method, path, body, attempts, cancel, key, servers)[0]

    def _ask(
        self, method: str, path: str, body: dict[str, Any] | None, attempts: int | None = None,
        cancel: threading.Event | None = None, key: bytes = b"", servers: Sequence[Server] | None = None,
    ) -> tuple[Any, str]:  # fmt: skip
        """`_request`, and the URL of the server that answered."""
        attempts = self.config.retries + 1 if attempts is None else attempts
        data = json.dumps(body).encode() if body is not None else None
        problem, wait, answered, busy, where = "", None, False, False, self.base_url
        refused: EngineError | None = None  # a server that refused the request itself (404, 401)
        for attempt in range(attempts):
            if attempt:
                delay = wait if wait is not None else min(2 ** (attempt - 1), 30) * (0.5 + random.random())
                if (cancel or self._closed).wait(delay) or self._closed.is_set():
                    raise Cancelled()  # stopping: no more requests
            tried: set[str] = set()
            # The photo's order again after each failure: a server another request found out meanwhile is last.
            while server := next((s for s in servers or self.pool.route(key) if s.url not in tried), None):
                tried.add(server.url)
                headers = self._headers(key)
                request = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
                try:
                    with server.slots:
                        if self._closed.is_set() or (cancel is not None and cancel.is_set()):
                            raise Cancelled()  # stopped while it waited for the server: never sent
                        if not server.up and servers is None and self.pool.any_up(tried):
                            continue  # it went out while this request waited for it: not one more timeout
                        result = self._once(request, self.config.timeout_seconds, server.url)
                except _Retry as exc:
                    problem, wait, answered, busy, where = str(exc), exc.wait, exc.answered, exc.busy, server.url
                    if busy or not answered:  # (a 500 or a garbled answer may be this photo's: not an outage)
                        self.pool.failed(server, self._redact(problem))
                    if attempt and servers is None and not self.pool.any_up(tried):
                        break  # every server out, tried each once already: a retry asks one, not each in turn
                    continue
                except _Refused as exc:
                    if exc.photo or servers is not None or len(self.pool.servers) == 1:
                        raise  # the request itself (400, 413, 422), or the only server: the same everywhere
                    refused = exc  # this server's own trouble (a model it does not serve, a key it refuses)
                    self.pool.failed(server, str(exc))
                    continue
                self.pool.answered(server)
                return result, server.url
            if refused is not None and not problem:
                raise refused  # every server refused it: no retry changes that
        # a 500 is not a server that is down, and a 503 is one that is up but cannot serve anyone now
        how = "is unavailable" if busy else "kept failing" if answered else "unreachable"
        several = servers is None and len(self.pool.servers) > 1
        name = f"servers {self.base_url} (the last, {where})" if several else f"server {where}"
        message = self._redact(f"{name} {how} after {attempts} attempt(s): {problem}")
        raise ServerUnreachable(message, answered=answered and not busy)

    def _once(self, request: urllib.request.Request, timeout: float, url: str) -> Any:
        deadline = time.monotonic() + timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = _read_until(response, deadline)
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read(64 * 1024).decode("utf-8", "replace")[:500]
            except (http.client.HTTPException, OSError, ValueError):  # a body that stalls or breaks off
                text = ""
            if exc.code == 429 or exc.code >= 500:
                raise _Retry(f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After")),
                             busy=exc.code in (429, 502, 503, 504)) from None  # fmt: skip
            raise self._client_error(exc.code, text, url) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            # refused, reset, timed out, a cut-short body (IncompleteRead), a garbage status line...
            reason = getattr(exc, "reason", exc)
            answered = isinstance(exc, (http.client.HTTPException, ValueError))
            raise _Retry(str(reason) or type(exc).__name__, answered=answered) from None
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
            raise _Retry("the answer was not JSON") from None
        if isinstance(answer, dict) and "error" in answer and "choices" not in answer:
            detail = answer["error"]
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            raise _Retry(f"the server answered with an error: {self._redact(str(detail))[:200]}")
        return answer

    def _client_error(self, status: int, text: str, url: str) -> _Refused:
        try:
            detail = json.loads(text).get("error", text)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, AttributeError):
            detail = text
        detail = self._redact(str(detail)).strip() or "no details"
        if status in (401, 403):
            where = self.config.api_key_env or self.config.api_key_file or "model.api_key_env"
            return _Refused(f"server {url} refused the API key (HTTP {status}); check {where}", photo=False)
        if status == 404:
            found = f"server {url}: model {self.config.id!r} or endpoint not found (HTTP 404): {detail}"
            return _Refused(found, photo=False)
        if status == 413:
            return _Refused(f"server {url}: image too large for the server (HTTP 413)")
        return _Refused(f"server {url} rejected the request (HTTP {status}): {detail}")

    # --- describing -------------------------------------------------------------------------------

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        started = time.perf_counter()
        urls = [self._data_url(job) for job in jobs]
        keys = [hashlib.blake2b(url.encode("ascii"), digest_size=16).digest() for url in urls]  # a photo's server
        self.timings["encode"] += time.perf_counter() - started
        prompts = dict(enumerate(flattened(jobs)))
        image_of = [(url, key) for job, url, key in zip(jobs, urls, keys, strict=True) for _ in job.prompts]
        answers: dict[int, Answer] = {}
        errors: dict[int, EngineError] = {}
        # In rounds: the prompts without a gate, then those whose gate answered (the server's prefix cache
        # keeps the image's prefill between them, where it has one). A prompt whose gate failed is never
        # asked: its photo fails with the gate's error.
        while ready := next_round({i: p for i, p in prompts.items() if i not in errors}, answers):
            for index, result in zip(ready, self._round([(image_of[i], prompts[i]) for i in ready], cancel),
                                     strict=True):  # fmt: skip
                if isinstance(result, Answer):
                    answers[index] = result
                else:
                    errors[index] = result
        self.timings["server"] += time.perf_counter() - started
        return self._sorted(jobs, [answers.get(i) or errors.get(i) or skipped("its gate failed") for i in prompts])

    def _round(
        self, asks: list[tuple[tuple[str, bytes], Prompt]], cancel: threading.Event | None
    ) -> list[Answer | EngineError]:
        """Ask these ((image, its key), prompt) pairs, back to back per image in order: the server's prefix
        cache sees an image's prompts together."""
        futures = [self._spawn(self._complete, image, prompt, cancel) for image, prompt in asks]
        pending = set(futures)
        while pending:  # a stop abandons the requests in flight at once (their threads end with the process)
            if cancel is not None and cancel.is_set():
                for future in futures:
                    future.cancel()
                raise Cancelled()
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
        flat: list[Answer | EngineError] = []
        for future in futures:
            try:
                flat.append(future.result())
            except EngineError as exc:
                flat.append(exc)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a fault of ours or of the server: that photo's, never the worker's
                flat.append(EngineError(f"server {self.base_url}: {type(exc).__name__}: {exc}", transient=True))
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        return flat

    def _answers_at_all(self) -> bool:
        """A server that failed on every photo of a batch: does it answer anything (its model list)? Then those
        photos are the trouble (a lone photo it cannot take in an idle library), not an outage."""
        try:
            self._request("GET", "/models", None, attempts=1)
        except (EngineError, Cancelled):
            return False
        return True

    def _spawn(self, work: Callable[..., Answer], *args: object) -> Future[Answer]:
        """`work` on a daemon thread once a slot is free: an abandoned request never holds up the exit (a
        ThreadPoolExecutor's threads are joined at exit: a hanging server kept a stopped daemon for minutes)."""
        future: Future[Answer] = Future()

        def run() -> None:
            with self._slots:
                if not future.set_running_or_notify_cancel():
                    return  # cancelled while it waited for a slot
                if self._closed.is_set():
                    future.set_exception(Cancelled())  # closed meanwhile: never sent, never left pending
                    return
                try:
                    future.set_result(work(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                    future.set_exception(exc)

        threading.Thread(target=run, name="openai", daemon=True).start()
        return future

    def _sorted(self, jobs: Sequence[Job], flat: list[Answer | EngineError]) -> list[list[Answer]]:
        """Answers per job. When nothing at all came back the server is down (every image waits for it);
        when it answered some, the images it failed on fail alone and the answers received are kept."""
        if any(isinstance(item, Answer) for item in flat):
            self._answering = time.monotonic()
        else:
            unreachable = next((item for item in flat if isinstance(item, ServerUnreachable)), None)
            # A server that answers others (lately) but fails on these photos has trouble with them, not a
            # outage: they fail (and are retried, then failed for good) instead of holding the queue forever.
            lately = time.monotonic() - self._answering < ANSWERING_SECONDS
            if unreachable is not None and not (unreachable.answered and (lately or self._answers_at_all())):
                raise unreachable
        results = iter(flat)
        answers: list[list[Answer] | None] = []
        errors: dict[int, EngineError] = {}
        for index, job in enumerate(jobs):
            mine = [next(results) for _ in job.prompts]
            failure = next((item for item in mine if isinstance(item, EngineError)), None)
            if failure is None:
                answers.append([item for item in mine if isinstance(item, Answer)])
                continue
            answers.append(None)
            if isinstance(failure, ServerUnreachable):  # it answered other images: this one is the trouble
                failure = EngineError(f"the server answered other photos but not this one ({failure})", transient=True)
            errors[index] = failure
        if errors:
            raise PartlyAnswered(answers, errors)
        return [item for item in answers if item is not None]

    def _data_url(self, job: Job) -> str:
        """The upright, RGB image as the server gets it, encoded once per photo: the photo's own JPEG when it
        is exactly the picture (nothing to encode: the server decodes what the in-process model would);
        else a small picture as a lossless PNG and a larger one as a JPEG of quality 95 without chroma
        subsampling (a PNG of a megapixel takes 13 times as long to make, and is 4 times the size).

        JPEGs arrive already drafted to about `max_image_side`; only much larger pictures (a 50 MP PNG
        or TIFF) are scaled down, to keep requests to a few MB.
        """
        image = job.image
        cap = 4 * self.config.max_image_side
        if job.jpeg is not None and max(image.size) <= cap:
            return "data:image/jpeg;base64," + base64.b64encode(job.jpeg).decode("ascii")
        if max(image.size) > cap:
            image = image.copy()
            image.thumbnail((cap, cap), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if image.width * image.height <= LOSSLESS_PIXELS:
            image.save(buffer, format="PNG", compress_level=1)
            return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def _complete(self, image: tuple[str, bytes], prompt: Prompt, cancel: threading.Event | None) -> Answer:
        url, key = image
        if cancel is not None and cancel.is_set():
            return Answer("", 0, 0, 0.0)
        messages: list[dict[str, Any]] = []
        if prompt.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt.text},
        ]})  # fmt: skip
        body = {"model": self.config.id, "messages": messages, "max_tokens": prompt.max_new_tokens, "temperature": 0}
        if prompt.structure is not None:  # the server constrains what it can; the pipeline checks every answer
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": prompt.structure.kind,
                    "schema": _wrapped(prompt.structure.schema()),
                    "strict": True,
                },
            }
        started = time.perf_counter()
        reply, server = self._ask("POST", "/chat/completions", body, cancel=cancel, key=key)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        text = _text_of(choice.get("message"))
        if text is None or not text.strip():
            refusal = (choice.get("message") or {}).get("refusal") if isinstance(choice.get("message"), dict) else None
            why = f"refused: {str(refusal)[:200]}" if refusal else "an empty answer" if text is not None else (
                f"no answer text in {self._redact(str(reply))[:200]}")  # fmt: skip
            raise EngineError(f"server {server}: {why}; not written", transient=True)
        if len(text) > prompt.max_new_tokens * CHARS_PER_TOKEN:
            raise EngineError(
                f"server {server}: an answer of {len(text)} characters for at most {prompt.max_new_tokens} "
                "tokens; not written", transient=True,
            )  # fmt: skip
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        if prompt.structure is not None:
            text = _unwrapped(text, prompt.structure)
        return Answer(
            text=text,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            new_tokens=_count(usage.get("completion_tokens")),
            seconds=time.perf_counter() - started,
        )


def _wrapped(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema as `response_format` takes it everywhere (OpenAI's strict mode wants an object at the top)."""
    if schema.get("type") == "object":
        return schema
    return {"type": "object", "properties": {"answer": schema}, "required": ["answer"], "additionalProperties": False}


def _unwrapped(text: str, structure: Structure) -> str:
    """The answer in the form the in-process decoder writes it (`yes`, `a, b, c`, the JSON itself); a reply
    that is not the JSON asked for is passed on as it is, for the rule's own check to judge."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if structure.schema().get("type") != "object":
        if not isinstance(value, dict) or "answer" not in value:
            return text
        value = value["answer"]
    return structure.text_of(value)


def _read_until(response: Any, deadline: float) -> bytes:
    """The body, read in pieces so that the whole request keeps to its deadline, and at most MAX_BODY bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took longer than timeout_seconds")
        chunk = response.read1(64 * 1024) if hasattr(response, "read1") else response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY:
            raise ValueError(f"the answer is larger than {MAX_BODY // 2**20} MB")
        chunks.append(chunk)
