"""The YAML configuration, parsed once and strictly into immutable, typed objects.

Unknown keys, wrong types and out-of-range values are errors that name the file, the line and the
key path (`rules.yaml:14: rules[2].prompt: required`). Nothing else in autocaption reads YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from autocaption.errors import ConfigError
from autocaption.globs import GlobSet, check_pattern
from autocaption.paths import display, expand
from autocaption.placeholders import PromptTemplate, TemplateError
from autocaption.structure import (
    Choice,
    Gate,
    JsonAnswer,
    Keywords,
    Structure,
    Term,
    closed,
    grammar_problem,
    unsupported,
    vocabulary_lines,
    vocabulary_problem,
)

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
DEFAULT_INCLUDE = (
    "**/*.jpg", "**/*.jpeg", "**/*.png", "**/*.webp", "**/*.tif", "**/*.tiff",
    "**/*.heic", "**/*.heif", "**/*.gif", "**/*.bmp",
)  # fmt: skip
# Hidden folders (.thumbnails, .git, darktable's caches) and our own temp files are never images to describe.
DEFAULT_EXCLUDE = ("**/.*/**", "**/.*")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = ("auto", "float16", "bfloat16", "float32")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
ENGINES = ("transformers", "openai")
WRITE_TARGETS = ("description", "keywords", "title", "alt_text", "extended_description")
# A language tag as XMP's xml:lang takes it (BCP 47): "de", "pt-BR", "zh-Hant".
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
SIDECAR_MODES = ("auto", "always", "never")
SIDECAR_NAMES = ("full", "stem")
EXISTING_POLICIES = ("keep", "overwrite", "append")


@dataclass(frozen=True)
class ModelConfig:
    engine: str = "transformers"  # "transformers" (in-process) or "openai" (a remote OpenAI-compatible server)
    id: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None  # prompts decoded together; None ("auto"): from free GPU memory
    attn_implementation: str = "sdpa"
    local_files_only: bool = False
    # Prompts of one image reuse its prefill (vision tower + prompt up to the image) instead of paying again.
    share_prefix: bool = True
    max_batch_tokens: int = 16384  # image + prompt tokens prefilled in one forward pass (GPU memory)
    # Speed/quality options, off by default: fewer anyres tiles ([[336, 672], [672, 336]] is ~41% fewer
    # image tokens for a 4:3 photo), and torch.compile of the decode step on GPU (recompiles per shape).
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    compile: bool = False  # torch.compile the decode step (inductor: GPU and CPU), cached under state.dir
    graphs: bool = True  # on a GPU, run each decode step as one captured CUDA/HIP graph
    # engine: openai. The key is read from an environment variable or a file, never from this file.
    # One server, or several: each photo's requests all go to one of them, chosen by the photo's content
    # (engine/servers.py), the next one when it is down.
    base_url: str | tuple[str, ...] | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    timeout_seconds: float = 120.0
    max_in_flight: int = 8
    retries: int = 4  # attempts after the first, with exponential backoff and jitter (1, 2, 4, 8 s...)
    max_image_side: int = 1008  # JPEGs are drafted to no less than this before being sent

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The servers' URLs (`base_url`: one, or a list)."""
        return (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url or ())


@dataclass(frozen=True)
class ImagesConfig:
    # 200 MP admits every current camera (Fujifilm GFX 100 is 102 MP) and stops decompression bombs.
    max_pixels: int = 200_000_000
    # JPEGs larger than the model can use are decoded smaller (DCT scaling), never below what its processor
    # needs; false decodes every photo at full size.
    draft: bool = True


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    recursive: bool = True
    include: GlobSet = field(default_factory=lambda: GlobSet.of(DEFAULT_INCLUDE))
    exclude: GlobSet = field(default_factory=lambda: GlobSet.of(DEFAULT_EXCLUDE))
    settle_seconds: float = 2.0  # quiet time before a new file is taken
    polling: str = "auto"  # "auto" (poll network shares), "yes", "no"
    poll_seconds: float = 30.0


@dataclass(frozen=True)
class DaemonConfig:
    reconcile_minutes: float = 60.0  # full rescan of the watched folders, besides start and overflows
    redo_stale: bool = False  # re-describe images whose rules or model changed since they were done
    max_attempts: int = 5  # transient failures (GPU out of memory, file busy, server down)
    retry_seconds: float = 30.0  # first retry delay; doubles each attempt, at most an hour


@dataclass(frozen=True)
class StateConfig:
    dir: Path


@dataclass(frozen=True)
class OutputConfig:
    embed: bool = True  # write into JPEG/PNG/WebP files themselves (EXIF + XMP)
    xmp_sidecar: str = "auto"  # auto: only when the file itself cannot carry the caption
    sidecar_name: str = "full"  # full: IMG_1.jpg.xmp (digiKam, darktable, Immich); stem: IMG_1.xmp (Lightroom)
    existing: str = "keep"  # a person's caption: keep, overwrite or append to it
    location: bool = False  # write the place named from GPS into the location fields where the photo has none


@dataclass(frozen=True)
class Rule:
    name: str
    prompt: PromptTemplate
    match: GlobSet = field(default_factory=lambda: GlobSet.of(["**/*"]))
    max_new_tokens: int = 200
    system: str | None = None
    # Opt-in clean-up: leading phrases to drop from the answer ("This image shows").
    strip_prefixes: tuple[str, ...] = ()
    write: frozenset[str] = frozenset()  # "description", "keywords", "title"...: where the answer goes in the photo
    language: str | None = None  # the answer is this language's alternative of its texts ("de")
    structure: Structure | None = None  # `choice`, `list` or `json`: what the answer may be (structure.py)
    when: Gate | None = None  # runs only when another rule's answer is one of these
    # Where `system:` is written ("rules.yaml:12: rules[1].system"), for errors found once the model is known.
    system_where: str = field(default="", compare=False)

    @property
    def fingerprint(self) -> str:
        """Changes whenever anything that shapes this rule's answer changes."""
        shape: list[object] = [self.prompt.source, self.system, self.max_new_tokens, list(self.strip_prefixes)]
        if self.structure is not None or self.when is not None:  # (fingerprints of free-text rules unchanged)
            shape += [self.structure.shape() if self.structure else None,
                      [self.when.rule, list(self.when.values)] if self.when else None]  # fmt: skip
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UserPath:
    """A path written with `~` or `$VARS`: it means another folder for another user (a system service)."""

    where: str  # "rules.yaml:5: watch[0].path"
    written: str  # "~/Pictures"
    expanded: Path  # what it means for the user who read the config


@dataclass(frozen=True)
class Config:
    source: Path
    model: ModelConfig
    images: ImagesConfig
    output: OutputConfig
    watch: tuple[WatchConfig, ...]
    state: StateConfig
    daemon: DaemonConfig
    rules: tuple[Rule, ...]
    user_paths: tuple[UserPath, ...] = ()

    def fingerprint(self, rules: tuple[Rule, ...]) -> str:
        """What produced an image's result and how it was written: its rules, the model and the output
        settings. Stored in the journal (`process --stale`, `daemon.redo_stale`)."""
        shape = [self.model.id, self.model.revision, sorted(rule.name + ":" + rule.fingerprint for rule in rules),
                 self.writing(rules)]  # fmt: skip
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def writing(self, rules: tuple[Rule, ...]) -> str:
        """How answers go into a photo: the output settings and what each rule writes. A change is done by
        writing the recorded answers again, without the model."""
        output = self.output
        shape: list[object] = [output.embed, output.xmp_sidecar, output.sidecar_name, output.existing,
                               sorted((rule.name, sorted(rule.write)) for rule in rules)]  # fmt: skip
        if output.location or any(rule.language for rule in rules):  # (earlier configs' fingerprints unchanged)
            shape += [output.location, [rule.language for rule in rules]]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def rules_for(self, relative: str) -> tuple[Rule, ...]:
        """The rules whose `match` selects this path (relative to its watched or given folder)."""
        return tuple(rule for rule in self.rules if rule.match.matches(relative))


T = TypeVar("T")


class _Node:
    """A YAML node with its key path, so every error can say where it is."""

    def __init__(self, node: yaml.Node, path: str, source: Path) -> None:
        self.node, self.path, self.source = node, path, source

    @property
    def where(self) -> str:
        """ "rules.yaml:14: rules[2].prompt" (the file and line alone for the top level)."""
        line = self.node.start_mark.line + 1
        return f"{display(self.source)}:{line}" + (f": {self.path}" if self.path else "")

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")

    def _child_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def mapping(self, allowed: Mapping[str, bool]) -> dict[str, _Node]:
        """The keys of a mapping; `allowed` maps each key to whether it is required."""
        if self.node.tag == "tag:yaml.org,2002:null":
            items: list[tuple[yaml.Node, yaml.Node]] = []
        elif isinstance(self.node, yaml.MappingNode):
            items = self.node.value
        else:
            raise self.fail("expected a mapping of keys to values")
        result: dict[str, _Node] = {}
        for key_node, value_node in items:
            key = str(key_node.value)
            child = _Node(value_node, self._child_path(key), self.source)
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise _Node(key_node, self._child_path(key), self.source).fail(f"unknown key (known: {known})")
            if key in result:
                raise child.fail("key given twice")
            result[key] = child
        for key, required in allowed.items():
            if required and key not in result:
                raise _Node(self.node, self._child_path(key), self.source).fail("required")
        return result

    def sequence(self) -> list[_Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail("expected a list")
        return [_Node(item, f"{self.path}[{i}]", self.source) for i, item in enumerate(self.node.value)]

    def _scalar(self, tag: str, what: str) -> object:
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag != tag:
            raise self.fail(f"expected {what}, got {self.node.tag.rsplit(':', 1)[-1]} {self._shown()}")
        return yaml.SafeLoader("").construct_object(self.node)

    def _shown(self) -> str:
        value = getattr(self.node, "value", "")
        return repr(value) if isinstance(value, str) else "(a list or mapping)"

    def text(self, *, allow_empty: bool = False) -> str:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag in (
            "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
        ):  # fmt: skip
            value = str(self.node.value)  # `id: 2024` is a fine folder or model name
        else:
            value = str(self._scalar("tag:yaml.org,2002:str", "text"))
        if not allow_empty and not value.strip():
            raise self.fail("must not be empty")
        return value

    def spelled(self) -> str:
        """A scalar as written: `yes`, `no`, `on` and `3` are answers a model can give, not YAML's booleans
        and numbers (`choice: [yes, no]`)."""
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag in (
            "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
        ):  # fmt: skip
            return str(self.node.value)
        return self.text()

    def spellings(self) -> tuple[str, ...]:
        if isinstance(self.node, yaml.ScalarNode):
            return (self.spelled(),)
        return tuple(item.spelled() for item in self.sequence())

    def number(self, *, minimum: float) -> float:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:int":
            value = float(self.integer(minimum=0))
        else:
            value = float(self._scalar("tag:yaml.org,2002:float", "a number"))  # type: ignore[arg-type]
        if value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}")
        return value

    def integer(self, *, minimum: int, maximum: int | None = None) -> int:
        value = self._scalar("tag:yaml.org,2002:int", "a whole number")
        assert isinstance(value, int)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.fail(f"must be {bound}, got {value}")
        return value

    def boolean(self) -> bool:
        return bool(self._scalar("tag:yaml.org,2002:bool", "true or false"))

    def choice(self, options: tuple[str, ...]) -> str:
        value = self.text()
        if value in options or ("cuda:N" in options and _is_cuda_index(value)):
            return value
        raise self.fail(f"must be one of {', '.join(options)}; got {value!r}")

    def texts(self) -> tuple[str, ...]:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag == "tag:yaml.org,2002:str":
            return (self.text(),)  # a single pattern is a list of one
        return tuple(item.text() for item in self.sequence())

    def globs(self) -> GlobSet:
        patterns = self.texts()
        for i, pattern in enumerate(patterns):
            problem = check_pattern(pattern)
            if problem:
                raise _Node(self.node, f"{self.path}[{i}]", self.source).fail(f"{problem}: {pattern!r}")
        return GlobSet.of(patterns)


_VARIABLE = re.compile(r"\$(\w+|\{([^}]*)\})")


def _path(node: _Node, base: Path, user_paths: list[UserPath]) -> Path:
    """A path: `~` and `$VARS` expanded (an unset variable is an error, not a literal folder name),
    relative paths taken from the config file's folder. Paths that depend on the user are remembered."""
    text = node.text()
    for match in _VARIABLE.finditer(text):
        name = match.group(2) if match.group(2) is not None else match.group(1)
        if name not in os.environ:
            raise node.fail(f"environment variable ${name} is not set (in {text!r})")
    path = expand(text, relative_to=base)
    if text.startswith("~") or _VARIABLE.search(text):
        user_paths.append(UserPath(node.where, text, path))
    return path


def _is_cuda_index(value: str) -> bool:
    prefix, _, index = value.partition(":")
    return prefix == "cuda" and index.isdigit()


def _optional(keys: dict[str, _Node], name: str, read: Callable[[_Node], T], default: T) -> T:
    """A key's value, or its default when it is left out. An empty value (`compile:` or `null`) stands for
    "none" only where none is what the default means; elsewhere it is a mistake, not the default."""
    node = keys.get(name)
    if node is None:
        return default
    if node.node.tag == "tag:yaml.org,2002:null":
        if default is None or is_dataclass(default) or default == ():  # a section or a list left empty
            return default
        raise node.fail(f"has no value; leave the key out for the default ({_default_text(default)})")
    return read(node)


def _default_text(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    return str(getattr(default, "patterns", default))


def _model(node: _Node, base: Path, user_paths: list[UserPath]) -> ModelConfig:
    # `api_key` is accepted only to be refused with a helpful message below.
    k = node.mapping(dict.fromkeys([*(f.name for f in fields(ModelConfig)), "api_key"], False))
    d = ModelConfig()
    engine = _optional(k, "engine", lambda n: n.choice(ENGINES), d.engine)
    if engine == "openai" and "base_url" not in k:
        raise _Node(node.node, node._child_path("base_url"), node.source).fail("required with engine: openai")
    if "api_key" in k:
        raise k["api_key"].fail("never put a key in this file; use api_key_env or api_key_file")
    if "batch_size" in k and k["batch_size"].node.tag == "tag:yaml.org,2002:null":  # its None is `auto`, said so
        raise k["batch_size"].fail("has no value; write a whole number or auto (or leave the key out: auto)")
    return ModelConfig(
        engine=engine,
        base_url=_optional(k, "base_url", _urls, None),
        api_key_env=_optional(k, "api_key_env", lambda n: n.text(), None),
        api_key_file=_optional(k, "api_key_file", lambda n: _key_file(n, base, user_paths), None),
        timeout_seconds=_optional(k, "timeout_seconds", lambda n: n.number(minimum=1.0), d.timeout_seconds),
        max_in_flight=_optional(k, "max_in_flight", lambda n: n.integer(minimum=1, maximum=256), d.max_in_flight),
        retries=_optional(k, "retries", lambda n: n.integer(minimum=0, maximum=20), d.retries),
        max_image_side=_optional(k, "max_image_side", lambda n: n.integer(minimum=32), d.max_image_side),
        id=_optional(k, "id", lambda n: _model_id(n, user_paths), d.id),
        revision=_optional(k, "revision", lambda n: n.text(), d.revision),
        device=_optional(k, "device", lambda n: n.choice(DEVICES), d.device),
        dtype=_optional(k, "dtype", lambda n: n.choice(DTYPES), d.dtype),
        batch_size=_optional(k, "batch_size", _batch_size, d.batch_size),
        attn_implementation=_optional(k, "attn_implementation", lambda n: n.choice(ATTENTION), d.attn_implementation),
        local_files_only=_optional(k, "local_files_only", _Node.boolean, d.local_files_only),
        share_prefix=_optional(k, "share_prefix", _Node.boolean, d.share_prefix),
        max_batch_tokens=_optional(k, "max_batch_tokens", lambda n: n.integer(minimum=256), d.max_batch_tokens),
        image_grid_pinpoints=_optional(k, "image_grid_pinpoints", _pinpoints, None),
        compile=_optional(k, "compile", _Node.boolean, d.compile),
        graphs=_optional(k, "graphs", _Node.boolean, d.graphs),
    )


def _key_file(node: _Node, base: Path, user_paths: list[UserPath]) -> Path:
    path = _path(node, base, user_paths)
    if not path.is_file():
        raise node.fail(f"no such file: {display(path)}")
    return path


def _model_id(node: _Node, user_paths: list[UserPath]) -> str:
    """A hub id, or a local folder (`~/models/llava`: remembered as depending on the user)."""
    if isinstance(node.node, yaml.ScalarNode) and node.node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        raise node.fail(f"expected a hub id or a model folder, got the number {node.node.value}; "
                        "quote it for a folder of that name")  # fmt: skip
    text = node.text()
    if text.startswith("~"):
        user_paths.append(UserPath(node.where, text, Path(os.path.expanduser(text))))
    return text


def _batch_size(node: _Node) -> int | None:
    if isinstance(node.node, yaml.ScalarNode) and node.node.tag == "tag:yaml.org,2002:str":
        if node.text() != "auto":
            raise node.fail(f"expected a whole number (1 to 256) or auto, got {node.text()!r}")
        return None
    return node.integer(minimum=1, maximum=256)


def _urls(node: _Node) -> tuple[str, ...]:
    """`base_url`: one URL, or a list of them (several servers)."""
    if isinstance(node.node, yaml.ScalarNode):
        return (_url(node),)
    urls = tuple(_url(item) for item in node.sequence())
    if not urls:
        raise node.fail("needs at least one server URL")
    same = [_same_server(url) for url in urls]
    for i, url in enumerate(urls):
        if same[i] in same[:i]:
            raise node.sequence()[i].fail(f"{url} is listed twice")
    return urls


def _same_server(url: str) -> str:
    """A URL as servers tell them apart: scheme and host in any letter case are one."""
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def _url(node: _Node) -> str:
    url = node.text().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise node.fail(f"must be an http:// or https:// URL, e.g. http://gpu-box:8000/v1; got {url!r}")
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:  # never echoed: it holds a secret
        raise node.fail("never put a user or password in the URL; use api_key_env or api_key_file")
    return url


def _pinpoints(node: _Node) -> tuple[tuple[int, int], ...]:
    pairs = []
    for item in node.sequence():
        values = item.sequence()
        if len(values) != 2:
            raise item.fail("each pinpoint is [height, width]")
        pairs.append((values[0].integer(minimum=1), values[1].integer(minimum=1)))
    if not pairs:
        raise node.fail("at least one [height, width] pinpoint is needed")
    return tuple(pairs)


def _images(node: _Node) -> ImagesConfig:
    k = node.mapping({"max_pixels": False, "draft": False})
    return ImagesConfig(
        max_pixels=_optional(k, "max_pixels", lambda n: n.integer(minimum=1), ImagesConfig.max_pixels),
        draft=_optional(k, "draft", _Node.boolean, ImagesConfig.draft),
    )


def _polling(node: _Node) -> str:
    if isinstance(node.node, yaml.ScalarNode) and node.node.tag == "tag:yaml.org,2002:bool":
        return "yes" if node.boolean() else "no"
    return node.choice(("auto",))


def _watch(node: _Node, base: Path, user_paths: list[UserPath]) -> WatchConfig:
    k = node.mapping(
        {"path": True, "recursive": False, "include": False, "exclude": False, "settle_seconds": False,
         "polling": False, "poll_seconds": False}
    )  # fmt: skip
    d = WatchConfig(path=Path())
    return WatchConfig(
        # Resolved once here: watcher events, folder walks and journal keys then all spell every photo's
        # path the same way, even when the configured folder is (or sits under) a symlink.
        path=_path(k["path"], base, user_paths).resolve(),
        recursive=_optional(k, "recursive", _Node.boolean, True),
        include=_optional(k, "include", _Node.globs, GlobSet.of(DEFAULT_INCLUDE)),
        exclude=_optional(k, "exclude", _Node.globs, GlobSet.of(DEFAULT_EXCLUDE)),
        settle_seconds=_optional(k, "settle_seconds", lambda n: n.number(minimum=0.0), d.settle_seconds),
        polling=_optional(k, "polling", _polling, d.polling),
        poll_seconds=_optional(k, "poll_seconds", lambda n: n.number(minimum=0.1), d.poll_seconds),
    )


def _daemon(node: _Node) -> DaemonConfig:
    k = node.mapping(dict.fromkeys(("reconcile_minutes", "redo_stale", "max_attempts", "retry_seconds"), False))
    d = DaemonConfig()
    return DaemonConfig(
        reconcile_minutes=_optional(k, "reconcile_minutes", lambda n: n.number(minimum=0.0), d.reconcile_minutes),
        redo_stale=_optional(k, "redo_stale", _Node.boolean, d.redo_stale),
        max_attempts=_optional(k, "max_attempts", lambda n: n.integer(minimum=1, maximum=100), d.max_attempts),
        retry_seconds=_optional(k, "retry_seconds", lambda n: n.number(minimum=0.0), d.retry_seconds),
    )


def _output(node: _Node) -> OutputConfig:
    k = node.mapping(dict.fromkeys(("embed", "xmp_sidecar", "sidecar_name", "existing", "location"), False))
    d = OutputConfig()
    return OutputConfig(
        embed=_optional(k, "embed", _Node.boolean, d.embed),
        xmp_sidecar=_optional(k, "xmp_sidecar", lambda n: n.choice(SIDECAR_MODES), d.xmp_sidecar),
        sidecar_name=_optional(k, "sidecar_name", lambda n: n.choice(SIDECAR_NAMES), d.sidecar_name),
        existing=_optional(k, "existing", lambda n: n.choice(EXISTING_POLICIES), d.existing),
        location=_optional(k, "location", _Node.boolean, d.location),
    )


def _targets(node: _Node) -> frozenset[str]:
    targets = node.texts()
    for i, target in enumerate(targets):
        if target not in WRITE_TARGETS:
            raise _Node(node.node, f"{node.path}[{i}]", node.source).fail(
                f"must be one of {', '.join(WRITE_TARGETS)}; got {target!r}"
            )
        if target in targets[:i]:
            raise _Node(node.node, f"{node.path}[{i}]", node.source).fail(f"{target} is listed twice")
    return frozenset(targets)


def _language(node: _Node) -> str:
    value = node.text()
    if value.casefold() == "x-default" or not _LANGUAGE.fullmatch(value):
        raise node.fail(f"must be a language tag such as de, fr or pt-BR; got {value!r}")
    return value


def _template(node: _Node) -> PromptTemplate:
    try:
        return PromptTemplate.parse(node.text())
    except TemplateError as exc:
        raise node.fail(str(exc)) from None


STRUCTURES = ("choice", "list", "json")
# The review page's own query parameters: a choice or list rule's name is one too (`?blurry=yes`).
RESERVED = frozenset({"q", "rule", "folder", "status", "page", "per_page", "after", "token"})


def _rule(node: _Node, base: Path) -> Rule:
    k = node.mapping(
        {"name": True, "prompt": True, "match": False, "max_new_tokens": False, "system": False,
         "strip_prefixes": False, "write": False, "choice": False, "list": False, "json": False, "when": False,
         "language": False}
    )  # fmt: skip
    name = k["name"].text()
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        raise k["name"].fail(f"use letters, digits, '-', '_' or '.' only; got {name!r}")
    given = [key for key in STRUCTURES if key in k]
    if len(given) > 1:
        raise k[given[1]].fail(f"a rule answers in one structure; {given[0]} is given too")
    structure: Structure | None = None
    if given:
        kind = given[0]
        structure = _choice(k[kind]) if kind == "choice" else _keywords(k[kind], base) if kind == "list" else (
            _json(k[kind], base))  # fmt: skip
        if "strip_prefixes" in k:
            raise k["strip_prefixes"].fail(f"applies to free-text answers; a {given[0]} answer has no prefix")
    if "when" in k and k["when"].node.tag == "tag:yaml.org,2002:null":
        raise k["when"].fail("has no value; write {rule: NAME, is: ANSWER} (or leave the key out)")
    if isinstance(structure, (Choice, Keywords)) and name in RESERVED:
        raise k["name"].fail(f"{name!r} is a parameter of the review page's addresses, where a choice or list "
                             "rule's name filters by its answer; choose another name")  # fmt: skip
    tokens = _optional(k, "max_new_tokens", lambda n: n.integer(minimum=1, maximum=4096), 200)
    if isinstance(structure, Keywords) and tokens < 4 * structure.own_min:
        at = k["max_new_tokens"] if "max_new_tokens" in k else k[given[0]]
        raise at.fail(f"{structure.own_min} items need about {4 * structure.own_min} tokens; "
                      f"max_new_tokens is {tokens}")  # fmt: skip
    write: frozenset[str] = _optional(k, "write", _targets, frozenset())
    if isinstance(structure, JsonAnswer) and "keywords" in write:
        raise k["write"].fail("a json answer cannot be written as keywords (a list rule can)")
    language = _optional(k, "language", _language, None)
    if language is not None and not write - {"keywords"}:
        raise k["language"].fail("names the language alternative a text is written as; this rule writes no "
                                 "description, title, alt_text or extended_description")  # fmt: skip
    return Rule(
        name=name,
        prompt=_template(k["prompt"]),
        match=_optional(k, "match", _Node.globs, GlobSet.of(["**/*"])),
        max_new_tokens=tokens,
        system=_optional(k, "system", lambda n: n.text(), None),
        strip_prefixes=_optional(k, "strip_prefixes", _Node.texts, ()),
        write=write,
        structure=structure,
        when=_optional(k, "when", _gate, None),
        language=language,
        system_where=k["system"].where if "system" in k else "",
    )


def _choice(node: _Node) -> Choice:
    options = node.spellings()
    if len(options) < 2:
        raise node.fail("a choice needs at least two options")
    if len({option.casefold() for option in options}) != len(options):
        raise node.fail("options must differ (letter case aside)")
    if any(option != option.strip() or "\n" in option for option in options):
        raise node.fail("options are one line each, without white space around them")
    return Choice(options)


def _keywords(node: _Node, base: Path) -> Keywords:
    k = node.mapping(dict.fromkeys(("min", "max", "words", "vocabulary", "exclude", "require"), False))
    low = _optional(k, "min", lambda n: n.integer(minimum=0, maximum=200), 1)
    high = _optional(k, "max", lambda n: n.integer(minimum=1, maximum=200), max(low, 30))
    if low > high:
        raise k["min"].fail(f"is more than max ({high})")
    nothing: tuple[str, ...] = ()
    require, exclude = _optional(k, "require", _Node.texts, nothing), _optional(k, "exclude", _Node.texts, nothing)
    if len(require) > high:
        raise k["require"].fail(f"{len(require)} required items do not fit max: {high}")
    for key, words in (("exclude", exclude), ("require", require)):
        for word in words:
            problem = vocabulary_problem(word)
            if problem:
                raise k[key].fail(problem)
        if len({word.casefold() for word in words}) != len(words):
            raise k[key].fail("an item is given twice (letter case aside)")
    both = {word.casefold() for word in require} & {word.casefold() for word in exclude}
    if both:
        raise k["require"].fail(f"{sorted(both)[0]!r} is excluded too")
    cap = _optional(k, "words", lambda n: n.integer(minimum=1, maximum=10), None)
    if cap is not None and any(len(word.split()) > cap for word in require):
        raise k["require"].fail(f"an item has more than {cap} words (words: {cap})")
    spec = Keywords(
        min=low, max=high, words=cap,
        vocabulary=_optional(k, "vocabulary", lambda n: _vocabulary(n, base), None),
        exclude=exclude, require=require,
    )  # fmt: skip
    if spec.vocabulary is not None and len(spec.allowed_terms() or ()) < spec.own_min:
        raise k["vocabulary"].fail(f"has {len(spec.allowed_terms() or ())} usable terms, fewer than min: {low} needs")
    return _compiled(node, spec)


def _vocabulary(node: _Node, base: Path) -> tuple[Term, ...]:
    """Inline terms, or a file of one term per line (`Parent|Child` for a hierarchy)."""
    if isinstance(node.node, yaml.SequenceNode):
        lines, where = list(node.texts()), ""
    else:
        path = expand(node.text(), relative_to=base)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise node.fail(f"cannot read the vocabulary {display(path)}: {reason}") from None
        where = f"{display(path)}: "
    try:
        terms = vocabulary_lines(lines)
    except ValueError as exc:
        raise node.fail(f"{where}{exc}") from None
    for term in terms:
        problem = vocabulary_problem(term.text)
        if problem:
            raise node.fail(f"{where}{problem}")
    if not terms:
        raise node.fail("the vocabulary has no terms")
    return terms


def _json(node: _Node, base: Path) -> JsonAnswer:
    k = node.mapping({"schema": True})
    schema_node = k["schema"]
    if isinstance(schema_node.node, yaml.MappingNode):
        schema = _json_value(schema_node, schema_node.node, set())
    else:
        path = expand(schema_node.text(), relative_to=base)
        try:
            document = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)  # JSON is YAML
            schema = _json_value(schema_node, document, set()) if document is not None else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise schema_node.fail(f"cannot read the schema {display(path)}: {reason}") from None
    problem = unsupported(schema)
    if problem:
        raise schema_node.fail(problem)
    return _compiled(node, JsonAnswer(closed(schema)))


def _json_value(where: _Node, node: yaml.Node, open_: set[int]) -> object:
    """A YAML node as JSON reads it: `yes`, `no` and dates stay the text written (only true and false are
    booleans, as in JSON), and an alias that contains itself is an error, not a recursion without end."""
    if id(node) in open_:
        raise where.fail("the schema refers to itself (a YAML alias inside its own anchor)")
    if isinstance(node, yaml.MappingNode):
        open_.add(id(node))
        value = {str(key.value): _json_value(where, item, open_) for key, item in node.value}
        open_.discard(id(node))
        return value
    if isinstance(node, yaml.SequenceNode):
        open_.add(id(node))
        items = [_json_value(where, item, open_) for item in node.value]
        open_.discard(id(node))
        return items
    text = str(node.value)
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "bool":
        return {"true": True, "false": False}.get(text.lower(), text)
    if tag in ("int", "float", "null"):
        return yaml.SafeLoader("").construct_object(node)
    return text


S = TypeVar("S", Keywords, JsonAnswer)


def _compiled(node: _Node, spec: S) -> S:
    """The structure, once its grammar is known to compile (llguidance, no tokenizer needed)."""
    try:
        problem = grammar_problem(spec.grammar())
    except ValueError as exc:
        problem = str(exc)
    if problem:
        raise node.fail(f"the grammar engine cannot compile this: {problem}")
    return spec


def _gate(node: _Node) -> Gate:
    k = node.mapping({"rule": True, "is": False, "in": False})
    if ("is" in k) == ("in" in k):
        raise node.fail("give `is: <answer>` or `in: [<answers>]`")
    values = k["is"].spellings() if "is" in k else k["in"].spellings()
    if not values:
        raise k["in"].fail("at least one answer is needed")
    return Gate(k["rule"].text(), values)


def _unanswerable(gating: Rule, value: str) -> str | None:
    """Why `gating` can never answer `value` (a gate on it would never open), or None."""
    structure = gating.structure
    if isinstance(structure, Choice):
        if value.casefold() not in {option.casefold() for option in structure.options}:
            return f"{value!r} is not one of {gating.name}'s choices ({', '.join(structure.options)})"
        return None
    assert isinstance(structure, Keywords)
    folded = value.casefold()
    if folded in {word.casefold() for word in structure.require}:
        return None
    if folded in {word.casefold() for word in structure.exclude}:
        return f"{value!r} is excluded from {gating.name}'s answers"
    terms = structure.allowed_terms()
    if terms is not None and folded not in {term.casefold() for term in terms}:
        return f"{value!r} is not in {gating.name}'s vocabulary"
    if structure.words is not None and len(value.split()) > structure.words:
        return f"{value!r} has more than {structure.words} words, more than {gating.name}'s items may"
    return None


def _gates(nodes: list[_Node], rules: tuple[Rule, ...]) -> None:
    """A gate names an earlier rule with a structured answer, and answers that rule can give."""
    earlier: dict[str, Rule] = {}
    for node, rule in zip(nodes, rules, strict=True):
        gate = rule.when
        if gate is not None:
            where = _Node(node.node, f"{node.path}.when", node.source)
            gating = earlier.get(gate.rule)
            if gating is None:
                known = "an earlier rule" if gate.rule not in {r.name for r in rules} else "a rule above this one"
                raise where.fail(f"rule {gate.rule!r}: the gate must be {known}")
            if gating.system != rule.system:  # a gated rule continues from its gate's prefix: the same turn
                raise where.fail(f"rule {gate.rule!r} has another system: text; a gated rule must share it")
            if not isinstance(gating.structure, (Choice, Keywords)):
                raise where.fail(f"rule {gate.rule!r} answers in free text; a gate needs its choice: or list:")
            for value in gate.values:
                problem = _unanswerable(gating, value)
                if problem:
                    raise where.fail(problem)
        earlier[rule.name] = rule


def _default_state_dir() -> Path:
    # Under systemd, StateDirectory= hands us the exact folder; otherwise follow XDG.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local/state") / "autocaption"


def parse(text: str, source: Path) -> Config:
    """Parse configuration text; `source` names the file in errors and anchors relative paths."""
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{display(source)}{where}: not valid YAML: {problem}") from None
    if root_node is None:
        raise ConfigError(f"{display(source)}: the file is empty; it needs at least `rules:`")
    root = _Node(root_node, "", source)
    if not isinstance(root_node, yaml.MappingNode):
        kind = {"seq": "list"}.get(root_node.tag.rsplit(":", 1)[-1], "single value")
        raise root.fail(f"the file must be a mapping of settings with at least `rules:`, not a {kind}")
    keys = root.mapping(
        dict(model=False, images=False, output=False, watch=False, state=False, daemon=False, rules=True)
    )
    rule_nodes = keys["rules"].sequence()
    if not rule_nodes:
        raise keys["rules"].fail("at least one rule is needed")
    base = source.parent
    rules = tuple(_rule(n, base) for n in rule_nodes)
    seen: set[str] = set()
    for node, rule in zip(rule_nodes, rules, strict=True):
        if rule.name in seen:
            raise node.fail(f"name {rule.name!r} is used by an earlier rule; names must be unique")
        seen.add(rule.name)
    _gates(rule_nodes, rules)
    state_keys = keys["state"].mapping({"dir": False}) if "state" in keys else {}
    user_paths: list[UserPath] = []
    state_dir = _optional(state_keys, "dir", lambda n: _path(n, base, user_paths), _default_state_dir())
    return Config(
        source=source,
        model=_optional(keys, "model", lambda n: _model(n, base, user_paths), ModelConfig()),
        images=_optional(keys, "images", _images, ImagesConfig()),
        output=_optional(keys, "output", _output, OutputConfig()),
        watch=tuple(_watch(n, base, user_paths) for n in keys["watch"].sequence()) if "watch" in keys else (),
        state=StateConfig(dir=state_dir),
        daemon=_optional(keys, "daemon", _daemon, DaemonConfig()),
        rules=rules,
        user_paths=tuple(user_paths),
    )


def defaults() -> Config:
    """The settings of an empty configuration (no rules, no folders): for commands that work without one."""
    return Config(
        source=Path("(defaults)"), model=ModelConfig(), images=ImagesConfig(), output=OutputConfig(), watch=(),
        state=StateConfig(dir=_default_state_dir()), daemon=DaemonConfig(), rules=(),
    )  # fmt: skip


def load(path: Path) -> Config:
    """Read and parse a configuration file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{display(path)}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{display(path)}: cannot read configuration: {exc}") from None
    return parse(text, path.absolute())
