"""OpenAI's error shape for the OpenAI-compatible routes, from the one table in errors.py.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}` and pick their exception
class by status, so on these routes every error (validation, auth, quotas, unknown model,
engine) is written that way. The status still comes from errors.ERROR_TABLE, except that 422
becomes 400: OpenAI has no 422 and its clients raise BadRequestError for invalid arguments.
The native routes keep the DESIGN envelope; only routes built with OpenAIRoute change.
"""

from __future__ import annotations

import json
import logging
import re
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from server.api.errors import (
    INTERNAL,
    ErrorKind,
    InvalidRequestError,
    classify,
    envelope,
    error_response,
    validation_message,
)
from server.api.schemas import unknown_fields_message
from server.engine.errors import AdapterNotFoundError

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}
_KEPT_HEADERS = ("retry-after", "www-authenticate")
_UNION_MEMBER = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]")
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                "/detokenize")


class OpenAIParamError(InvalidRequestError):
    """A request argument we refuse (unsupported value, bad shape): 400 naming `param`."""

    def __init__(self, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ModelNotFoundError(AdapterNotFoundError):
    """`model` names neither the served model nor an adapter of the caller's tenant."""


def openai_body(status: int, message: str, *, param: str | None, code: str | None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_route_error(send: Any, path: str, kind: ErrorKind, message: str, *,
                           headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A whole JSON error response from pure ASGI middleware (drain gate, body limit), in the
    shape the route's clients read: OpenAI's on the OpenAI routes, the envelope elsewhere."""
    error = (openai_body(kind.status, message, param=None, code=kind.type)
             if path.startswith(OPENAI_PATHS) else envelope(kind, message))
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": kind.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _model_at(model: type[BaseModel], path: list[str | int]) -> type[BaseModel] | None:
    """The pydantic model a validation error's location points into (list indexes and union
    members pass through), or None where the path leaves models."""
    for step in path:
        if isinstance(step, int) or _UNION_MEMBER.fullmatch(step):
            continue
        field = model.model_fields.get(step)
        found = None if field is None else _first_model(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (`M`, `list[M]`, `M | None`, ...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _first_model(arg)) is not None:
            return found
    return None


def _validation_message(exc: RequestValidationError, body: type[BaseModel] | None) -> str:
    """validation_message, with each unknown field named as /v1/generate names its own
    (schemas.unknown_fields_message: 'did you mean ...?' and the fields there are)."""
    extra = [e for e in exc.errors() if e.get("type") == "extra_forbidden"]
    if body is None or not extra:
        return validation_message(exc)
    by_parent: dict[tuple[str | int, ...], list[str]] = {}
    for err in extra:
        *parent, name = [p for p in err.get("loc", ()) if p != "body"] or [""]
        by_parent.setdefault(tuple(parent), []).append(str(name))
    parts = []
    for parent, names in by_parent.items():
        model = _model_at(body, list(parent))
        if model is None:
            return validation_message(exc)
        where = ".".join(str(p) for p in parent if not _UNION_MEMBER.fullmatch(str(p)))
        known = unknown_fields_message(names, list(model.model_fields))
        parts.append(f"{where}: {known}" if where else known)
    rest = [e for e in exc.errors() if e.get("type") != "extra_forbidden"]
    if rest:
        parts.append(validation_message(RequestValidationError(rest, body=exc.body)))
    return "; ".join(parts)


def openai_error(exc: BaseException, *,
                 body: type[BaseModel] | None = None) -> tuple[int, dict, dict[str, str]]:
    """(status, body, headers) of exc in OpenAI's shape; `body`, the route's request model,
    lets a validation error suggest the field an unknown one meant."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        # A union's member (`prompt.list[int]`) is not part of the parameter's name.
        loc = [str(p) for p in first.get("loc", ())
               if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
        message = _validation_message(exc, body)
        if first.get("type") == "json_invalid":
            loc = []
        return 400, openai_body(400, message, param=".".join(loc) or None,
                          code="invalid_value"), {}
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, openai_body(exc.status_code, str(exc.detail), param=None,
                                      code=None), dict(exc.headers or {})
    if isinstance(exc, AdapterNotFoundError):
        return 404, openai_body(404, str(exc), param="model", code="model_not_found"), {}
    native = error_response(exc)
    kind = classify(exc) or INTERNAL
    status = 400 if native.status_code == 422 else native.status_code
    if status >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    message = json.loads(native.body)["error"]["message"]
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or kind.type
    headers = {k: v for k, v in native.headers.items() if k in _KEPT_HEADERS}
    return status, openai_body(status, message, param=param, code=code), headers


def openai_error_response(exc: BaseException, *,
                          body: type[BaseModel] | None = None) -> JSONResponse:
    status, content, headers = openai_error(exc, body=body)
    return JSONResponse(content, status_code=status, headers=headers or None)


def openai_error_event(exc: BaseException) -> str:
    """An error after a stream started: one `data:` event with the error object."""
    return f"data: {json.dumps(openai_error(exc)[1])}\n\n"


class OpenAIRoute(APIRoute):
    """A route whose every error, dependencies' and validation's included, is OpenAI-shaped.

    The app-level handlers of errors.py never see these exceptions: they are turned into
    responses here, inside the route, before they propagate.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body = None if self.body_field is None else _first_model(
            self.body_field.field_info.annotation)

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                raise  # nobody to answer; the edge logs it as 499
            except Exception as exc:  # every other error, in OpenAI's shape
                if classify(exc) is None and not isinstance(
                        exc, RequestValidationError | StarletteHTTPException):
                    log.exception("unhandled %s on %s", type(exc).__name__, request.url.path)
                return openai_error_response(exc, body=body)

        return handle
