"""Where a model's files come from: a local folder, the Hugging Face cache, or the hub (downloaded once).

A hub id is loaded from the local cache first, without touching the network: a daemon starts at boot
before the network is up, and a model that is there is used as it is (it is never updated behind the
user's back; `revision` pins another). Only a model that is not cached is downloaded, and only after a
quick probe says the hub answers: a machine without network gets one clear line in seconds, not minutes
of download retries.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from autocaption.config import ModelConfig
from autocaption.errors import ModelUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
# (where, local_files_only) -> the loaded thing; raises OSError/ValueError when the files are not usable.
Loader = Callable[[str, bool], T]
PROBE_SECONDS = 5.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def load(model: ModelConfig, loader: Loader[T]) -> T:
    """Run `loader` on the model's files: a local folder, else the cache, else (if allowed and reachable)
    the hub. Raises ModelUnavailable with one line that says what to do."""
    route_library_logs()
    local = Path(os.path.expanduser(model.id))
    if local.is_dir():
        try:
            return loader(str(local), True)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"model.id: {model.id}: not a usable model folder ({exc})") from None
    if model.id.startswith(("/", "./", "../", "~")) or local.exists():
        raise ModelUnavailable(f"model.id: {model.id}: no such model folder")
    try:
        return loader(model.id, True)  # the cache: no network at all
    except (OSError, ValueError) as exc:
        log.debug("model %s is not (completely) in the cache: %s", model.id, exc)
    if model.local_files_only or offline():
        raise ModelUnavailable(
            f"model {model.id!r} is not in the local cache ({cache_dir()}) and downloading is off "
            "(model.local_files_only or HF_HUB_OFFLINE). Put a local model folder in model.id, or allow "
            "the download once."
        )
    problem = hub_problem()
    if problem:
        raise ModelUnavailable(
            f"model {model.id!r} is not in the local cache ({cache_dir()}) and {endpoint()} cannot be reached "
            f"({problem}). Put a local model folder in model.id, or run once with network access so it is "
            "downloaded into the cache."
        )
    log.info("downloading model %s into %s (once)", model.id, cache_dir())
    try:
        return loader(model.id, False)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model {model.id!r} cannot be downloaded ({type(exc).__name__}: {exc})") from None


def listed_weights(model_id: str, revision: str) -> int | None:
    """Bytes of a hub checkpoint's weights as the hub lists them, asked before any weight is downloaded: the
    safetensors index (a few kilobytes, kept in the cache like any file of the model), else the size the hub
    gives for a single `model.safetensors` (one HEAD request). None when the hub says neither."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = hf_hub_download(model_id, "model.safetensors.index.json", revision=revision)
        return int(json.loads(Path(index).read_text(encoding="utf-8"))["metadata"]["total_size"])
    except EntryNotFoundError:
        pass  # a checkpoint of one file
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("%s: no size from its safetensors index: %s", model_id, exc)
        return None
    try:
        return get_hf_file_metadata(hf_hub_url(model_id, "model.safetensors", revision=revision)).size
    except (OSError, ValueError) as exc:
        log.debug("%s: no size for model.safetensors: %s", model_id, exc)
        return None


def offline() -> bool:
    """HF_HUB_OFFLINE: the person said no network."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(home(), "hub")


def home() -> str:
    """HF_HOME as huggingface_hub takes it: the variable, else the XDG cache's huggingface folder."""
    return os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )


def hub_problem(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the hub cannot be reached (one request, no retries), or None when it answers at all."""
    request = urllib.request.Request(endpoint() + "/api/models?limit=1", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (rate limits, auth): the download will say what is wrong
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(getattr(reason, "strerror", None) or reason)


def route_library_logs() -> None:
    """transformers and huggingface_hub print through handlers of their own (and huggingface_hub also
    propagates: every warning twice). Send both through autocaption's handler only: one line each."""
    for name in ("transformers", "huggingface_hub"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
