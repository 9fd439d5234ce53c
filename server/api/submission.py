"""Running a generating request once it is admitted: awaiting the engine or streaming from it,
the streams of several prompts or choices merged into one, and the SSE framing. A client that
goes away is noticed while we wait (a task watches for http.disconnect) and its request is
aborted in the engine, so nothing keeps computing for nobody and the in-flight/queue gauges
fall back to zero. The checks before (limits, tokenizing, admission) are server.api.admission.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from server.api.deps import get_access
from server.api.edge import AccessEntry
from server.api.metrics import ApiMetrics
from server.api.quotas import Lease
from server.engine.interface import (
    EngineClient,
    GenerationRequest,
    GenerationResult,
    TokenChunk,
)

T = TypeVar("T")
StreamItem = TokenChunk | GenerationResult


def unsent(text: str, sent: str) -> str:
    """What a stream's final text adds to what its chunks carried (normally nothing)."""
    return text[len(sent):] if text.startswith(sent) else ""


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


def sse_response(events: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    """Server-Sent Events that no proxy caches or buffers (nginx honours X-Accel-Buffering)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers=headers | {"Cache-Control": "no-cache",
                                                "X-Accel-Buffering": "no"})


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
