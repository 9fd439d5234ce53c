"""A deadline on receiving a request's body, for every route (uploads included).

A client that sends its headers and then trickles or stalls its body would otherwise hold a
connection, a task and (for uploads) a spool file for as long as it likes; enough of them
exhaust the server. The deadline counts from the first byte of the body being asked for to
its last; once the body is complete, `receive` passes through untouched (the routes watch it
for the client's disconnect for as long as a response runs).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ErrorKind
from server.api.openai.errors import send_route_error

TIMED_OUT = ErrorKind(408, "request_timeout")


class BodyTimeout:
    """Pure ASGI: past --request-body-timeout-s, answer 408 (if nothing was sent yet) and tell
    the app the client left, so it stops reading and cleans up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit_s: float = scope["app"].state.settings.request_body_timeout_s
        deadline: float | None = None
        complete = timed_out = started = False

        async def timed_receive() -> Message:
            nonlocal deadline, complete, timed_out
            if complete:
                return await receive()
            if timed_out:
                return {"type": "http.disconnect"}
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + limit_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - now))
            except TimeoutError:
                timed_out = True
                if not started:
                    await send_route_error(
                        send, scope["path"], TIMED_OUT,
                        f"the request body did not arrive within {limit_s:g} s "
                        "(--request-body-timeout-s); send it at once")
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if timed_out:  # whatever the app answers after the 408 is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, timed_receive, guarded_send)
