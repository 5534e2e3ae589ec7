"""Constrained decoding: what each branch may write next, from its rule's structure (structure.py).

llguidance does the grammar: one matcher per constrained branch, copied from one compiled per rule, all of a
step's masks computed together on its thread pool into one host bitmask (int32 words, bit t for token t). The
tree decoder copies that bitmask into a buffer of its state and applies it on the device inside the step
(tree._allowed), so the step still compiles and captures; branches without a rule structure get all bits
set and are not changed. The batched path applies the same masks through a logits processor of `generate`.

Why llguidance (bench/grammar.py has the figures): it imports without torch in milliseconds, so `check`
compiles every rule's grammar while reading the config; its masks come from a lazily built lexer, so a
5,000-term vocabulary costs nothing up front; and it fills a batch's masks in parallel.

One thing a grammar cannot say is "distinct": a list item the branch already wrote is kept from being
written again by `_Repeats`, which clears the tokens that would close an item equal to an earlier one.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from autocaption.engine.tree import masked
from autocaption.structure import SEPARATOR, Keywords, Structure

log = logging.getLogger(__name__)


class Grammars:
    """Per model: the tokenizer as llguidance reads it, each structure's compiled matcher (made once, copied
    per branch) and the token texts the repeat guard looks up."""

    def __init__(self, tokenizer: Any, vocabulary: int, eos_ids: set[int]) -> None:
        import llguidance

        self.vocabulary = vocabulary  # the model's scores per step (may exceed the tokenizer's own)
        self.words = (vocabulary + 31) // 32
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = _ll_tokenizer(tokenizer, vocabulary, self.eos_ids)
        self.executor = llguidance.LLExecutor()
        self._matchers: dict[str, Any] = {}
        self._texts: list[str] | None = None
        self._closing: dict[str, list[int]] = {}  # folded text before a token's first comma -> tokens
        self._spelled: dict[str, list[int]] = {}  # folded text of tokens without a comma -> tokens
        self._closers: np.ndarray | None = None
        self.ends = self._bits(self.eos_ids)  # the bitmask of the end-of-sequence tokens

    def matcher(self, structure: Structure) -> Any:
        """A fresh matcher for `structure` (its grammar compiled on first use and kept)."""
        import llguidance

        key = json.dumps(structure.shape(), sort_keys=True)
        prototype = self._matchers.get(key)
        if prototype is None:
            prototype = llguidance.LLMatcher(self.tokenizer, structure.grammar(), log_level=0)
            if prototype.is_error():
                raise ValueError(f"the grammar engine refused a rule's structure: {prototype.get_error()}")
            self._matchers[key] = prototype
        return prototype.deep_copy()

    def masks(self, structures: Sequence[Structure | None], limits: Sequence[int]) -> BranchMasks:
        return BranchMasks(self, structures, limits)

    def closers(self) -> np.ndarray:
        """The bitmask of tokens that end a list item (a comma in them)."""
        if self._closers is None:
            self._table()
            self._closers = self._bits([token for tokens in self._closing.values() for token in tokens])
        return self._closers

    def _bits(self, tokens: Sequence[int]) -> np.ndarray:
        bits = np.zeros(self.words, dtype=np.uint32)
        for token in tokens:
            bits[token >> 5] |= np.uint32(1 << (token & 31))
        return bits

    def text(self, token: int) -> str:
        return self._table()[token] if 0 <= token < len(self._table()) else ""

    def closing(self, rest: str) -> list[int]:
        """Tokens that end an item whose text still lacks `rest` (folded): `rest` then a comma."""
        self._table()
        return self._closing.get(rest, [])

    def spelled(self, text: str) -> list[int]:
        self._table()
        return self._spelled.get(text, [])

    def _table(self) -> list[str]:
        if self._texts is None:
            special = set(self.eos_ids)
            texts = []
            for token in range(self.vocabulary):
                raw = b"" if token in special else self.tokenizer.decode_bytes([token])
                texts.append(raw.decode("utf-8", "replace") if not raw.startswith(b"\xff") else "")
            for token, text in enumerate(texts):
                if "," in text:
                    self._closing.setdefault(text.split(",", 1)[0].casefold(), []).append(token)
                elif text:
                    self._spelled.setdefault(text.casefold(), []).append(token)
            self._texts = texts
        return self._texts


class BranchMasks:
    """The masks of one decode: one matcher per constrained branch (None for the others), advanced by the
    tokens the branches choose. Implements tree.Masks."""

    def __init__(self, grammars: Grammars, structures: Sequence[Structure | None], limits: Sequence[int]) -> None:
        self.grammars = grammars
        self.matchers = [grammars.matcher(s) if s is not None else None for s in structures]
        self.repeats = [_Repeats(grammars, s, limit) if isinstance(s, Keywords) else None
                        for s, limit in zip(structures, limits, strict=True)]  # fmt: skip
        self.ended = [m is None for m in self.matchers]
        self.mask = torch.full((len(self.matchers), grammars.words), -1, dtype=torch.int32)

    def advance(self, tokens: list[int], alive: list[bool]) -> None:
        for index, matcher in enumerate(self.matchers):
            if matcher is None or self.ended[index]:
                continue
            token = tokens[index]
            if not alive[index] or token in self.grammars.eos_ids:
                self.ended[index] = True  # its answer is complete (or at its limit): nothing more to mask
                continue
            if not matcher.consume_token(token):
                log.debug("a constrained branch took a token its grammar refuses: %s", matcher.get_error())
            repeats = self.repeats[index]
            if repeats is not None:
                repeats.add(token)

    def fill(self) -> torch.Tensor:
        import llguidance.torch

        self.mask.fill_(-1)
        live = [(m, i) for i, m in enumerate(self.matchers) if m is not None and not self.ended[i] and not m.is_error()]
        if live:
            llguidance.torch.fill_next_token_bitmask_par(self.grammars.executor, live, self.mask)
        words = self.mask.numpy().view(np.uint32)
        for index, matcher in enumerate(self.matchers):
            if matcher is None or self.ended[index]:
                continue
            if matcher.is_error():  # cannot happen with its own mask; should it, the branch ends here
                words[index] = self.grammars.ends
                continue
            repeats = self.repeats[index]
            if repeats is not None:
                _clear(words[index], repeats.bans())
                hurry = repeats.hurry()
                if hurry:  # few tokens left: end the answer, or the item, as soon as the grammar allows
                    closing = words[index] & (self.grammars.ends if hurry == "end" else self.grammars.closers())
                    if closing.any():
                        words[index] = closing
        return self.mask


class GrammarProcessor(LogitsProcessor):
    """The same masks for `generate` (the batched path): row i of the batch follows structures[i]."""

    def __init__(self, masks: BranchMasks, prompt_length: int) -> None:
        self.masks = masks
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_length:
            tokens = input_ids[:, -1].tolist()
            self.masks.advance(tokens, [True] * len(tokens))
        allow = self.masks.fill().to(scores.device)
        bits = torch.arange(32, dtype=torch.int32, device=scores.device)
        return masked(scores, allow, bits)  # type: ignore[return-value]


class _Repeats:
    """What a grammar cannot say about a list. Distinct: a branch is kept from closing an item equal to one
    it already wrote (or one the rule bans): the tokens that would end the item there (a comma, the end of the
    answer) are cleared; with a vocabulary, also the tokens that lead only into terms already used, so the
    branch never walks into a dead end. Finished in time: when its tokens run short, an item is closed as soon
    as the grammar allows, so the list ends complete instead of being cut off at max_new_tokens."""

    def __init__(self, grammars: Grammars, spec: Keywords, limit: int) -> None:
        self.grammars = grammars
        self.banned = spec.banned()
        terms = spec.allowed_terms()
        # The grammar writes a vocabulary's terms exactly as spelled (items are distinct letter case aside,
        # and the vocabulary holds one spelling of each): its paths are followed as written.
        self.spelling = {term.casefold(): term for term in terms} if terms is not None else None
        self.terms = sorted(terms) if terms is not None else None
        self.text = ""
        self.written = 0
        self.limit = limit
        self.wanted = spec.own_min

    def add(self, token: int) -> None:
        self.text += self.grammars.text(token)
        self.written += 1

    def hurry(self) -> str | None:
        """When few tokens are left (four per item still missing, ", x" and a repeat avoided, and a margin):
        "end" the answer when it has items enough, else "close" the item; None while there is room."""
        *done, item = self.text.split(",")
        have = len(done) + (1 if item.strip() else 0)
        if self.limit - self.written > 4 * max(self.wanted - have, 0) + 4:
            return None
        return "end" if have >= self.wanted else "close"

    def bans(self) -> list[int]:
        *done, item = self.text.split(",")
        used = {word.strip().casefold() for word in done} | self.banned
        lead = SEPARATOR[1:] if done else ""  # an item after the first starts with the separator's space
        bans: list[int] = []
        for word in used:
            exact = self.spelling is not None
            spelled = self.spelling.get(word) if self.spelling is not None else word
            if spelled is None:  # not a term the grammar can write
                continue
            target, written = lead + spelled, item if exact else item.casefold()
            if not target.startswith(written):
                continue
            rest = target[len(written) :]
            bans += self._tokens(self.grammars.closing(rest.casefold()), rest, exact, closing=True)
            if not rest:
                bans += self.grammars.eos_ids
            if exact:
                for end in range(1, len(rest) + 1):
                    if not self._open(target[len(lead) : len(written) + end], used):
                        bans += self._tokens(self.grammars.spelled(rest[:end].casefold()), rest[:end], exact)
        return bans

    def _tokens(self, tokens: list[int], text: str, exact: bool, closing: bool = False) -> list[int]:
        """Of tokens found by their folded text, those spelled `text` (before their comma, for closing ones)
        where spelling counts."""
        if not exact:
            return tokens
        return [
            t for t in tokens if (self.grammars.text(t).split(",", 1)[0] if closing else self.grammars.text(t)) == text
        ]

    def _open(self, prefix: str, used: set[str]) -> bool:
        """Some term not yet used starts with `prefix` (as spelled): more terms start with it than used ones.
        Counted by bisection and over the used terms only (a step walked every term of a common prefix)."""
        assert self.terms is not None and self.spelling is not None
        prefix = prefix.lstrip()
        low = bisect.bisect_left(self.terms, prefix)
        high = bisect.bisect_left(self.terms, prefix + "\U0010ffff", low)
        taken = sum(1 for word in used if (self.spelling.get(word) or "\0").startswith(prefix))
        return high - low > taken


def _clear(words: np.ndarray, tokens: list[int]) -> None:
    """Clear these tokens' bits, unless that would leave the branch nothing to write (then it may repeat)."""
    if not tokens:
        return
    kept = words.copy()
    for token in tokens:
        if token >> 5 < len(words):
            words[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)
    if not words.any():
        words[:] = kept


def _ll_tokenizer(tokenizer: Any, vocabulary: int, eos_ids: list[int]) -> Any:
    """The tokenizer for llguidance: its own reading of a fast tokenizer's JSON where it can (byte-level BPE,
    sentencepiece), else each token's text as the tokenizer decodes it (word-level vocabularies)."""
    import llguidance
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary, eos_token=eos_ids)
    except ValueError:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Decoded(tokenizer, eos_ids)), n_vocab=vocabulary)


class _Decoded:
    """A tokenizer as llguidance's generic wrapper reads it: the bytes of every token, special ones marked."""

    def __init__(self, tokenizer: Any, eos_ids: list[int]) -> None:
        self.eos_token_id = eos_ids[0] if eos_ids else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        special = set(tokenizer.all_special_ids)
        special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.special_token_ids = sorted(special)
        self.tokens = [
            b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode() if i in special
            else tokenizer.decode([i]).encode("utf-8")
            for i in range(len(tokenizer))
        ]  # fmt: skip
        self._tokenizer = tokenizer
        self._unknown = tokenizer.unk_token_id
        self._by_text = {token: i for i, token in reversed(list(enumerate(self.tokens))) if i not in special}
        self._longest = max((len(token) for token in self._by_text), default=1)

    def __call__(self, text: str) -> list[int]:
        """The tokenizer's own tokens; where it has no token for a piece (a word-level vocabulary gives <unk>),
        the longest tokens that spell it: llguidance tokenizes the text a grammar forces with this, and an
        <unk> there would be the only token it allows."""
        tokens = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if self._unknown is None or self._unknown not in tokens:
            return tokens
        data, at, spelled = text.encode("utf-8"), 0, []
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._by_text.get(data[at : at + size])
                if token is not None:
                    spelled.append(token)
                    at += size
                    break
            else:
                return tokens  # not spelled by any token either: as the tokenizer has it
        return spelled
