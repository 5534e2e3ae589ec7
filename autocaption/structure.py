"""Structured answers: what a rule's `choice`, `list` or `json` allows its answer to be.

Each kind says it three ways:
- `grammar()`: an llguidance grammar the in-process decoder enforces token by token, so the model can only
  write a valid answer (engine/grammar.py applies it inside the tree step);
- `schema()`: a JSON schema, for a remote server's `response_format` (which may or may not enforce it);
- `read(text)`: the answer as a value (`"yes"`, `["dog", "beach"]`, `{"people": 2}`), or `AnswerInvalid`
  with one line saying why. Every answer goes through it, on every path: an answer that does not satisfy
  its rule is never written into a photo.

Nothing here imports torch; llguidance (a Rust extension, imported in milliseconds) checks each grammar
when the config is read, so a schema the grammar engine cannot compile is a config error naming the rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

# A keyword's words: letters or digits, then letters, digits and ' & . - (no comma: it separates items,
# no '|': it separates a hierarchy's levels).
WORD = r"[\p{L}\p{N}][\p{L}\p{N}'&.\-]{0,31}"
_WORD_PYTHON = re.compile(r"^[^\W_][\w'&.\-]{0,31}$")
SEPARATOR = ", "


class AnswerInvalid(ValueError):
    """An answer that does not satisfy its rule's structure; the message is one line, without the path."""


class Structure(Protocol):
    @property
    def kind(self) -> str:
        """ "choice", "list" or "json" """
        ...

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) of every valid answer text."""
        ...

    def schema(self) -> dict[str, Any]:
        """The answer's value as a JSON schema (for servers that enforce `response_format`)."""
        ...

    def read(self, text: str) -> Any:
        """The answer's value; AnswerInvalid when the text is not a valid answer."""
        ...

    def text_of(self, value: Any) -> str:
        """The answer text that reads as `value` (what the in-process decoder would have written)."""
        ...

    def shape(self) -> object:
        """What of this structure shapes the answer, for the rule's fingerprint (JSON-serialisable)."""
        ...


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal is a JSON string


def _lark(text: str) -> str:
    import llguidance

    return str(llguidance.LLMatcher.grammar_from_lark(text))


def grammar_problem(grammar: str) -> str | None:
    """Why llguidance cannot compile this grammar, or None."""
    import llguidance

    problem = str(llguidance.LLMatcher.validate_grammar(grammar))
    return problem.strip().splitlines()[0] if problem.strip() else None


@dataclass(frozen=True)
class Choice:
    """Exactly one of `options`."""

    options: tuple[str, ...]
    kind: str = field(default="choice", init=False)

    def grammar(self) -> str:
        return _lark("start: " + " | ".join(_literal(option) for option in self.options))

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.options)}

    def read(self, text: str) -> str:
        if text.strip() in self.options:  # what the decoder writes
            return text.strip()
        wanted = text.strip().strip("\"'").strip().rstrip(".")
        for option in self.options:
            if option == wanted:
                return option
        for option in self.options:  # a server that ignored the schema: "Yes." is still yes
            if option.casefold() == wanted.casefold():
                return option
        raise AnswerInvalid(f"the answer {_short(text)} is not one of {', '.join(self.options)}")

    def text_of(self, value: Any) -> str:
        return str(value)

    def shape(self) -> object:
        return ["choice", list(self.options)]


@dataclass(frozen=True)
class Term:
    """A vocabulary entry: what the model writes, and where it sits in a keyword hierarchy."""

    text: str
    paths: tuple[str, ...] = ()  # "Animals|Dog" for a vocabulary line `Animals|Dog`; () for a plain term


@dataclass(frozen=True)
class Keywords:
    """A list of distinct items, `min` to `max` of them, each of at most `words` words; with a vocabulary every
    item is one of its terms; `exclude` never appears; `require` is always in the answer (added when the model
    left it out, so the model itself writes at most `max - len(require)` of them)."""

    min: int = 1
    max: int = 30
    words: int | None = None
    vocabulary: tuple[Term, ...] | None = None
    exclude: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    kind: str = field(default="list", init=False)

    @cached_property
    def _terms(self) -> dict[str, Term]:
        """The vocabulary the model may use (excluded and required terms taken out), by folded text."""
        banned = {word.casefold() for word in (*self.exclude, *self.require)}
        return {term.text.casefold(): term for term in self.vocabulary or () if term.text.casefold() not in banned
                and (self.words is None or len(term.text.split()) <= self.words)}  # fmt: skip

    @property
    def own_min(self) -> int:
        """Items the model must write itself (required ones are added to its answer)."""
        return max(self.min - len(self.require), 0)

    @property
    def own_max(self) -> int:
        return self.max - len(self.require)

    def banned(self) -> frozenset[str]:
        """Items the model may never write (folded): excluded ones, and required ones (added afterwards)."""
        return frozenset(word.casefold() for word in (*self.exclude, *self.require))

    def allowed_terms(self) -> tuple[str, ...] | None:
        """The vocabulary terms the model may write, None without a vocabulary."""
        return None if self.vocabulary is None else tuple(term.text for term in self._terms.values())

    def grammar(self) -> str:
        if self.vocabulary is not None:
            item = " | ".join(_literal(term) for term in sorted(self.allowed_terms() or ()))
            if not item:
                return _lark('start: ""')
        else:
            words = "" if self.words == 1 else f"( {WORD}){{0,{self.words - 1}}}" if self.words else f"( {WORD})*"
            # (the grammar's (?i) folds as lower() does: "Straße" is not "STRASSE" to it, nor to `read`)
            excluded = "|".join(re.escape(word) for word in sorted({w.lower() for w in (*self.exclude, *self.require)}))
            item = f"/{WORD}{words}/" + (f" & ~/(?i:{excluded})/" if excluded else "")
        if self.own_max == 0:
            return _lark('start: ""')
        if self.own_max == 1:
            return _lark(f"start: {'ITEM' if self.own_min else '(ITEM)?'}\nITEM: {item}\n")
        more = f"({_literal(SEPARATOR)} ITEM){{{max(self.own_min - 1, 0)},{self.own_max - 1}}}"
        body = f"ITEM {more}" if self.own_min > 0 else f"(ITEM {more})?"
        return _lark(f"start: {body}\nITEM: {item}\n")

    def schema(self) -> dict[str, Any]:
        items: dict[str, Any] = {"type": "string"}
        terms = self.allowed_terms()
        if terms is not None:
            items["enum"] = list(terms)
        return {"type": "array", "items": items, "minItems": self.own_min, "maxItems": self.own_max,
                "uniqueItems": True}  # fmt: skip

    def read(self, text: str) -> list[str]:
        excluded = {word.lower() for word in self.exclude}  # (the grammar's (?i) folds as lower())
        banned = self.banned()
        items: dict[str, str] = {}
        for part in _listed(text):
            item = " ".join(part.split())
            if not item:
                continue
            folded = item.casefold()
            if item.lower() in excluded:
                raise AnswerInvalid(f"the answer has the excluded item {_short(item)}")
            if self.vocabulary is not None:
                term = self._terms.get(folded)
                if term is None and folded not in banned:
                    raise AnswerInvalid(f"{_short(item)} is not in the vocabulary")
                item = term.text if term else item
            elif self.words is not None and len(item.split()) > self.words:
                raise AnswerInvalid(f"{_short(item)} has more than {self.words} words")
            items.setdefault(folded, item)
        for word in reversed(self.require):  # required items first, in the order the rule gives them
            items.pop(word.casefold(), None)
        listed = [*self.require, *items.values()]
        if not self.min <= len(listed) <= self.max:
            raise AnswerInvalid(
                f"{len(listed)} distinct items, the rule wants {self.min} to {self.max}"
                + (" (cut off at max_new_tokens? raise it)" if len(listed) < self.min else "")
            )
        return listed

    def text_of(self, value: Any) -> str:
        own = {word.casefold() for word in self.require}
        return SEPARATOR.join(str(item) for item in value if str(item).casefold() not in own)

    def paths(self, items: Sequence[str]) -> tuple[str, ...]:
        """The hierarchy paths of these items (`Animals|Dog`), for lr:hierarchicalSubject."""
        every = {term.text.casefold(): term for term in self.vocabulary or ()}  # required terms too
        return tuple(path for item in items for path in (every.get(item.casefold()) or Term(item)).paths)

    def shape(self) -> object:
        vocabulary = None
        if self.vocabulary is not None:
            vocabulary = [[term.text, list(term.paths)] for term in self.vocabulary]
        return ["list", self.min, self.max, self.words, vocabulary, list(self.exclude), list(self.require)]


def _listed(text: str) -> list[str]:
    """The items of a list answer: the decoder's `a, b, c`, or a JSON array (a remote server's)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError:
            pass
        else:
            if isinstance(value, list):
                return [str(item) for item in value]
    return stripped.split(",") if stripped else []


@dataclass(frozen=True)
class JsonAnswer:
    """A JSON value that validates against `schema` (the common subset: see `validate`)."""

    schema_: Mapping[str, Any]
    kind: str = field(default="json", init=False)

    def grammar(self) -> str:
        import llguidance

        # Compact JSON: no free white space, which a weak model would write until its tokens ran out.
        options: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(self.schema_), overrides=options))

    def schema(self) -> dict[str, Any]:
        return dict(self.schema_)

    def read(self, text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as exc:
            cut = " (cut off at max_new_tokens? raise it)" if "Expecting" in str(exc) else ""
            raise AnswerInvalid(f"the answer is not JSON: {exc}{cut}") from None
        problem = validate(value, self.schema_)
        if problem:
            raise AnswerInvalid(f"the answer does not fit the schema: {problem}")
        return value

    def text_of(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    def shape(self) -> object:
        return ["json", self.schema_]


@dataclass(frozen=True)
class Gate:
    """`when:` — the rule runs only when another rule's answer is one of `values` (for a list rule: has one
    of them among its items)."""

    rule: str
    values: tuple[str, ...]

    def admits(self, value: Any) -> bool:
        wanted = {v.casefold() for v in self.values}
        if isinstance(value, list):
            return any(str(item).casefold() in wanted for item in value)
        if isinstance(value, bool):
            return ("true" if value else "false") in wanted
        return value is not None and str(value).casefold() in wanted

    def describe(self) -> str:
        return f"{self.rule} is {self.values[0]}" if len(self.values) == 1 else f"{self.rule} in {list(self.values)}"


def describe_structure(structure: Structure) -> str:
    """One line for `check`: "one of yes, no", "a list of 5-30 items from 2,000 terms", "JSON (schema)"."""
    if isinstance(structure, Choice):
        return "one of " + ", ".join(structure.options)
    if isinstance(structure, Keywords):
        words = f", each of at most {structure.words} words" if structure.words else ""
        terms = structure.allowed_terms()
        source = f" from {len(terms)} vocabulary terms" if terms is not None else ""
        required = f", always with {', '.join(structure.require)}" if structure.require else ""
        return f"a list of {structure.min}-{structure.max} distinct items{source}{words}{required}"
    return "JSON fitting its schema"


def shown(value: Any) -> str:
    """A structured answer's value as one line of text: the option, the items `a, b, c`, or the JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return SEPARATOR.join(value)
    return json.dumps(value, ensure_ascii=False)


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# --- the common subset of JSON schema, checked on every answer (a remote server may ignore the schema) ---

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,), "null": (type(None),),
    "integer": (int,), "number": (int, float),
}  # fmt: skip
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
             "uniqueItems", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
             "minLength", "maxLength", "pattern", "anyOf", "title", "description", "$schema"}  # fmt: skip


def closed(schema: Any) -> Any:
    """The schema with every object that names its properties closed to others (`additionalProperties:
    false` where it says nothing): an answer holds what the rule asks for, and a weak model cannot wander
    off into keys of its own until its tokens run out. A schema that sets additionalProperties keeps it."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) if key in ("properties", "items", "anyOf", "additionalProperties") else value
              for key, value in schema.items()}  # fmt: skip
    if isinstance(result.get("properties"), dict):
        result["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        result.setdefault("additionalProperties", False)
    return result


def unsupported(schema: Any, where: str = "schema") -> str | None:
    """The first keyword of `schema` outside the subset `validate` checks, or None."""
    if not isinstance(schema, dict):
        return f"{where}: expected a mapping"
    for key, value in schema.items():
        if key not in SUPPORTED:
            return f"{where}.{key}: not supported (supported: {', '.join(sorted(SUPPORTED - {'$schema'}))})"
        nested: list[tuple[str, Any]] = []
        if key == "properties" and isinstance(value, dict):
            nested = [(f"{where}.properties.{name}", sub) for name, sub in value.items()]
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            nested = [(f"{where}.{key}", value)]
        elif key == "anyOf" and isinstance(value, list):
            nested = [(f"{where}.anyOf[{i}]", sub) for i, sub in enumerate(value)]
        for place, sub in nested:
            problem = unsupported(sub, place)
            if problem:
                return problem
    return None


def validate(value: Any, schema: Mapping[str, Any], where: str = "") -> str | None:
    """Why `value` does not fit `schema`, or None (the subset in SUPPORTED)."""
    at = where or "the value"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is(value, k) for k in kinds):
            return f"{at} is not {' or '.join(kinds)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{at} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{at} is not {schema['const']!r}"
    if "anyOf" in schema and all(validate(value, sub, where) for sub in schema["anyOf"]):
        return f"{at} fits none of anyOf"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = _number(value, schema, at)
        if problem:
            return problem
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return f"{at} has a length outside {schema.get('minLength', 0)}..{schema.get('maxLength', '')}"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{at} does not match {schema['pattern']!r}"
    if isinstance(value, list):
        return _array(value, schema, at)
    if isinstance(value, dict):
        return _object(value, schema, where)
    return None


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False  # JSON's true is not 1
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(kind, ()))


def _number(value: float, schema: Mapping[str, Any], at: str) -> str | None:
    if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
        return f"{at} = {value} is outside {schema.get('minimum', '')}..{schema.get('maximum', '')}"
    if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
        return f"{at} = {value} is outside the exclusive bounds"
    return None


def _array(value: list[Any], schema: Mapping[str, Any], at: str) -> str | None:
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
        return f"{at} has {len(value)} items, outside {schema.get('minItems', 0)}..{schema.get('maxItems', '')}"
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
        return f"{at} has repeated items"
    if isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = validate(item, schema["items"], f"{at}[{i}]")
            if problem:
                return problem
    return None


def _object(value: dict[str, Any], schema: Mapping[str, Any], where: str) -> str | None:
    prefix = f"{where}." if where else ""
    for name in schema.get("required", ()):
        if name not in value:
            return f"{prefix}{name} is missing"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            problem = validate(item, properties[name], prefix + name)
        elif extra is False:
            problem = f"{prefix}{name} is not allowed"
        elif isinstance(extra, dict):
            problem = validate(item, extra, prefix + name)
        else:
            problem = None
        if problem:
            return problem
    return None


def vocabulary_lines(lines: Sequence[str]) -> tuple[Term, ...]:
    """Terms of a vocabulary file or list: one per line, `Parent|Child` for a hierarchy (the model writes the
    last level; every path of a term is written). Blank lines and `#` comments are skipped."""
    terms: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        levels = [level.strip() for level in entry.split("|")]
        if not all(levels):
            raise ValueError(f"{entry!r} has an empty level")
        leaf = levels[-1]
        texts.setdefault(leaf.casefold(), leaf)
        paths = terms.setdefault(leaf.casefold(), [])
        if len(levels) > 1 and "|".join(levels) not in paths:
            paths.append("|".join(levels))
    return tuple(Term(texts[key], tuple(paths)) for key, paths in terms.items())


def vocabulary_problem(term: str) -> str | None:
    """Why a term cannot be a list item (the decoder writes items separated by ', ')."""
    if "," in term:
        return f"{term!r} has a comma, which separates the items"
    if "|" in term:
        return f"{term!r} has a '|', which separates a hierarchy's levels"
    if not term.strip() or term != " ".join(term.split()):
        return f"{term!r} has leading, trailing or repeated white space"
    return None


def is_word(text: str) -> bool:
    return bool(_WORD_PYTHON.match(text))
