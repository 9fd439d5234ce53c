"""The drain gate: once the process is told to stop, new work is refused with 503 "draining".

Reads, health and metrics stay open (load balancers and Prometheus keep looking while the
replica drains); what is already running is left alone so it can finish. `app.state.draining`
is the one switch: /readyz reads it too, so the replica leaves the Service at the same moment.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import ErrorKind
from server.api.openai.errors import send_route_error

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
    await send_route_error(send, path, DRAINING,
                           "draining: this replica is shutting down; retry on another",
                           headers=((b"retry-after", b"1"),))
