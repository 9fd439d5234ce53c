"""The drain gate: once the process is told to stop, new work is refused with 503 "draining".

Reads, health and metrics stay open (load balancers and Prometheus keep looking while the
replica drains); what is already running is left alone so it can finish. `app.state.draining`
is the one switch: /readyz reads it too, so the replica leaves the Service at the same moment.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import ErrorKind, envelope
from server.api.openai_errors import OPENAI_PATHS, openai_body

DRAINING = ErrorKind(503, "draining")
_NEW_WORK_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class DrainGate:
    """Pure ASGI, so a refused request costs no routing, parsing or body read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in _NEW_WORK_METHODS
                and scope["path"].startswith("/v1/")
                and getattr(scope["app"].state, "draining", False)):
            await _refuse(send, scope["path"])
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, path: str) -> None:
    message = "draining: this replica is shutting down; retry on another"
    # OpenAI clients get OpenAI's error shape on the OpenAI-compatible routes.
    error = (openai_body(DRAINING.status, message, param=None, code=DRAINING.type)
             if path.startswith(OPENAI_PATHS) else envelope(DRAINING, message))
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": DRAINING.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
