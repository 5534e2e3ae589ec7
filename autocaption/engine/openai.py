"""A remote OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp server, `transformers serve`).

One chat completion per prompt, with the same system/user structure as the in-process engine and the
image as a lossless PNG data URL. The prompts of one image are sent back to back, so a server with
automatic prefix caching (vLLM) computes the image once; up to `max_in_flight` requests are open at a
time so the server can batch them. Only the standard library is used (urllib, threads).

The API key comes from an environment variable or a file, and never appears in logs or errors.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from autocaption.config import ModelConfig
from autocaption.engine.base import Answer, Cancelled, EngineInfo, Job, Prompt
from autocaption.errors import EngineError, ModelUnavailable, ServerUnreachable

log = logging.getLogger(__name__)


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


class _HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class OpenAIEngine:
    def __init__(self, config: ModelConfig, key: str | None) -> None:
        assert config.base_url is not None
        self.config = config
        self.base_url = config.base_url
        self._key = key
        self.info = EngineInfo(
            backend="openai", model_id=config.id, device=self.base_url, dtype="server",
            max_image_side=config.max_image_side, batch_images=config.batch_size or config.max_in_flight,
        )  # fmt: skip
        self.timings: dict[str, float] = {"encode": 0.0, "server": 0.0}
        self._pool = ThreadPoolExecutor(max_workers=config.max_in_flight, thread_name_prefix="openai")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: ModelConfig) -> OpenAIEngine:
        engine = cls(config, _api_key(config))
        engine._check_model()
        return engine

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- errors never carry the key -------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    def _check_model(self) -> None:
        """A definite answer that the model is not served is fatal; an unreachable server is not
        (the daemon waits for it, a one-shot run fails at its first request)."""
        try:
            listing = self._request("GET", "/models", None, attempts=1)
        except ServerUnreachable as exc:
            log.warning("%s; will keep trying", exc)
            return
        except EngineError as exc:
            raise ModelUnavailable(str(exc)) from None
        served = [str(item.get("id")) for item in listing.get("data", []) if isinstance(item, dict)]
        if served and self.config.id not in served:
            raise ModelUnavailable(
                f"model {self.config.id!r} is not served by {self.base_url} (it serves: {', '.join(served)}); "
                "set model.id to the served model name"
            )
        log.info("using model %s at %s", self.config.id, self.base_url)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, attempts: int | None = None) -> Any:
        """One HTTP call with retries (exponential backoff and jitter) on connection errors, timeouts and 5xx."""
        attempts = self.config.retries + 1 if attempts is None else attempts
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode() if body is not None else None
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30) * (0.5 + random.random()))
            request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_seconds) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace")[:500]
                if exc.code < 500:
                    raise self._client_error(exc.code, text) from None
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = str(reason) if str(reason) else type(exc).__name__
            except json.JSONDecodeError:
                problem = "the answer was not JSON"
        raise ServerUnreachable(
            self._redact(f"server {self.base_url} unreachable after {attempts} attempt(s): {problem}")
        )

    def _client_error(self, status: int, text: str) -> EngineError:
        try:
            detail = json.loads(text).get("error", text)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, AttributeError):
            detail = text
        detail = self._redact(str(detail)).strip() or "no details"
        if status in (401, 403):
            where = self.config.api_key_env or self.config.api_key_file or "model.api_key_env"
            return EngineError(f"server {self.base_url} refused the API key (HTTP {status}); check {where}")
        if status == 404:
            return EngineError(
                f"server {self.base_url}: model {self.config.id!r} or endpoint not found (HTTP 404): {detail}"
            )
        if status == 413:
            return EngineError(f"server {self.base_url}: image too large for the server (HTTP 413)")
        return EngineError(f"server {self.base_url} rejected the request (HTTP {status}): {detail}")

    # --- describing -------------------------------------------------------------------------------

    def describe(self, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[list[Answer]]:
        started = time.perf_counter()
        urls = [self._data_url(job.image) for job in jobs]
        self.timings["encode"] += time.perf_counter() - started
        # Back to back per image, in order: the server's prefix cache sees an image's prompts together.
        futures = [
            self._pool.submit(self._complete, url, prompt, cancel)
            for job, url in zip(jobs, urls, strict=True)
            for prompt in job.prompts
        ]
        flat = [future.result() for future in futures]
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        self.timings["server"] += time.perf_counter() - started
        answers = iter(flat)
        return [[next(answers) for _ in job.prompts] for job in jobs]

    def _data_url(self, image: Image.Image) -> str:
        """The upright, RGB image as a lossless PNG: the server sees what the in-process model would.

        JPEGs arrive already drafted to about `max_image_side`; only much larger pictures (a 50 MP PNG
        or TIFF) are scaled down, to keep requests to a few MB.
        """
        cap = 4 * self.config.max_image_side
        if max(image.size) > cap:
            image = image.copy()
            image.thumbnail((cap, cap), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def _complete(self, url: str, prompt: Prompt, cancel: threading.Event | None) -> Answer:
        if cancel is not None and cancel.is_set():
            return Answer("", 0, 0, 0.0)
        messages: list[dict[str, Any]] = []
        if prompt.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt.text},
        ]})  # fmt: skip
        body = {"model": self.config.id, "messages": messages, "max_tokens": prompt.max_new_tokens, "temperature": 0}
        started = time.perf_counter()
        reply = self._request("POST", "/chat/completions", body)
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"server {self.base_url}: unexpected answer: {str(reply)[:200]}") from None
        usage = reply.get("usage") or {}
        return Answer(
            text=str(text),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            new_tokens=int(usage.get("completion_tokens") or 0),
            seconds=time.perf_counter() - started,
        )
