"""Incremental detokenization and stop strings, token by token, for streaming rows.

Two problems solved here, separately:
- A character can span several tokens (byte-level tokenizers split 'é' or an emoji into bytes),
  so a delta is released only once the decoded text no longer ends in U+FFFD.
- A stop string can span several tokens, so text that could still be the start of a stop
  string is held back; text never contains the stop string or anything after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"

# The same arguments everywhere so streamed text equals a one-shot decode of the same ids.
DECODE_KWARGS: dict[str, Any] = {
    "skip_special_tokens": True,
    "clean_up_tokenization_spaces": False,
}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a small window (`prefix`..end) rather than all ids, so each step costs O(window).
    The window starts one released chunk back, which keeps tokenizers whose decode of the first
    token differs from its decode in context (SentencePiece's leading space) correct.
    A window only grows while its text ends in U+FFFD, i.e. for at most a few tokens per
    character, unless the model emits invalid UTF-8, which flush() then releases as U+FFFD.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been released as text
        self._prefix_text = ""  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **DECODE_KWARGS)

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
    """Accumulates text, cuts it at the first stop string, holds back possible stop prefixes."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""  # all text so far; after a stop, the text before the stop string
        self._released = 0  # chars of self.text already handed out

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text now safe to release, whether a stop string completed)."""
        if not delta:
            return "", False
        before = len(self.text)
        self.text += delta
        if not self._stops:
            return self._release(len(self.text)), False
        # Only a match that ends inside the new delta is new.
        start = max(0, before - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
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
