"""The engine's token logprobs in OpenAI's two shapes: legacy completions and chat.

Each token is shown as its text decoded alone (special tokens as the empty string, a piece
of a multi-byte character as the replacement character), or, with vLLM's
return_tokens_as_token_ids, as `token_id:N`; chat's `bytes` are the token's own bytes (a
piece of a character gives its raw bytes, not the replacement character's). JSON has no
-Infinity: a log-probability below -9999 is written as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.api.schemas import json_logprob as _value
from server.engine.interface import TokenLogprob


class TokenText:
    """Each token id's text, label and bytes, each computed once per response. Not for the
    event loop when there are many: callers build logprobs through
    server.api.off_loop."""

    def __init__(self, detokenize: Callable[[list[int]], str],
                 token_bytes: Callable[[int], bytes] | None = None, *,
                 as_ids: bool = False) -> None:
        self._detokenize = detokenize
        self._token_bytes = token_bytes
        self._as_ids = as_ids  # return_tokens_as_token_ids: labels are `token_id:N`
        self._seen: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        text = self._seen.get(token_id)
        if text is None:
            text = self._seen[token_id] = self._detokenize([token_id])
        return text

    def label(self, token_id: int) -> str:
        """How logprobs name the token: its text, or `token_id:N`. Labels by text can
        collide (distinct byte tokens all decode alone to U+FFFD); labels by id never do."""
        return f"token_id:{token_id}" if self._as_ids else self(token_id)

    def bytes_of(self, token_id: int) -> list[int]:
        value = self._bytes.get(token_id)
        if value is None:
            raw = (self._token_bytes(token_id) if self._token_bytes is not None
                   else self(token_id).encode())
            value = self._bytes[token_id] = list(raw)
        return value

    def each(self, ids: Sequence[int]) -> list[str]:
        """Each id's text, as decoding it alone gives, with one decode per distinct id (a
        long prompt repeats few distinct ids)."""
        return [self(token_id) for token_id in ids]


class CompletionLogprobsWriter:
    """One choice's legacy `logprobs` object, built in pieces (a stream writes each chunk's
    tokens): `text_offset` counts characters of the prompt and then the completion, so the
    first generated token's offset is the prompt's length (with echo, the prompt's tokens
    come first from 0)."""

    def __init__(self, text: TokenText, *, offset: int) -> None:
        self._text = text
        self._offset = offset

    def entries(self, ids: Sequence[int], values: Sequence[TokenLogprob | None]) -> dict:
        tokens, logprobs, tops, offsets = [], [], [], []
        for token_id, value in zip(ids, values, strict=True):
            label = self._text.label(token_id)
            tokens.append(label)
            offsets.append(self._offset)
            self._offset += len(self._text(token_id))  # offsets count text, whatever labels
            if value is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(_value(value.logprob))
            top = {}
            for top_id, top_value in value.top:
                top.setdefault(self._text.label(top_id), _value(top_value))
            top.setdefault(label, _value(value.logprob))  # the chosen token always appears
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                "text_offset": offsets}


def merge_completion_logprobs(parts: Sequence[dict]) -> dict:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
    for part in parts:
        for key, values in part.items():
            merged[key] += values
    return merged


def chat_logprobs(text: TokenText, values: Sequence[TokenLogprob]) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs}]}` for these generated tokens."""

    def entry(token_id: int, logprob: float) -> dict:
        return {"token": text.label(token_id), "logprob": _value(logprob),
                "bytes": text.bytes_of(token_id)}

    return {"content": [entry(v.token_id, v.logprob)
                        | {"top_logprobs": [entry(i, lp) for i, lp in v.top]} for v in values]}
