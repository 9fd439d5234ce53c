"""The one engine path of every generating route: /v1/generate and the OpenAI routes.

Routes differ only in the shapes they parse and write. Everything else happens here, once:
the limits that depend on settings and the tenant's quotas, tokenization, admission (rate and
concurrency lease), then awaiting the engine or streaming from it. A client that goes away is
noticed while we wait (a task watches for http.disconnect) and its request is aborted in the
engine, so nothing keeps computing for nobody and the in-flight/queue gauges fall back to zero.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from server.api.deps import get_access
from server.api.edge import AccessEntry
from server.api.errors import InvalidRequestError
from server.api.metrics import ApiMetrics
from server.api.quotas import Lease, Quotas, check_generation, quotas_for
from server.api.schemas import MAX_STOP_CHARS
from server.config import Settings
from server.engine.interface import (
    EngineClient,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
)

T = TypeVar("T")
StreamItem = TokenChunk | GenerationResult


def unsent(text: str, sent: str) -> str:
    """What a stream's final text adds to what its chunks carried (normally nothing)."""
    return text[len(sent):] if text.startswith(sent) else ""


# Work on a request's input or output that grows with its size runs on a worker thread above
# these sizes: prompts of more characters, chats of more messages, more token ids or logprob
# entries (decoding token strings, writing logprobs, rendering a large response). The event
# loop must keep answering health checks and other tenants meanwhile. Smaller work stays
# inline (a thread hop costs more than doing it).
OFF_LOOP_CHARS = 16_384
OFF_LOOP_MESSAGES = 64
OFF_LOOP_TOKENS = 2_048


async def off_loop(work: Callable[[], T], *, chars: int = 0, messages: int = 0,
                   tokens: int = 0) -> T:
    """`work()`, on a worker thread when its size (characters, messages, token ids or
    logprob entries) is past the OFF_LOOP_* bounds, else inline: the one way request work
    that grows with the input leaves the event loop."""
    if chars > OFF_LOOP_CHARS or messages > OFF_LOOP_MESSAGES or tokens > OFF_LOOP_TOKENS:
        return await asyncio.to_thread(work)
    return work()


# json.dumps holds the interpreter lock for the whole of one call, so one call on a body of
# megabytes stalls the event loop even from a worker thread. Bodies are written in calls of
# at most this many list items (the lock changes hands between them).
_JSON_PIECE = 1024
# What JSONResponse writes (compact UTF-8, no NaN), and what json.dumps writes by default.
_AS_RESPONSE: dict[str, Any] = {"ensure_ascii": False, "allow_nan": False,
                                "separators": (",", ":")}
_AS_DUMPS: dict[str, Any] = {"ensure_ascii": True, "allow_nan": True,
                             "separators": (", ", ": ")}


def json_text(value: Any, *, as_response: bool = True) -> str:
    """What JSONResponse writes for `value` (as_response=False: what json.dumps writes by
    default), made in many small json.dumps calls, so writing a large body on a worker thread
    leaves the event loop free to run between them."""
    out: list[str] = []
    _write_json(value, out, _AS_RESPONSE if as_response else _AS_DUMPS)
    return "".join(out)


class PiecewiseJSONResponse(JSONResponse):
    """A JSONResponse whose body is written by json_text: build it through off_loop."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


def _write_json(value: Any, out: list[str], options: dict[str, Any]) -> None:
    item_sep, key_sep = options["separators"]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or not any(
                isinstance(v, dict | list | tuple) for v in value.values()):
            out.append(json.dumps(value, **options))
            return
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append((item_sep if i else "") + json.dumps(key, **options) + key_sep)
            _write_json(item, out, options)
        out.append("}")
    elif isinstance(value, list | tuple):
        if any(isinstance(v, dict | list | tuple) for v in value):
            out.append("[")
            for i, item in enumerate(value):
                if i:
                    out.append(item_sep)
                _write_json(item, out, options)
            out.append("]")
        elif len(value) <= _JSON_PIECE:
            out.append(json.dumps(value, **options))
        else:
            out.append("[" + item_sep.join(
                json.dumps(value[i:i + _JSON_PIECE], **options)[1:-1]
                for i in range(0, len(value), _JSON_PIECE)) + "]")
    else:
        out.append(json.dumps(value, **options))


def check_params(params: SamplingParams, *, settings: Settings, quotas: Quotas,
                 vocab_size: int, top_k_field: str = "top_k") -> None:
    """Limits on the sampling parameters (before any tokenizing work is spent)."""
    check_generation(quotas, max_new_tokens=params.max_new_tokens, input_tokens=None)
    if vocab_size and params.top_k > vocab_size:
        raise InvalidRequestError(f"{top_k_field}={params.top_k} is larger than the model's "
                                  f"vocabulary of {vocab_size} tokens; use 0 to turn top-k "
                                  "off")
    if len(params.stop) > settings.max_stop_strings:
        raise InvalidRequestError(f"{len(params.stop)} stop strings; at most "
                                  f"{settings.max_stop_strings}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in params.stop):
        raise InvalidRequestError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")


async def tokenize_text(engine: EngineClient, text: str, *, quotas: Quotas,
                        max_new_tokens: int, add_special_tokens: bool = True) -> list[int]:
    """Text tokenized with the tokenizer's defaults (special tokens added unless told not
    to), within the tenant's max_input_tokens."""
    return await tokenize_within(lambda: engine.tokenize(text,
                                                         add_special_tokens=add_special_tokens),
                                 chars=len(text),
                                 quotas=quotas, max_new_tokens=max_new_tokens)


async def tokenize_within(tokenize: Callable[[], list[int]], *, chars: int, quotas: Quotas,
                          max_new_tokens: int, items: int = 1) -> list[int]:
    """Run `tokenize` on a prompt of `chars` characters (in `items` messages), within the
    tenant's max_input_tokens; a large one on a worker thread, off the event loop."""
    # A cheap bound before tokenizing: no tokenizer makes fewer tokens than bytes / 64.
    if chars > 64 * quotas.max_input_tokens:
        raise InvalidRequestError(f"the prompt is longer than max_input_tokens="
                                  f"{quotas.max_input_tokens} tokens")
    prompt_ids = await off_loop(tokenize, chars=chars, messages=items)
    check_generation(quotas, max_new_tokens=max_new_tokens, input_tokens=len(prompt_ids))
    return prompt_ids


def to_engine_request(prompt_ids: list[int], *, adapter_id: str | None, namespace: str,
                      params: SamplingParams) -> GenerationRequest:
    if not prompt_ids and adapter_id is None:
        raise InvalidRequestError("the prompt tokenizes to no tokens and no adapter is given")
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt_ids),
                             adapter_id=adapter_id, namespace=namespace, params=params)


def admit(request: Request, namespace: str, quotas: Quotas,
          engine_request: GenerationRequest, *, stream: bool, sequences: int = 1) -> Lease:
    """Take the tenant's rate token and a concurrency slot per sequence (429 when over); fill
    the access log."""
    access = get_access(request)
    access.adapter_id, access.stream = engine_request.adapter_id, stream
    access.request_id = engine_request.request_id
    manager, _ = quotas_for(request, namespace)
    return manager.admit(namespace, quotas, slots=sequences)


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


def _record(results: list[GenerationResult], metrics: ApiMetrics, access: AccessEntry) -> None:
    """Metrics per result; the access log's token counts add up every sequence of the HTTP
    request (each of n streams records its own result here)."""
    for result in results:
        metrics.observe_result(result, tenant=access.tenant or "default")
        access.prompt_tokens = (access.prompt_tokens or 0) + result.prompt_tokens
        access.virtual_tokens = (access.virtual_tokens or 0) + result.virtual_tokens
        access.completion_tokens = (access.completion_tokens or 0) + result.completion_tokens


async def complete(request: Request, engine: EngineClient, engine_request: GenerationRequest,
                   *, metrics: ApiMetrics, lease: Lease) -> tuple[GenerationResult, float]:
    """The whole result and the milliseconds the engine took; releases the lease."""
    results, ms = await complete_all(request, engine, [engine_request], metrics=metrics,
                                     lease=lease)
    return results[0], ms


async def complete_all(request: Request, engine: EngineClient,
                       engine_requests: list[GenerationRequest], *, metrics: ApiMetrics,
                       lease: Lease) -> tuple[list[GenerationResult], float]:
    """The results of several requests of one HTTP request (OpenAI's n and prompt lists), run
    at once as batch mates, and the milliseconds the engine took; one failing fails them all
    (the rest are aborted). Releases the lease."""
    started = time.perf_counter()
    try:
        results = await _unless_disconnected(request, _gather(
            [engine.generate(r) for r in engine_requests]))
    except ClientDisconnect:
        for engine_request in engine_requests:
            await engine.abort(engine_request.request_id)
        raise
    finally:
        lease.release()
    _record(results, metrics, get_access(request))
    return results, (time.perf_counter() - started) * 1000


async def _gather(awaitables: list[Awaitable[T]]) -> list[T]:
    """All results in order; when one raises (or this is cancelled) the others are cancelled,
    which aborts them in the engine."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def open_streams(request: Request, engine: EngineClient,
                       engine_requests: list[GenerationRequest], *, metrics: ApiMetrics,
                       lease: Lease) -> AsyncIterator[tuple[int, StreamItem]]:
    """open_stream for several requests: (index, item) in the order items arrive. Each
    stream's first item is awaited before the route answers; closing the iterator closes
    (aborts) every stream and releases the lease once."""
    streams: list[AsyncIterator[StreamItem]] = []
    try:
        for engine_request in engine_requests:
            streams.append(await open_stream(request, engine, engine_request, metrics=metrics,
                                             lease=_Shared(lease)))
    except BaseException:
        for stream in streams:
            await _close(stream)
        lease.release()
        raise
    return _merged(streams, lease)


class _Shared:
    """One lease held by several streams: only the merged iterator releases it."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease

    def release(self) -> None:
        pass


async def _merged(streams: list[AsyncIterator[StreamItem]],
                  lease: Lease) -> AsyncIterator[tuple[int, StreamItem]]:
    queue: asyncio.Queue[tuple[int, StreamItem | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamItem]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await _close(stream)
        lease.release()


async def open_stream(request: Request, engine: EngineClient, engine_request: GenerationRequest,
                      *, metrics: ApiMetrics, lease: Lease) -> AsyncIterator[StreamItem]:
    """TokenChunks then one GenerationResult. The first item is awaited here, before the
    route answers, so errors before any token (unknown adapter, full queue, not ready) still
    get their real status code; later errors raise from the iterator and the route writes
    them into its stream. Closing or exhausting the iterator releases the lease and aborts
    whatever is still running."""
    try:
        stream = await engine.open_stream(engine_request)
        try:
            first = await _unless_disconnected(request, anext(stream))
        except BaseException:
            await _close(stream)
            raise
    except BaseException:
        lease.release()
        raise
    return _items(first, stream, metrics, get_access(request), lease)


async def _items(first: StreamItem, stream: AsyncIterator[StreamItem], metrics: ApiMetrics,
                 access: AccessEntry, lease: Lease) -> AsyncIterator[StreamItem]:
    try:
        item = first
        while not isinstance(item, GenerationResult):
            yield item
            item = await anext(stream)
        _record([item], metrics, access)
        yield item
    except Exception as exc:
        access.error = type(exc).__name__
        raise
    finally:
        lease.release()
        await _close(stream)


async def sse_events(frames: AsyncIterator[str], items: AsyncIterator[StreamItem],
                     error_event: Callable[[BaseException], str]) -> AsyncIterator[str]:
    """How every SSE response of an open_stream runs: `frames` (rendered from `items`) as
    they come; an error after the 200 went out travels as one `error_event` frame; the engine
    stream is closed whatever happens (which aborts it when the client left); then [DONE]."""
    failure: str | None = None
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:
        failure = error_event(exc)
    finally:
        await _close(frames)
        await _close(items)
    if failure is not None:
        yield failure
    yield "data: [DONE]\n\n"
