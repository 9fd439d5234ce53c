"""Resident soft prompts: (namespace, adapter_id) -> embeddings on the model's device and dtype.

An LRU bounded in bytes. Each entry carries the version of the stored adapter it was loaded
from (sha256 + created_at of its record), and a lookup names the version it expects, so an
overwritten adapter's old tensor is never served even when the overwrite happened in another
process; deletes and overwrites made through this engine also invalidate eagerly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters_store.records import AdapterRecord
from server.engine.observer import CacheEvent, EngineObserver, NullObserver


def version_of(record: AdapterRecord) -> str:
    """What changes whenever the stored adapter does (an overwrite rewrites both)."""
    return f"{record.sha256}@{record.created_at}"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class CacheEntry:
    version: str
    embeds: torch.Tensor  # [num_virtual_tokens, hidden] on the model's device and dtype
    nbytes: int


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    resident_adapters: int
    resident_bytes: int


class PromptCache:
    """Thread-safe; the engine thread reads, loader threads insert, API calls invalidate."""

    def __init__(self, capacity_bytes: int, *, observer: EngineObserver | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self._observer = observer or NullObserver()
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def lookup(self, namespace: str, adapter_id: str, version: str) -> torch.Tensor | None:
        """The resident tensor of exactly `version`, counted as a hit; else None and a miss.

        A resident entry of another version is stale (overwritten) and dropped here.
        """
        key = (namespace, adapter_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version != version:
                self._drop(key)
                entry = None
            if entry is None:
                self._misses += 1
            else:
                self._entries.move_to_end(key)
                self._hits += 1
        self._observer.cache_event(CacheEvent.MISS if entry is None else CacheEvent.HIT)
        return None if entry is None else entry.embeds

    def insert(self, namespace: str, adapter_id: str, version: str,
               embeds: torch.Tensor) -> None:
        """Keep `embeds`, evicting least recently used entries to stay within the budget.

        An entry larger than the whole budget is not kept (the caller still serves it).
        """
        key = (namespace, adapter_id)
        nbytes = tensor_bytes(embeds)
        evicted = 0
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if nbytes > self.capacity_bytes:
                return
            while self._bytes + nbytes > self.capacity_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
                evicted += 1
            self._entries[key] = CacheEntry(version=version, embeds=embeds, nbytes=nbytes)
            self._bytes += nbytes
        for _ in range(evicted):
            self._observer.cache_event(CacheEvent.EVICTION)

    def invalidate(self, namespace: str, adapter_id: str, *, version: str | None = None) -> bool:
        """Forget an adapter (deleted or overwritten); True if it was resident. With `version`,
        only that version (a newer one inserted meanwhile stays)."""
        with self._lock:
            entry = self._entries.get((namespace, adapter_id))
            if entry is None or (version is not None and entry.version != version):
                return False
            self._drop((namespace, adapter_id))
            return True

    def resident_versions(self) -> dict[tuple[str, str], str]:
        """(namespace, adapter_id) -> version of every resident entry, for revalidation."""
        with self._lock:
            return {key: entry.version for key, entry in self._entries.items()}

    def contains(self, namespace: str, adapter_id: str) -> bool:
        """Residency without touching LRU order or counters (for tests and introspection)."""
        with self._lock:
            return (namespace, adapter_id) in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                              resident_adapters=len(self._entries), resident_bytes=self._bytes)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
