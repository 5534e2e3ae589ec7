"""The JSON sidecar `<image file name>.json`: every answer, what produced it, and for which bytes.

Schema "autocaption/1" (documented in the README):
    {"schema": "autocaption/1",
     "image": {"file", "sha256", "width", "height", "format", "size", "mtime_ns"},
     "model": {"id", "dtype", "device", "backend"},
     "rules": {"<rule name>": {"prompt", "system", "answer", "tokens": {"prompt", "answer"},
                               "seconds", "created", "fingerprint", "model"}},
     "written": {"file", "xmp_sidecar", "description", "keywords", "reason", "sha256"}}
A re-run replaces the entries of the rules it ran and keeps every other rule's entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autocaption.atomic import write_atomic
from autocaption.config import Rule
from autocaption.engine.base import Answer, EngineInfo
from autocaption.errors import WriteError
from autocaption.images import Picture
from autocaption.paths import display
from autocaption.writers.metadata import WriteRecord

SCHEMA = "autocaption/1"
log = logging.getLogger(__name__)


def sidecar_path(image: Path) -> Path:
    return image.with_name(image.name + ".json")


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    prompt: str  # rendered
    answer: str  # cleaned
    raw: Answer


def read(image: Path) -> dict[str, Any] | None:
    """The existing sidecar, or None when there is none or it is not ours/readable."""
    path = sidecar_path(image)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: existing sidecar is unreadable and will be replaced (%s)", display(path), exc)
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    return data


def is_current(existing: Mapping[str, Any] | None, stat: os.stat_result, rules: Iterable[Rule]) -> bool:
    """True when the sidecar already answers every rule, as configured now, for this very file."""
    if existing is None:
        return False
    image = existing.get("image", {})
    if image.get("size") != stat.st_size or image.get("mtime_ns") != stat.st_mtime_ns:
        return False
    done = existing.get("rules", {})
    return all(done.get(rule.name, {}).get("fingerprint") == rule.fingerprint for rule in rules)


def build(
    image: Path,
    picture: Picture,
    stat: os.stat_result,
    engine: EngineInfo,
    results: Iterable[RuleResult],
    existing: Mapping[str, Any] | None,
    written: WriteRecord | None = None,
) -> dict[str, Any]:
    """The new sidecar document: this run's answers merged over the entries of other rules."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rules: dict[str, Any] = dict(existing.get("rules", {})) if existing else {}
    for result in results:
        rules[result.rule.name] = {
            "prompt": result.prompt,
            "system": result.rule.system,
            "answer": result.answer,
            "tokens": {"prompt": result.raw.prompt_tokens, "answer": result.raw.new_tokens},
            "seconds": round(result.raw.seconds, 3),
            "created": now,
            "fingerprint": result.rule.fingerprint,
            "model": engine.model_id,
        }
    after = written.stat if written and written.stat else stat  # the file as it is now, for skip checks
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "image": {
            "file": image.name,
            "sha256": picture.sha256,
            "width": picture.width,
            "height": picture.height,
            "format": picture.format,
            "size": after.st_size,
            "mtime_ns": after.st_mtime_ns,
        },
        "model": {"id": engine.model_id, "dtype": engine.dtype, "device": engine.device, "backend": engine.backend},
        "rules": rules,
    }
    if written is not None:
        document["written"] = {**written.as_json(), "sha256": written.sha256}
    return document


def write(image: Path, document: Mapping[str, Any]) -> Path:
    path = sidecar_path(image)
    data = (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise WriteError(f"{display(path)}: cannot write sidecar: {exc.strerror or exc}") from None
    return path


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rename_image(image: Path) -> None:
    """After a move, the JSON sidecar that came along names the new file."""
    document = read(image)
    if document is None or document.get("image", {}).get("file") == image.name:
        return
    document["image"]["file"] = image.name
    try:
        write(image, document)
    except WriteError as exc:
        log.warning("%s", exc)
