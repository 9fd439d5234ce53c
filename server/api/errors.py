"""THE one table from exception type to HTTP status and error type, and the error envelope.

Every error a client sees is `{"error": {"type": ..., "message": ...}}`. Handlers raise the
engine's or the store's exception types; this module alone decides the status. A type not in
the table maps through its nearest base class (e.g. TooManyVirtualTokensError ->
LimitExceededError -> 413); anything else is a 500 whose log line keeps the exception type.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import (
    AdapterChangedError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStoreError,
    EngineError,
    EngineNotReadyError,
    GenerationError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    InvalidRequestError,
    InvalidTemplateError,
    LimitExceededError,
    QueueFullError,
    RequestTooLongError,
    StoreUnavailableError,
    UnembeddableTokenError,
    UnsupportedAdapterTypeError,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Errors the HTTP layer itself detects (bad upload framing, limits, ranges)."""


class InvalidUploadError(ApiError):
    """The multipart upload is malformed or lacks the parts an adapter needs (400)."""


class UploadTooLargeError(ApiError):
    """A part, the body or the number of parts exceeds the configured limit (413)."""


class AuthError(ApiError):
    """Missing or unknown API key (401 with WWW-Authenticate: Bearer)."""


class QuotaExceededError(ApiError):
    """A tenant quota refused the request; the message names the limit and its value."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyRequestsError(QuotaExceededError):
    """requests_per_second or max_concurrent_requests (429 with Retry-After)."""


class StorageQuotaError(QuotaExceededError):
    """max_adapters or max_stored_bytes (413)."""


class RequestQuotaError(QuotaExceededError):
    """max_new_tokens or max_input_tokens of the tenant (422)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str


# Order does not matter: lookup walks the exception's MRO and takes the first hit.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidUploadError: ErrorKind(400, "invalid_upload"),
    UploadTooLargeError: ErrorKind(413, "payload_too_large"),
    AuthError: ErrorKind(401, "unauthorized"),
    TooManyRequestsError: ErrorKind(429, "rate_limited"),
    StorageQuotaError: ErrorKind(413, "quota_exceeded"),
    RequestQuotaError: ErrorKind(422, "validation_error"),  # same type as the global limits
    InvalidAdapterError: ErrorKind(400, "invalid_adapter"),
    InvalidTemplateError: ErrorKind(400, "invalid_template"),
    UnsupportedAdapterTypeError: ErrorKind(400, "unsupported_adapter_type"),
    LimitExceededError: ErrorKind(413, "payload_too_large"),
    InvalidAdapterIdError: ErrorKind(422, "invalid_adapter_id"),
    AdapterNotFoundError: ErrorKind(404, "adapter_not_found"),
    AdapterExistsError: ErrorKind(409, "adapter_exists"),
    StoreUnavailableError: ErrorKind(503, "store_unavailable"),
    AdapterStoreError: ErrorKind(500, "store_error"),
    EngineNotReadyError: ErrorKind(503, "not_ready"),
    QueueFullError: ErrorKind(429, "queue_full"),
    RequestTooLongError: ErrorKind(422, "request_too_long"),
    UnembeddableTokenError: ErrorKind(400, "unembeddable_token"),
    InvalidRequestError: ErrorKind(422, "validation_error"),
    AdapterChangedError: ErrorKind(409, "adapter_changed"),
    GenerationError: ErrorKind(500, "generation_error"),
    EngineError: ErrorKind(500, "engine_error"),
}
INTERNAL = ErrorKind(500, "internal_error")

# Status codes of Starlette's own HTTPExceptions (unknown route, wrong method, ...).
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request",
               413: "payload_too_large", 415: "unsupported_media_type"}


def classify(exc: BaseException) -> ErrorKind | None:
    """The table entry for exc's nearest mapped class, or None when nothing maps."""
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return None


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The error envelope every non-2xx response carries."""

    error: ErrorDetail


def envelope(kind: ErrorKind, message: str) -> dict:
    return {"error": {"type": kind.type, "message": message}}


def error_response(exc: BaseException) -> JSONResponse:
    """The response for a mapped exception (a 500 'internal_error' for unmapped ones)."""
    kind = classify(exc) or INTERNAL
    message = str(exc) if kind is not INTERNAL else "internal server error"
    headers = None
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, QueueFullError | QuotaExceededError) and retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    elif isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(envelope(kind, message or type(exc).__name__), status_code=kind.status,
                        headers=headers)


def error_event(exc: BaseException) -> str:
    """An error inside an already started SSE stream: the envelope as one event."""
    kind = classify(exc) or INTERNAL
    message = str(exc) if kind is not INTERNAL else "internal server error"
    return f"data: {json.dumps(envelope(kind, message))}\n\n"


def validation_message(exc: RequestValidationError) -> str:
    """Each problem as `field: what is wrong`; a body that is not JSON says where it breaks,
    and one left unparsed because its content-type is not JSON says to send that header."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return _json_message(exc.body, err)
        if tuple(err.get("loc", ())) == ("body",) and isinstance(exc.body, bytes):
            # FastAPI reads a body as JSON only when its content-type says JSON (or is absent);
            # otherwise the model sees the raw bytes, which no field of it can match.
            return (f"body: not read as JSON (send the header content-type: "
                    f"application/json): {err.get('msg', 'invalid')}")
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc or 'body'}: {message}")
    return "; ".join(parts) or "invalid request"


def _json_message(body: Any, err: dict) -> str:
    """'invalid JSON body at line L column C: <the parser's reason>', as json.loads counts."""
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else 0
    reason = (err.get("ctx") or {}).get("error", "not JSON")
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return f"invalid JSON body: {reason}"
    line = body.count("\n", 0, pos) + 1
    column = pos - body.rfind("\n", 0, pos)
    return f"invalid JSON body at line {line} column {column}: {reason}"


async def _on_mapped(request: Request, exc: Exception) -> JSONResponse:
    kind = classify(exc) or INTERNAL
    if kind.status >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return error_response(exc)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(envelope(ErrorKind(422, "validation_error"), validation_message(exc)),
                        status_code=422)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = ErrorKind(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"))
    return JSONResponse(envelope(kind, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Register the table's handlers; the catch-all for everything else is EdgeMiddleware."""
    for exc_type in ERROR_TABLE:
        app.add_exception_handler(exc_type, _on_mapped)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` entries: each status documented with the error envelope model."""
    descriptions = {
        400: "Bad adapter or upload format", 401: "Missing or invalid API key",
        404: "Unknown adapter", 409: "Adapter id exists", 413: "Too large",
        422: "Request validation failed", 429: "Queue full or over quota (see Retry-After)",
        500: "Internal error", 503: "Not ready, draining, or store unavailable",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")}
            for s in statuses}
