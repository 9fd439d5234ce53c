"""Engine events for metrics. The API layer implements this with Prometheus; the engine does not
import prometheus_client, and tests can pass a recording observer."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class CacheEvent(StrEnum):
    HIT = "hit"
    MISS = "miss"
    EVICTION = "eviction"


class EngineObserver(Protocol):
    def batch_started(self, *, size: int, distinct_adapters: int) -> None: ...

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        """A batch ran `steps` decode steps for `size` rows; rows that finished early sat
        idle for the rest (static batching), so size * steps - generated_tokens is waste."""
        ...

    def queue_wait(self, seconds: float) -> None:
        """Time from submit to the request's batch starting."""
        ...

    def first_token(self, seconds: float) -> None:
        """Time from submit to the request's first generated token."""
        ...

    def cache_event(self, event: CacheEvent) -> None: ...

    def adapter_loaded(self, seconds: float) -> None:
        """Time to load one adapter from the store onto the model's device (cache miss)."""
        ...


class NullObserver:
    """Default when nobody listens."""

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        pass

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def cache_event(self, event: CacheEvent) -> None:
        pass

    def adapter_loaded(self, seconds: float) -> None:
        pass
