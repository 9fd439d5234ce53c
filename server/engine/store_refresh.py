"""Keeps a replica's view of a shared store fresh: the stored-adapters count, and no resident
prompt of an adapter another replica deleted or overwrote.

Correctness does not wait for this thread: every request checks its adapter's record (at most
`store_refresh_s` old) and the prompt table serves only the version that record names. This
thread frees the device memory of adapters that changed elsewhere, off the hot path, and keeps
the count that /metrics reports within one period of the truth.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from adapters_store.errors import AdapterNotFoundError, AdapterStoreError
from adapters_store.records import AdapterRecord
from adapters_store.store import AdapterStore
from server.engine.prompt_table import version_of

log = logging.getLogger(__name__)


def count_stored(store: AdapterStore) -> int:
    """A backend's cheap count (S3 lists keys only) when it has one, else len(list())."""
    count = getattr(store, "count", None)
    return int(count()) if callable(count) else len(store.list())


class ResidentPrompts(Protocol):
    """Where soft prompts are resident: a core (server.engine.core_client) or a table."""

    def resident_versions(self) -> dict[tuple[str, str], str]: ...

    def invalidate(self, namespace: str, adapter_id: str, *,
                   version: str | None = None) -> bool: ...


class StoreRefresher:
    def __init__(self, store: AdapterStore, cache: ResidentPrompts, *, period_s: float,
                 on_count: Callable[[int], None]) -> None:
        self._store = store
        self._cache = cache
        self._period_s = period_s
        self._on_count = on_count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-refresh", daemon=True)

    def start(self) -> None:
        if self._period_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self.refresh_once()
            except AdapterStoreError as e:  # the store is down: /readyz says so; try later
                log.warning("store refresh failed: %s: %s", type(e).__name__, e)

    def refresh_once(self) -> None:
        self._on_count(count_stored(self._store))
        for (namespace, adapter_id), version in self._cache.resident_versions().items():
            record: AdapterRecord | None
            try:
                record = self._store.get_record(namespace, adapter_id)
            except AdapterNotFoundError:
                record = None
            changed = record is None or version_of(record) != version
            if changed and self._cache.invalidate(namespace, adapter_id, version=version):
                log.info("evicted %s/%s: %s in the store", namespace, adapter_id,
                         "deleted" if record is None else "replaced")
