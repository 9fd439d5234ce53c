"""The HTTP edge: per-request metrics, one structured access-log line, and the catch-all.

A pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched; a stream is timed and logged when it ends. Handlers add
what only they know (adapter id, token counts) to `request.state.access`. The log line never
includes headers, so no Authorization value or API key can leak into logs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import INTERNAL, envelope
from server.api.metrics import ApiMetrics

access_log = logging.getLogger("softprompt.access")
log = logging.getLogger(__name__)


@dataclass
class AccessEntry:
    """Filled in along the way; logged as one JSON line when the response is done."""

    method: str
    path: str
    request_id: str | None = None
    adapter_id: str | None = None
    status: int = 0
    latency_ms: float = 0.0
    prompt_tokens: int | None = None
    virtual_tokens: int | None = None
    completion_tokens: int | None = None
    stream: bool | None = None
    error: str | None = None  # exception type of a failure
    tenant: str | None = None  # set by auth; the metrics label (bounded by the keys file)


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        entry = AccessEntry(method=scope["method"], path=scope["path"])
        scope.setdefault("state", {})["access"] = entry
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                entry.status = message["status"]
            await send(message)

        self.metrics.http_in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            entry.status = entry.status or 499
            entry.error = "ClientDisconnect"
        except Exception as exc:  # the catch-all: never a traceback to the client
            entry.error = type(exc).__name__
            log.exception("unhandled %s on %s %s", type(exc).__name__, entry.method, entry.path)
            if not started:
                entry.status = INTERNAL.status
                await _send_internal_error(send)
        finally:
            self.metrics.http_in_flight -= 1
            seconds = time.perf_counter() - start
            entry.latency_ms = round(seconds * 1000, 3)
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint=endpoint, method=entry.method,
                                         status=entry.status or 499, seconds=seconds,
                                         tenant=entry.tenant or "unauthenticated")
            access_log.info("%s", json.dumps(
                {k: v for k, v in asdict(entry).items() if v is not None}))


async def _send_internal_error(send: Send) -> None:
    body = json.dumps(envelope(INTERNAL, "internal server error")).encode()
    try:
        await send({"type": "http.response.start", "status": INTERNAL.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # the client is gone; nothing more to do
        log.debug("could not send the 500 response", exc_info=True)
