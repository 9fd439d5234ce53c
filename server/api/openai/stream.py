"""Writing engine results (or streams) as OpenAI completion / chat objects and SSE chunks.

One HTTP request may run several engine requests: `n` choices of each of its prompts, each a
Choice with its index. They run at once (submission.complete_all / open_streams, shared with
/v1/generate's path), and a Format decides how a choice's text, logprobs, finish and the
usage look on the wire. With vLLM's stream_options.continuous_usage_stats every chunk also
carries its choice's usage so far (its prompt, its tokens up to that chunk).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import Request

from server.api.metrics import ApiMetrics
from server.api.off_loop import OFF_LOOP_TOKENS, PiecewiseJSONResponse, json_text, off_loop
from server.api.openai.errors import openai_error_event
from server.api.openai.logprobs import (
    CompletionLogprobsWriter,
    TokenText,
    chat_logprobs,
    merge_completion_logprobs,
)
from server.api.quotas import Lease
from server.api.submission import complete_all, open_streams, sse_events, sse_response, unsent
from server.engine.interface import (
    EngineClient,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TokenChunk,
    TokenLogprob,
)


@dataclass(frozen=True)
class Choice:
    """One engine request of an OpenAI request."""

    index: int
    request: GenerationRequest
    counts_prompt: bool = True  # the first choice of its prompt: usage counts the prompt once
    prompt_text: str = ""  # completions: where the completion's text offsets start
    echo: bool = False  # completions: the prompt's text before the completion
    score_only: bool = False  # max_tokens 0 with echo: the one token drawn is not returned


def finish_reason(result: GenerationResult, choice: Choice) -> str:
    """OpenAI knows "stop" (eos or a stop string) and "length"."""
    if choice.score_only or result.finish_reason == FinishReason.LENGTH:
        return "length"
    return "stop"


def usage(choices: list[Choice], results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for c, r in zip(choices, results, strict=True)
                 if c.counts_prompt)
    completion = sum(0 if c.score_only else r.completion_tokens
                     for c, r in zip(choices, results, strict=True))
    cached = sum(r.cached_tokens for c, r in zip(choices, results, strict=True)
                 if c.counts_prompt)
    return _usage(prompt, completion) | {"prompt_tokens_details": {"cached_tokens": cached}}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _tokens_so_far(choice: Choice, item: TokenChunk | GenerationResult, sent: int) -> int:
    """A choice's completion tokens once `item` is out (`sent`: in its earlier chunks)."""
    if choice.score_only:
        return 0
    if isinstance(item, GenerationResult):
        return item.completion_tokens
    return sent + len(item.token_ids)


@dataclass
class CompletionFormat:
    request_id: str
    model: str
    text: TokenText
    logprobs: int | None = None  # the request's top N; None: no logprobs
    continuous_usage: bool = False  # every streamed chunk carries its choice's usage
    created: int = field(default_factory=lambda: int(time.time()))
    _writers: dict[int, CompletionLogprobsWriter] = field(default_factory=dict)
    _sent: dict[int, tuple[str, int]] = field(default_factory=dict)  # text, tokens so far

    object = "text_completion"

    @property
    def id(self) -> str:
        return f"cmpl-{self.request_id}"

    def _envelope(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def _writer(self, choice: Choice) -> CompletionLogprobsWriter:
        writer = self._writers.get(choice.index)
        if writer is None:
            offset = 0 if choice.echo else len(choice.prompt_text)
            writer = self._writers[choice.index] = CompletionLogprobsWriter(self.text,
                                                                            offset=offset)
        return writer

    def _prompt_part(self, choice: Choice, values: Any) -> tuple[str, dict | None]:
        """The echoed prompt and its tokens' logprobs (for the choice's first piece)."""
        if not choice.echo:
            return "", None
        if self.logprobs is None:
            return choice.prompt_text, None
        ids = choice.request.prompt_ids
        return choice.prompt_text, self._writer(choice).entries(
            ids, values or [None] * len(ids))

    def _generated(self, choice: Choice, ids: tuple[int, ...],
                   values: tuple[TokenLogprob, ...] | None) -> dict | None:
        if self.logprobs is None or choice.score_only:
            return None
        return self._writer(choice).entries(ids, values or ())

    def full(self, choices: list[Choice], results: list[GenerationResult]) -> dict:
        out = []
        for choice, result in zip(choices, results, strict=True):
            echo, prompt = self._prompt_part(choice, result.prompt_logprobs)
            generated = self._generated(choice, result.token_ids, result.logprobs)
            text = echo + ("" if choice.score_only else result.text)
            parts = [p for p in (prompt, generated) if p is not None]
            out.append({"index": choice.index, "text": text,
                        "logprobs": merge_completion_logprobs(parts) if parts else None,
                        "finish_reason": finish_reason(result, choice)})
        return self._envelope(out, usage=usage(choices, results))

    def opening(self, choices: list[Choice]) -> list[dict]:
        return []

    def cost(self, choice: Choice, item: TokenChunk | GenerationResult) -> int:
        """The token ids and logprob entries writing `item` of `choice` takes (full() or
        stream_item()): what decides whether it is written off the event loop."""
        sent = self._sent.get(choice.index)
        tokens = len(item.token_ids)
        if isinstance(item, GenerationResult) and sent is not None:
            tokens -= sent[1]
        if choice.echo and sent is None:
            tokens += len(choice.request.prompt_ids)
        return tokens if self.logprobs is None else tokens * (1 + self.logprobs)

    def _so_far(self, prompt: int, completion: int) -> dict:
        """A chunk's `usage` field: the choice's usage so far, when asked for."""
        return {"usage": _usage(prompt, completion)} if self.continuous_usage else {}

    def chunk(self, choice: Choice, text: str, logprobs: dict | None,
              finish: str | None, usage: dict | None = None) -> dict:
        return self._envelope([{"index": choice.index, "text": text, "logprobs": logprobs,
                                "finish_reason": finish}], **(usage or {}))

    def stream_item(self, choice: Choice, item: TokenChunk | GenerationResult) -> list[dict]:
        """The chunks one engine item of a choice becomes (none when it carries nothing)."""
        out = []
        if choice.index not in self._sent:
            self._sent[choice.index] = ("", 0)
            echo, prompt = self._prompt_part(choice, item.prompt_logprobs)
            if echo:
                out.append(self.chunk(choice, echo, prompt, None,
                                      self._so_far(item.prompt_tokens, 0)))
        sent_text, sent_ids = self._sent[choice.index]
        usage = self._so_far(item.prompt_tokens, _tokens_so_far(choice, item, sent_ids))
        if isinstance(item, TokenChunk):
            if choice.score_only or not (item.text or self.logprobs is not None):
                return out
            self._sent[choice.index] = (sent_text + item.text, sent_ids + len(item.token_ids))
            out.append(self.chunk(choice, item.text,
                                  self._generated(choice, item.token_ids, item.logprobs), None,
                                  usage))
            return out
        # Whatever the chunks did not carry yet (normally nothing) goes in the last one.
        rest = unsent(item.text, sent_text)
        values = item.logprobs[sent_ids:] if item.logprobs is not None else None
        out.append(self.chunk(choice, "" if choice.score_only else rest,
                              self._generated(choice, item.token_ids[sent_ids:], values),
                              finish_reason(item, choice), usage))
        return out

    def usage_chunk(self, choices: list[Choice], results: list[GenerationResult]) -> dict:
        return self._envelope([], usage=usage(choices, results))


@dataclass
class ChatFormat(CompletionFormat):
    object = "chat.completion"

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def _chat_logprobs(self, values: tuple[TokenLogprob, ...] | None) -> dict | None:
        if self.logprobs is None:
            return None
        return chat_logprobs(self.text, values or ())

    def full(self, choices: list[Choice], results: list[GenerationResult]) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": r.text},
                "logprobs": self._chat_logprobs(r.logprobs),
                "finish_reason": finish_reason(r, c)}
               for c, r in zip(choices, results, strict=True)]
        return self._envelope(out, usage=usage(choices, results))

    def _delta(self, choice: Choice, delta: dict, logprobs: dict | None,
               finish: str | None, usage: dict | None = None) -> dict:
        chunk = self._envelope([{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish}], **(usage or {}))
        chunk["object"] = "chat.completion.chunk"
        return chunk

    def _role(self, choice: Choice, usage: dict | None = None) -> dict:
        return self._delta(choice, {"role": "assistant", "content": ""}, None, None, usage)

    def opening(self, choices: list[Choice]) -> list[dict]:
        """OpenAI's first chat chunk of each choice names the role, with empty content. With
        continuous usage it waits for the choice's first item, which knows the prompt's
        size (a template's anchors count)."""
        if self.continuous_usage:
            return []
        return [self._role(c) for c in choices]

    def stream_item(self, choice: Choice, item: TokenChunk | GenerationResult) -> list[dict]:
        out = []
        if choice.index not in self._sent:
            self._sent[choice.index] = ("", 0)
            if self.continuous_usage:
                out.append(self._role(choice, self._so_far(item.prompt_tokens, 0)))
        sent_text, sent_ids = self._sent[choice.index]
        usage = self._so_far(item.prompt_tokens, _tokens_so_far(choice, item, sent_ids))
        if isinstance(item, TokenChunk):
            if not (item.text or self.logprobs is not None):
                return out
            self._sent[choice.index] = (sent_text + item.text, sent_ids + len(item.token_ids))
            delta = {"content": item.text} if item.text else {}
            return [*out, self._delta(choice, delta, self._chat_logprobs(item.logprobs), None,
                                      usage)]
        rest = unsent(item.text, sent_text)
        values = item.logprobs[sent_ids:] if item.logprobs is not None else None
        logprobs = self._chat_logprobs(values) if values else None
        return [*out, self._delta(choice, {"content": rest} if rest else {}, logprobs,
                                  finish_reason(item, choice), usage)]

    def usage_chunk(self, choices: list[Choice], results: list[GenerationResult]) -> dict:
        chunk = self._envelope([], usage=usage(choices, results))
        chunk["object"] = "chat.completion.chunk"
        return chunk


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def respond(request: Request, engine: EngineClient, choices: list[Choice], *,
                  metrics: ApiMetrics, lease: Lease, fmt: CompletionFormat, stream: bool,
                  include_usage: bool) -> Any:
    """Run the admitted choices on the shared engine path and answer in fmt's shape."""
    engine_requests = [c.request for c in choices]
    headers = {"X-Request-Id": engine_requests[0].request_id}
    if stream:
        items = await open_streams(request, engine, engine_requests, metrics=metrics,
                                   lease=lease)
        frames = _frames(items, choices, fmt, include_usage=include_usage)
        return sse_response(sse_events(frames, items, openai_error_event), headers)
    results, engine_ms = await complete_all(request, engine, engine_requests, metrics=metrics,
                                            lease=lease)
    headers["Server-Timing"] = f"engine;dur={engine_ms:.3f}"
    # n choices of long echoed prompts with top logprobs are hundreds of thousands of entries:
    # built and rendered on a worker thread, so the loop keeps serving meanwhile.
    return await off_loop(
        lambda: PiecewiseJSONResponse(fmt.full(choices, results), headers=headers),
        tokens=sum(fmt.cost(c, r) for c, r in zip(choices, results, strict=True)))


def _rendered(fmt: CompletionFormat, choice: Choice, item: TokenChunk | GenerationResult, *,
              heavy: bool) -> list[str]:
    """The SSE frames of one engine item; a heavy one's JSON is written in pieces."""
    chunks = fmt.stream_item(choice, item)
    if heavy:
        return [f"data: {json_text(chunk, as_response=False)}\n\n" for chunk in chunks]
    return [_data(chunk) for chunk in chunks]


async def _frames(items: AsyncIterator[tuple[int, TokenChunk | GenerationResult]],
                  choices: list[Choice], fmt: CompletionFormat, *,
                  include_usage: bool) -> AsyncIterator[str]:
    for opening in fmt.opening(choices):
        yield _data(opening)
    results: dict[int, GenerationResult] = {}
    async for index, item in items:
        choice = choices[index]
        # An echoed prompt's logprobs (the choice's first chunk) are heavy: off the loop.
        cost = fmt.cost(choice, item)
        for frame in await off_loop(partial(_rendered, fmt, choice, item,
                                            heavy=cost > OFF_LOOP_TOKENS), tokens=cost):
            yield frame
        if isinstance(item, GenerationResult):
            results[index] = item
    if include_usage:
        yield _data(fmt.usage_chunk(choices, [results[i] for i in range(len(choices))]))
