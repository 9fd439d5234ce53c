"""Incremental detokenization and stop strings, token by token, for streaming rows.

Two problems solved here, separately:
- A character can span several tokens (byte-level tokenizers split 'é' or an emoji into bytes),
  so a delta is released only once the decoded text no longer ends in U+FFFD.
- A stop string can span several tokens, so text that could still be the start of a stop
  string is held back; text never contains anything after the stop string (nor the stop
  string itself, unless it is asked for: include_stop_str_in_output).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

_REPLACEMENT = "\ufffd"

# The same arguments everywhere so streamed text equals a one-shot decode of the same ids.
DECODE_KWARGS: dict[str, Any] = {
    "skip_special_tokens": True,
    "clean_up_tokenization_spaces": False,
}


def decode_kwargs(*, skip_special_tokens: bool = True) -> dict[str, Any]:
    """DECODE_KWARGS, with special tokens' text kept or not (a request's skip_special_tokens)."""
    return {**DECODE_KWARGS, "skip_special_tokens": skip_special_tokens}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte (bytes_to_unicode inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one token stands for. Its text decoded alone, encoded, whenever that text is
    whole; a token holding part of a character (its text alone is U+FFFD) gives its own
    bytes instead: a byte-fallback piece `<0xE2>`, or a byte-level (GPT-2 style) piece's
    characters mapped back to their bytes. Anything else falls back to the text's bytes. A
    special token gives its own text's bytes too: these are the bytes of the token a logprob
    names, whatever a request's skip_special_tokens does to the output text."""
    text = tokenizer.decode([token_id], **decode_kwargs(skip_special_tokens=False))
    if _REPLACEMENT not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        alphabet = _byte_level_chars()
        if piece and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
    return text.encode()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a small window (`prefix`..end) rather than all ids, so each step costs O(window).
    The window starts one released chunk back, which keeps tokenizers whose decode of the first
    token differs from its decode in context (SentencePiece's leading space) correct.
    A window only grows while its text ends in U+FFFD, i.e. for at most a few tokens per
    character, unless the model emits invalid UTF-8, which flush() then releases as U+FFFD.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._kwargs = decode_kwargs(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been released as text
        self._prefix_text = ""  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._kwargs)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text ('' while a character is partial)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Release whatever is held (a partial character decodes as U+FFFD, as decode() does)."""
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text):
            self._read = len(self._ids)
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return delta


class StopStringFilter:
    """Accumulates text, cuts it at the first stop string, holds back possible stop prefixes.

    `include` keeps the stop string at the end of the text (vLLM's
    include_stop_str_in_output). A stop string is only looked for where the caller says it
    may end the text (`feed(..., may_stop=False)` before min_tokens tokens exist): a match
    must end in text fed while stopping is allowed."""

    def __init__(self, stop: Sequence[str], *, include: bool = False) -> None:
        self._stops = tuple(s for s in stop if s)
        self._include = include
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""  # all text so far; after a stop, the text up to the stop string
        self._released = 0  # chars of self.text already handed out

    def feed(self, delta: str, *, may_stop: bool = True) -> tuple[str, bool]:
        """Add text; return (text now safe to release, whether a stop string completed)."""
        if not delta:
            return "", False
        before = len(self.text)
        self.text += delta
        if not self._stops:
            return self._release(len(self.text)), False
        if may_stop:
            # Only a match that ends inside the new delta is new: (end, start) of each.
            hits = [(i + len(s), i) for s in self._stops
                    if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                end, start = min(hits)
                self.text = self.text[: end if self._include else start]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held_suffix()), False

    def flush(self) -> str:
        """Release everything still held (the row finished for another reason)."""
        return self._release(len(self.text))

    def _held_suffix(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released : upto]
        self._released = upto
        return out
