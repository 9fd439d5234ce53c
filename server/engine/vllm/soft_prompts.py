"""Adapters' soft rows on the host for the vLLM engine: an LRU bounded in bytes, keyed by
adapter version, filled from the store off the event loop, one load per version at a time.

vLLM takes a prompt's embeddings as a CPU tensor and moves it to its workers itself, so the
rows stay in host memory (float32, exactly as stored). An overwritten or deleted adapter's rows
leave at once (invalidate); a request admitted with an older version fails with
AdapterChangedError rather than run rows it was not checked against.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters_store.store import AdapterStore
from server.engine.errors import AdapterChangedError
from server.engine.observer import CacheEvent, EngineObserver
from server.engine.prompt_table import version_of


@dataclass(frozen=True)
class SoftRows:
    version: str
    rows: torch.Tensor  # [num_virtual_tokens, hidden] float32, on the CPU

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


class SoftPrompts:
    """Thread-safe; `get` runs on the event loop, loads run in a worker thread."""

    def __init__(self, store: AdapterStore, *, capacity_bytes: int,
                 observer: EngineObserver) -> None:
        self._store = store
        self.capacity_bytes = capacity_bytes
        self._observer = observer
        self._entries: OrderedDict[tuple[str, str], SoftRows] = OrderedDict()
        self._loading: dict[tuple[str, str, str], asyncio.Future[SoftRows]] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    async def get(self, namespace: str, adapter_id: str, version: str) -> torch.Tensor:
        """The rows of exactly `version`; raises the store's errors (deleted: not found) or
        AdapterChangedError when the store now holds another version."""
        key = (namespace, adapter_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version == version:
                self._entries.move_to_end(key)
                self.hits += 1
                hit = True
            else:
                self.misses += 1
                hit = False
        self._observer.cache_event(CacheEvent.HIT if hit else CacheEvent.MISS)
        if hit:
            assert entry is not None
            return entry.rows
        load_key = (namespace, adapter_id, version)
        pending = self._loading.get(load_key)
        if pending is None:  # one load per version, however many requests wait for it
            pending = asyncio.ensure_future(self._load(namespace, adapter_id, version))
            self._loading[load_key] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(load_key, None))
        return (await asyncio.shield(pending)).rows

    async def _load(self, namespace: str, adapter_id: str, version: str) -> SoftRows:
        started = time.monotonic()
        stored = await asyncio.to_thread(self._store.get, namespace, adapter_id)
        found = version_of(stored.record)
        if found != version:
            raise AdapterChangedError(
                f"adapter {adapter_id!r} was replaced while this request waited for it to "
                "load; retry to use the current version")
        rows = stored.embeddings[:stored.record.num_virtual_tokens].to(torch.float32)
        entry = SoftRows(version, rows.contiguous())
        self._insert((namespace, adapter_id), entry)
        self._observer.adapter_loaded(time.monotonic() - started)
        return entry

    def _insert(self, key: tuple[str, str], entry: SoftRows) -> None:
        evicted = 0
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            while len(self._entries) > 1 and self.resident_bytes > self.capacity_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1
                evicted += 1
        for _ in range(evicted):
            self._observer.cache_event(CacheEvent.EVICTION)

    def invalidate(self, namespace: str, adapter_id: str, *,
                   version: str | None = None) -> bool:
        with self._lock:
            entry = self._entries.get((namespace, adapter_id))
            if entry is None or (version is not None and entry.version != version):
                return False
            del self._entries[(namespace, adapter_id)]
            return True

    def resident_versions(self) -> dict[tuple[str, str], str]:
        with self._lock:
            return {key: e.version for key, e in self._entries.items()}

    @property
    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"cache_resident_adapters": float(len(self._entries)),
                    "cache_resident_bytes": float(self.resident_bytes),
                    "cache_bytes": float(self.resident_bytes),
                    "cache_capacity_bytes": float(self.capacity_bytes),
                    "cache_hits": float(self.hits), "cache_misses": float(self.misses),
                    "cache_evictions": float(self.evictions)}
