"""Writing an engine result (or stream) as OpenAI completion / chat objects and SSE chunks.

The engine path is submission.complete / submission.open_stream, shared with /v1/generate;
a Format only decides how a piece of text, a finish and the usage look on the wire.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.metrics import ApiMetrics
from server.api.openai_errors import openai_error_event
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Delta,
    Usage,
)
from server.api.quotas import Lease
from server.api.submission import StreamItem, complete, open_stream, sse_events
from server.engine.interface import (
    EngineClient,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TokenChunk,
)


def finish_reason(result: GenerationResult) -> str:
    """OpenAI knows "stop" (eos or a stop string) and "length"."""
    return "length" if result.finish_reason == FinishReason.LENGTH else "stop"


def usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


@dataclass
class CompletionFormat:
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"cmpl-{self.request_id}"

    def full(self, result: GenerationResult) -> dict:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage(result),
            choices=[CompletionChoice(text=result.text, finish_reason=finish_reason(result))],
        ).model_dump(mode="json")

    def opening(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish: str | None) -> dict:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=finish)],
        ).model_dump(mode="json", exclude={"usage"})

    def usage_chunk(self, result: GenerationResult) -> dict:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[], usage=usage(result)).model_dump(mode="json")


@dataclass
class ChatFormat(CompletionFormat):
    @property
    def id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def full(self, result: GenerationResult) -> dict:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage(result),
            choices=[ChatChoice(message=AssistantMessage(content=result.text),
                                finish_reason=finish_reason(result))],
        ).model_dump(mode="json")

    def _chunk(self, delta: Delta, finish: str | None) -> dict:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
        ).model_dump(mode="json", exclude={"usage"})
        chunk["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # final: {}
        return chunk

    def opening(self) -> list[dict]:
        """OpenAI's first chat chunk names the role, with empty content."""
        return [self._chunk(Delta(role="assistant", content=""), None)]

    def chunk(self, text: str, finish: str | None) -> dict:
        return self._chunk(Delta(content=text or None), finish)

    def usage_chunk(self, result: GenerationResult) -> dict:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[], usage=usage(result)).model_dump(mode="json")


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def respond(request: Request, engine: EngineClient, engine_request: GenerationRequest, *,
                  metrics: ApiMetrics, lease: Lease, fmt: CompletionFormat, stream: bool,
                  include_usage: bool) -> Any:
    """Run the admitted request on the shared engine path and answer in fmt's shape."""
    headers = {"X-Request-Id": engine_request.request_id}
    if stream:
        items = await open_stream(request, engine, engine_request, metrics=metrics, lease=lease)
        return StreamingResponse(_events(items, fmt, include_usage=include_usage),
                                 media_type="text/event-stream",
                                 headers=headers | {"Cache-Control": "no-cache",
                                                    "X-Accel-Buffering": "no"})
    result, engine_ms = await complete(request, engine, engine_request, metrics=metrics,
                                       lease=lease)
    return JSONResponse(fmt.full(result),
                        headers=headers | {"Server-Timing": f"engine;dur={engine_ms:.3f}"})


def _events(items: AsyncIterator[StreamItem], fmt: CompletionFormat, *,
            include_usage: bool) -> AsyncIterator[str]:
    return sse_events(_frames(items, fmt, include_usage=include_usage), items,
                      openai_error_event)


async def _frames(items: AsyncIterator[StreamItem], fmt: CompletionFormat, *,
                  include_usage: bool) -> AsyncIterator[str]:
    sent = ""
    for opening in fmt.opening():
        yield _data(opening)
    async for item in items:
        if isinstance(item, TokenChunk):
            if item.text:
                sent += item.text
                yield _data(fmt.chunk(item.text, None))
            continue
        # Whatever the chunks did not carry yet (normally nothing) goes in the last one.
        rest = item.text[len(sent):] if item.text.startswith(sent) else ""
        yield _data(fmt.chunk(rest, finish_reason(item)))
        if include_usage:
            yield _data(fmt.usage_chunk(item))
