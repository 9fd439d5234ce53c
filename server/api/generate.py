"""POST /v1/generate: validate and tokenize once at the edge, submit, answer JSON or SSE.

The engine does the batching; each handler just awaits its own request, so concurrent HTTP
requests become batch mates. A client that goes away is noticed while we wait (a task watches
for http.disconnect) and its request is aborted in the engine, so nothing keeps computing for
nobody and the in-flight/queue gauges fall back to zero.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from server.api.deps import EngineDep, MetricsDep, SettingsDep, TenantDep, get_access
from server.api.edge import AccessEntry
from server.api.errors import InvalidRequestError, error_event, error_responses
from server.api.metrics import ApiMetrics
from server.api.quotas import Lease, Quotas, check_generation, quotas_for
from server.api.schemas import MAX_STOP_CHARS, GenerateRequest, GenerateResponse, StreamEvent
from server.config import Settings
from server.engine.interface import (
    EngineClient,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
)

router = APIRouter(tags=["generate"])
T = TypeVar("T")

def _stream_doc() -> dict:
    schema = StreamEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # Usage and FinishReason are components already
    return {
        "description": "JSON body, or with `stream: true` Server-Sent Events: one `data:` "
                       "event per token chunk (finish_reason null), a final event with "
                       "finish_reason and usage, then `data: [DONE]`. An error after the stream "
                       "started is one `data:` event holding the error envelope, then "
                       "`data: [DONE]`.",
        "content": {"text/event-stream": {"schema": schema}},
    }


def _to_engine_request(body: GenerateRequest, *, engine: EngineClient, settings: Settings,
                       namespace: str, quotas: Quotas) -> GenerationRequest:
    """The edge's checks (limits that depend on settings and the tenant's quotas) and
    tokenization, done once."""
    check_generation(quotas, max_new_tokens=body.max_new_tokens, input_tokens=None)
    if len(body.stop) > settings.max_stop_strings:
        raise InvalidRequestError(f"{len(body.stop)} stop strings; at most "
                                  f"{settings.max_stop_strings}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in body.stop):
        raise InvalidRequestError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
    # A cheap bound before tokenizing: no tokenizer makes fewer tokens than bytes / 64.
    if len(body.text) > 64 * quotas.max_input_tokens:
        raise InvalidRequestError(f"text is longer than max_input_tokens="
                                  f"{quotas.max_input_tokens} tokens")
    prompt_ids = engine.tokenize(body.text)
    check_generation(quotas, max_new_tokens=body.max_new_tokens, input_tokens=len(prompt_ids))
    if not prompt_ids and body.adapter_id is None:
        raise InvalidRequestError("text tokenizes to no tokens and no adapter is given")
    params = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                            stop=tuple(body.stop), ignore_eos=body.ignore_eos)
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt_ids),
                             adapter_id=body.adapter_id, namespace=namespace, params=params)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the request body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it and raising ClientDisconnect if the client leaves."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnect()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _close(stream: Any) -> None:
    """Close the engine stream (which aborts it), even from a cancelled task."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


def _record(result: GenerationResult, metrics: ApiMetrics, access: AccessEntry) -> None:
    metrics.observe_result(result)
    access.prompt_tokens = result.prompt_tokens
    access.virtual_tokens = result.virtual_tokens
    access.completion_tokens = result.completion_tokens


@router.post(
    "/v1/generate", response_model=GenerateResponse, summary="Generate with an adapter",
    responses={200: _stream_doc(), **error_responses(401, 404, 413, 422, 429, 500, 503)},
)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep,
    settings: SettingsDep, metrics: MetricsDep,
    namespace: TenantDep,
) -> Any:
    access = get_access(request)
    access.adapter_id, access.stream = body.adapter_id, body.stream
    manager, quotas = quotas_for(request, namespace)
    engine_request = _to_engine_request(body, engine=engine, settings=settings,
                                        namespace=namespace, quotas=quotas)
    access.request_id = engine_request.request_id
    lease = manager.admit(namespace, quotas)
    if body.stream:
        try:
            return await _start_stream(request, engine, engine_request, metrics, access, lease)
        except BaseException:
            lease.release()
            raise
    started = time.perf_counter()
    try:
        result = await _unless_disconnected(request, engine.generate(engine_request))
    except ClientDisconnect:
        await engine.abort(engine_request.request_id)
        raise
    finally:
        lease.release()
    engine_ms = (time.perf_counter() - started) * 1000
    _record(result, metrics, access)
    # Server-Timing tells a client how much of its latency was the engine's (benchmarks use it
    # to compute the HTTP layer's overhead).
    return JSONResponse(GenerateResponse.from_result(result).model_dump(mode="json"),
                        headers={"Server-Timing": f"engine;dur={engine_ms:.3f}",
                                 "X-Request-Id": engine_request.request_id})


async def _start_stream(request: Request, engine: EngineClient, engine_request: GenerationRequest,
                        metrics: ApiMetrics, access: AccessEntry,
                        lease: Lease) -> StreamingResponse:
    """Wait for the first item before answering, so errors before any token (unknown
    adapter, full queue, not ready) still get their real status code."""
    stream = engine.generate_stream(engine_request)
    try:
        first = await _unless_disconnected(request, anext(stream))
    except BaseException:
        await _close(stream)
        raise
    events = _events(first, stream, engine_request, metrics, access, lease)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "X-Request-Id": engine_request.request_id})


def _event(adapter_id: str | None, text: str, token_ids: Any, **extra: Any) -> str:
    payload = {"adapter_id": adapter_id, "text": text, "token_ids": list(token_ids),
               "finish_reason": None, "usage": None} | extra
    return f"data: {json.dumps(payload)}\n\n"


async def _events(first: TokenChunk | GenerationResult, stream: AsyncIterator,
                  engine_request: GenerationRequest, metrics: ApiMetrics,
                  access: AccessEntry, lease: Lease) -> AsyncIterator[str]:
    adapter_id = engine_request.adapter_id
    sent_text, sent_ids = "", 0
    failure: str | None = None
    try:
        item = first
        while not isinstance(item, GenerationResult):
            sent_text += item.text
            sent_ids += len(item.token_ids)
            yield _event(adapter_id, item.text, item.token_ids)
            item = await anext(stream)
        _record(item, metrics, access)
        # Whatever the chunks did not carry yet (normally nothing) goes in the final event.
        rest = item.text[len(sent_text):] if item.text.startswith(sent_text) else ""
        usage = {"prompt_tokens": item.prompt_tokens, "virtual_tokens": item.virtual_tokens,
                 "completion_tokens": item.completion_tokens}
        yield _event(adapter_id, rest, item.token_ids[sent_ids:],
                     finish_reason=str(item.finish_reason), usage=usage)
    except Exception as exc:  # after the 200 went out, errors travel in the stream
        access.error = type(exc).__name__
        failure = error_event(exc)
    finally:
        lease.release()
        await _close(stream)
    if failure is not None:
        yield failure
    yield "data: [DONE]\n\n"
