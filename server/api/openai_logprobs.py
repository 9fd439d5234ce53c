"""The engine's token logprobs in OpenAI's two shapes: legacy completions and chat.

Each token is shown as its text decoded alone (special tokens as the empty string, a piece
of a multi-byte character as the replacement character). JSON has no -Infinity: a
log-probability below -9999 is written as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from server.api.schemas import json_logprob as _value
from server.engine.interface import TokenLogprob


class TokenText:
    """Each token id's text, decoded once per response. Not for the event loop when there
    are many: callers build logprobs through server.api.submission.off_loop."""

    def __init__(self, detokenize: Callable[[list[int]], str]) -> None:
        self._detokenize = detokenize
        self._seen: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._seen.get(token_id)
        if text is None:
            text = self._seen[token_id] = self._detokenize([token_id])
        return text

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
            text = self._text(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            if value is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(_value(value.logprob))
            top = {}
            for top_id, top_value in value.top:
                top.setdefault(self._text(top_id), _value(top_value))
            top.setdefault(text, _value(value.logprob))  # the chosen token always appears
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
        token = text(token_id)
        return {"token": token, "logprob": _value(logprob), "bytes": list(token.encode())}

    return {"content": [entry(v.token_id, v.logprob)
                        | {"top_logprobs": [entry(i, lp) for i, lp in v.top]} for v in values]}
