"""A byte limit on JSON request bodies (generate and the OpenAI routes), enforced while the body
streams in: Starlette reads a whole body into memory before parsing it, so without this a
client could make the server hold gigabytes. Adapter uploads have their own streamed limits
(uploads.py) and are left alone here.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ErrorKind
from server.api.openai.errors import send_route_error

TOO_LARGE = ErrorKind(413, "payload_too_large")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UPLOAD_PREFIX = "/v1/adapters"


class BodyLimit:
    """Pure ASGI: a declared Content-Length over the limit is refused before any byte is read;
    a chunked body is counted as it arrives and refused the moment it passes the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in _BODY_METHODS
                or scope["path"].startswith(_UPLOAD_PREFIX)):
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.settings.max_request_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, scope["path"], limit)
            return
        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            # Over the limit: answer 413 at once and tell the app the client left, so it
            # stops reading (FastAPI would turn an exception here into its own 400).
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not started:
                    refused = True
                    await _refuse(send, scope["path"], limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # whatever the app answers after the 413 is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


async def _refuse(send: Send, path: str, limit: int) -> None:
    await send_route_error(send, path, TOO_LARGE,
                           f"request body is larger than {limit} bytes "
                           "(--max-request-body-bytes); send a shorter prompt")
