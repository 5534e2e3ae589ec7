"""The JSON sidecar `<image file name>.json`: every answer, what produced it, and for which bytes.

Schema "autocaption/1" (documented in docs/metadata.md):
    {"schema": "autocaption/1",
     "image": {"file", "sha256", "width", "height", "format", "size", "mtime_ns",
               "place" (where it was taken, when a rule or output.location named it: city, region, country...)},
     "model": {"id", "dtype", "device", "backend"},
     "rules": {"<rule name>": {"prompt", "system", "answer", "tokens": {"prompt", "answer"},
                               "seconds", "created", "fingerprint", "model",
                               "value" (choice/list/json rules: the answer as a value),
                               "skipped" (a `when:` rule not asked: why)}},
     "written": {"file", "xmp_sidecar", "description", "keywords", "reason", "sha256",
                 "texts" (title, alt_text..., "description (de)", location: what happened to each)}}
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
from autocaption.paths import display, text
from autocaption.writers.metadata import WriteRecord

SCHEMA = "autocaption/1"
EDITED_RULE = "~edited"  # the journal's answers row of a person's correction (journal.EDITED)
ALTERNATE_SUFFIX = ".autocaption.json"
log = logging.getLogger(__name__)


def sidecar_path(image: Path) -> Path:
    """Where autocaption's results for `image` normally go: `<image file name>.json`."""
    return image.with_name(image.name + ".json")


def alternate_path(image: Path) -> Path:
    """Where they go when `<image file name>.json` belongs to another program (Google Takeout writes
    `IMG_1.jpg.json` with the person's description, places and people): `<image file name>.autocaption.json`."""
    return image.with_name(image.name + ALTERNATE_SUFFIX)


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    prompt: str  # rendered
    answer: str  # cleaned (a structured answer: its value as text, `shown`)
    raw: Answer
    value: Any = None  # a structured answer's value: the option, the list of items, the JSON value

    @property
    def skipped(self) -> str | None:
        """Not asked: why (its gate's answer did not admit it)."""
        return self.raw.skipped


@dataclass(frozen=True)
class Sidecar:
    """Where the JSON sidecar of an image is (or will be written), and its document when it is ours."""

    path: Path
    document: dict[str, Any] | None = None
    # Why the usual name is not used: the file there is not ours (another program's JSON, or one of the
    # wrong shape). It is never overwritten; the writer says so once, when it writes ours beside it.
    foreign: str | None = None

    def notice(self) -> str | None:
        if self.foreign is None:
            return None
        usual = display(self.path.with_name(self.path.name.removesuffix(ALTERNATE_SUFFIX) + ".json"))
        return f"{usual}: {self.foreign}; left as it is, autocaption's results go to {self.path.name}"


def locate(image: Path) -> Sidecar:
    """Our sidecar for `image`: under its usual name, or beside a file there that is not ours."""
    alternate = alternate_path(image)
    document, _ = _load(alternate)
    if document is not None:
        return Sidecar(alternate, document)
    primary = sidecar_path(image)
    document, problem = _load(primary)
    if problem is None:
        return Sidecar(primary, document)
    return Sidecar(alternate, foreign=problem)


def read(image: Path) -> dict[str, Any] | None:
    """Our existing sidecar document for `image`, or None."""
    return locate(image).document


def _load(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(our document, None); (None, None) when there is no file to protect; (None, why) when the file
    exists but is not ours to replace."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        # A folder in its place, or no permission: writing there will fail and say so; nothing to protect.
        log.debug("%s: %s", display(path), exc)
        return None, None
    except UnicodeDecodeError:
        return None, "not a JSON file of autocaption's (not UTF-8 text)"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({exc}), so not autocaption's"
    problem = _shape_problem(data)
    return (None, problem) if problem else (data, None)


def _shape_problem(data: object) -> str | None:
    """Why `data` is not an autocaption/1 document we can build on, or None."""
    if not isinstance(data, dict) or "schema" not in data:
        return "belongs to another program (not an autocaption sidecar)"
    if data["schema"] != SCHEMA:
        return f"has schema {data['schema']!r}, not {SCHEMA!r}"
    image, rules, written = data.get("image"), data.get("rules"), data.get("written")
    if not isinstance(image, dict) or not all(isinstance(image.get(k), int) for k in ("size", "mtime_ns")):
        return "is an autocaption sidecar of the wrong shape (image is not an object with size and mtime_ns)"
    if not isinstance(rules, dict) or not all(isinstance(entry, dict) for entry in rules.values()):
        return "is an autocaption sidecar of the wrong shape (rules is not an object of rule entries)"
    if written is not None and not isinstance(written, dict):
        return "is an autocaption sidecar of the wrong shape (written is not an object)"
    return None


def is_current(
    existing: Mapping[str, Any] | None, stat: os.stat_result, rules: Iterable[Rule], model_id: str | None = None
) -> bool:  # fmt: skip
    """True when the sidecar already answers every rule, as configured now (and by `model_id`, when given: a
    new model's answers are not the old one's), for this very file."""
    if existing is None:
        return False
    image = existing["image"]
    if image.get("size") != stat.st_size or image.get("mtime_ns") != stat.st_mtime_ns:
        return False
    done = existing["rules"]
    return all(
        done.get(rule.name, {}).get("fingerprint") == rule.fingerprint
        and (model_id is None or done[rule.name].get("model") == model_id)
        for rule in rules
    )


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
        if result.rule.structure is not None and result.skipped is None:
            rules[result.rule.name]["value"] = result.value  # a list as a list, JSON as JSON
        if result.skipped is not None:
            rules[result.rule.name]["skipped"] = result.skipped
    after = written.stat if written and written.stat else stat  # the file as it is now, for skip checks
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "image": {
            "file": text(image.name),  # JSON is UTF-8: a name that is not UTF-8 shows its bytes as \\xff
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
    if existing and existing.get("edited") and picture.sha256 in _described(existing):
        document["edited"] = existing["edited"]  # a person's correction of this photo outlives new answers
    return document


def _described(document: Mapping[str, Any]) -> set[str]:
    """The contents a document's results are for: the bytes described, and the bytes after our write."""
    return {str(digest) for digest in (document["image"].get("sha256"), (document.get("written") or {}).get("sha256"))
            if digest}  # fmt: skip


def describes(document: Mapping[str, Any] | None, digest: str) -> bool:
    """The document holds results for exactly these bytes (as described, or as written)."""
    return document is not None and digest in _described(document)


def edited_text(document: Mapping[str, Any] | None) -> str | None:
    """A person's correction as one searchable text: its description on the first line (empty when they only
    changed keywords), its keywords on the second; None without one."""
    edited = (document or {}).get("edited")
    if not isinstance(edited, dict):
        return None
    keywords = edited.get("keywords")
    keywords = keywords if isinstance(keywords, list) else []
    return f"{edited.get('description') or ''}\n{', '.join(str(word) for word in keywords)}"


def write(target: Sidecar, document: Mapping[str, Any]) -> Path:
    data = (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    try:
        write_atomic(target.path, data)
    except OSError as exc:
        raise WriteError.from_os(f"{display(target.path)}: cannot write sidecar", exc) from None
    return target.path


def unwritten(existing: Mapping[str, Any], image: Path, settings: str | None = None) -> str | None:
    """Why the answers recorded in a current sidecar are not (all) in the photo or its XMP sidecar, or None:
    the write into the photo failed (disk full...), or the XMP sidecar it went to is gone. Such a photo
    needs its answers written again, not the model run again."""
    written = existing.get("written") or {}
    if written.get("file") == "failed":
        return "the earlier write into the photo failed"
    if settings is not None and written.get("settings") not in (None, settings):
        return "the output settings changed since (output:, a rule's write:)"
    xmp = xmp_sidecar_of(existing, image)
    if xmp is not None and not xmp.exists():
        return f"its XMP sidecar {display(xmp.name)} is missing"
    return None


def xmp_sidecar_of(existing: Mapping[str, Any], image: Path) -> Path | None:
    """The XMP sidecar the recorded answers went to, if any. The record holds its name as text (`text`): for
    a photo whose name is not UTF-8 the real name is the one of the photo's two sidecar spellings that reads
    as the record."""
    recorded = (existing.get("written") or {}).get("xmp_sidecar")
    if not isinstance(recorded, str) or not recorded:
        return None
    spellings = (image.name + ".xmp", image.stem + ".xmp")
    return image.with_name(next((name for name in spellings if text(name) == recorded), recorded))


def results_of(existing: Mapping[str, Any], rules: Iterable[Rule]) -> tuple[RuleResult, ...]:
    """The recorded answers of `rules` (the sidecar is current for them), to write them again."""
    results = []
    for rule in rules:
        entry = existing["rules"][rule.name]
        tokens = entry.get("tokens") or {}
        answer = str(entry.get("answer") or "")
        reason = entry.get("skipped") if isinstance(entry.get("skipped"), str) else None
        raw = Answer(answer, int(tokens.get("prompt") or 0), int(tokens.get("answer") or 0), 0.0, skipped=reason)
        results.append(RuleResult(rule, str(entry.get("prompt") or ""), answer, raw, entry.get("value")))
    return tuple(results)


def with_edit(
    existing: Mapping[str, Any], description: str | None, keywords: Iterable[str], written: WriteRecord,
    stat: os.stat_result, alt_text: str | None = None, changed: Iterable[str] = (),
) -> dict[str, Any]:  # fmt: skip
    """The sidecar after a person corrected the caption (the review page): their text under "edited" (None: they
    kept the description the photo had), the model's answers kept as they were under "rules". `changed`: the
    fields the person wrote, added to those of earlier corrections (what is written again should the photo
    lose them: its XMP sidecar deleted)."""
    document = with_written(existing, written, stat)
    previous = existing.get("edited")
    previous = previous if isinstance(previous, dict) else {}
    edited: dict[str, Any] = {
        "description": description,
        "keywords": list(keywords),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    alt = alt_text if alt_text is not None else previous.get("alt_text")
    if alt is not None:
        edited["alt_text"] = alt
    edited["changed"] = sorted(set(previous.get("changed") or ()) | set(changed))
    document["edited"] = edited
    return document


def with_written(existing: Mapping[str, Any], written: WriteRecord, stat: os.stat_result) -> dict[str, Any]:
    """The sidecar after its recorded answers were written again: the same answers, the new record."""
    document = dict(existing)
    document["image"] = {**existing["image"], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    # Not rewritten this time (its XMP sidecar took it): the photo's bytes are what they were.
    before = (existing.get("written") or {}).get("sha256") or existing["image"].get("sha256")
    settings = (existing.get("written") or {}).get("settings")  # how they were written: unchanged by a rewrite
    document["written"] = {**written.as_json(), "sha256": written.sha256 or before, "settings": settings}
    return document


def recorded(document: Mapping[str, Any], rules: Iterable[Rule]) -> tuple[dict[str, str | None], str | None]:
    """What the journal keeps of a current sidecar: the rules' answers and a person's correction (for search),
    and the content hash of the photo as it is now (for moves)."""
    texts: dict[str, str | None] = {
        rule.name: str(document["rules"].get(rule.name, {}).get("answer") or "") for rule in rules
    }
    texts[EDITED_RULE] = edited_text(document)
    digest = (document.get("written") or {}).get("sha256") or document["image"].get("sha256")
    return texts, digest if isinstance(digest, str) else None


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rename_image(image: Path) -> None:
    """After a move, the JSON sidecar that came along names the new file."""
    found = locate(image)
    if found.document is None or found.document["image"].get("file") == text(image.name):
        return
    found.document["image"]["file"] = text(image.name)
    try:
        write(found, found.document)
    except WriteError as exc:
        log.warning("%s", exc)
