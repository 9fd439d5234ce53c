"""Engine events for metrics. The API layer implements this with Prometheus; the engine does not
import prometheus_client, and tests can pass a recording observer."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any, Protocol

log = logging.getLogger(__name__)


class CacheEvent(StrEnum):
    HIT = "hit"
    MISS = "miss"
    EVICTION = "eviction"


class EngineObserver(Protocol):
    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        """A model batch starts: a static batch, or one step of the engine core over the
        rows running plus those joining."""
        ...

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        """A batch ran `steps` decode steps for `size` rows; rows that finished early sat
        idle for the rest (static batching), so size * steps - generated_tokens is waste.
        The engine core reports each step with steps=1: size counts the rows in the
        forward (decodes and prefill chunks), generated_tokens the tokens drawn, so a chunk
        that draws nothing yet shows as a row-step without a token."""
        ...

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        """Time from submit to the request's batch starting (or its joining a running one);
        `tenant` is the request's namespace, so fairness between tenants can be watched."""
        ...

    def first_token(self, seconds: float, *, tenant: str) -> None:
        """Time from submit to the request's first generated token."""
        ...

    def cache_event(self, event: CacheEvent) -> None: ...

    def adapter_loaded(self, seconds: float) -> None:
        """Time to load one adapter from the store onto the model's device (cache miss)."""
        ...

    def prompt_built(self, seconds: float) -> None:
        """Time to build one request's prompt embeddings from its adapter's resident rows and
        its text (the vLLM engine, which takes prompts as embeddings; the built-in engine
        reads the rows in place and reports none)."""
        ...


class NullObserver:
    """Default when nobody listens."""

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        pass

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        pass

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        pass

    def first_token(self, seconds: float, *, tenant: str) -> None:
        pass

    def cache_event(self, event: CacheEvent) -> None:
        pass

    def adapter_loaded(self, seconds: float) -> None:
        pass

    def prompt_built(self, seconds: float) -> None:
        pass


class GuardedObserver:
    """What the engine calls: a listener that raises is logged and ignored, never allowed to
    fail a batch, a load or the engine thread. Other attributes are the wrapped listener's."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except Exception:
            log.exception("engine observer %s.%s failed; ignored",
                          type(self.inner).__name__, name)

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        self._call("batch_started", size=size, distinct_adapters=distinct_adapters)

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        self._call("batch_finished", size=size, steps=steps, generated_tokens=generated_tokens)

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        self._call("queue_wait", seconds, tenant=tenant)

    def first_token(self, seconds: float, *, tenant: str) -> None:
        self._call("first_token", seconds, tenant=tenant)

    def cache_event(self, event: CacheEvent) -> None:
        self._call("cache_event", event)

    def adapter_loaded(self, seconds: float) -> None:
        self._call("adapter_loaded", seconds)

    def prompt_built(self, seconds: float) -> None:
        self._call("prompt_built", seconds)
