"""Engine exceptions, plus the adapters_store ones re-exported so server.api imports one place."""

from adapters_store.errors import (  # noqa: F401  (re-exported for server.api)
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStoreError,
    FileTooLargeError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    InvalidTemplateError,
    LimitExceededError,
    StoreUnavailableError,
    UnsupportedAdapterTypeError,
)


class EngineError(Exception):
    """Base of the engine's own errors."""


class EngineNotReadyError(EngineError):
    """Model still loading, or the engine is shutting down (HTTP 503)."""


class QueueFullError(EngineError):
    """The request queue is at --max-queue (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequestError(EngineError, ValueError):
    """A request the model cannot run (empty, out-of-vocabulary ids, bad parameters), or whose
    values are out of range for this server or its tenant (HTTP 422). The one class for both:
    the HTTP layer raises it for what it checks itself, the engine for what it checks at
    submit, so one bad row never fails a whole batch.
    """


class UnembeddableTokenError(InvalidRequestError):
    """Text or a template anchor holds a token the tokenizer knows but the model's input
    embedding has no row for (HTTP 400): the message names the token."""


class RequestTooLongError(EngineError):
    """Prompt + virtual tokens + max_new_tokens exceed what the model can attend to (HTTP 422)."""


class MaxNewTokensTooLongError(RequestTooLongError):
    """The prompt and virtual tokens leave room in the context, but not for max_new_tokens: the
    request's max_new_tokens is what to lower (OpenAI's routes name `max_tokens`)."""


class AdapterChangedError(EngineError):
    """The adapter was overwritten or deleted after this request was admitted with its earlier
    version, before that version was loaded (HTTP 409): a request never runs with rows of a
    version it was not validated against. Retrying serves the current version."""


class GenerationError(EngineError):
    """The batch holding this request failed on the model; other batches are unaffected (500)."""
