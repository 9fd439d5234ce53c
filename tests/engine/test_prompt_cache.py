"""Prompt cache: LRU within a byte budget, version-checked lookups, invalidation, counters."""

from __future__ import annotations

import threading

import torch

from server.engine.observer import CacheEvent, NullObserver
from server.engine.prompt_cache import PromptCache, tensor_bytes


class Events(NullObserver):
    def __init__(self) -> None:
        self.events: list[CacheEvent] = []

    def cache_event(self, event: CacheEvent) -> None:
        self.events.append(event)


def emb(rows: int, hidden: int = 4, fill: float = 1.0) -> torch.Tensor:
    return torch.full((rows, hidden), fill)  # rows * hidden * 4 bytes


def test_hit_after_insert_and_miss_before() -> None:
    cache = PromptCache(1024)
    assert cache.lookup("ns", "a", "v1") is None
    cache.insert("ns", "a", "v1", emb(2))
    assert torch.equal(cache.lookup("ns", "a", "v1"), emb(2))
    s = cache.stats()
    assert (s.hits, s.misses, s.resident_adapters, s.resident_bytes) == (1, 1, 1, 32)


def test_lru_evicts_least_recently_used_within_byte_budget() -> None:
    cache = PromptCache(3 * 32)  # room for three 32-byte prompts
    for name in "abc":
        cache.insert("ns", name, "v", emb(2))
    cache.lookup("ns", "a", "v")  # a is now most recent; b is the oldest
    cache.insert("ns", "d", "v", emb(2))
    assert not cache.contains("ns", "b")
    assert all(cache.contains("ns", n) for n in "acd")
    s = cache.stats()
    assert (s.evictions, s.resident_adapters, s.resident_bytes) == (1, 3, 96)


def test_a_large_entry_evicts_as_many_as_needed() -> None:
    cache = PromptCache(4 * 32)
    for name in "abcd":
        cache.insert("ns", name, "v", emb(2))
    cache.insert("ns", "big", "v", emb(6))  # 96 bytes: three must go
    assert cache.stats().evictions == 3
    assert cache.contains("ns", "d") and cache.contains("ns", "big")
    assert cache.stats().resident_bytes <= cache.capacity_bytes


def test_entry_larger_than_budget_is_not_kept_and_evicts_nothing() -> None:
    cache = PromptCache(64)
    cache.insert("ns", "small", "v", emb(2))
    cache.insert("ns", "huge", "v", emb(100))
    assert not cache.contains("ns", "huge")
    assert cache.contains("ns", "small")
    assert cache.stats().evictions == 0


def test_zero_budget_keeps_nothing() -> None:
    cache = PromptCache(0)
    cache.insert("ns", "a", "v", emb(1))
    assert cache.stats().resident_adapters == 0


def test_other_version_is_a_miss_and_drops_the_stale_tensor() -> None:
    cache = PromptCache(1024)
    cache.insert("ns", "a", "old", emb(2, fill=1.0))
    assert cache.lookup("ns", "a", "new") is None
    assert not cache.contains("ns", "a")
    assert cache.stats().resident_bytes == 0


def test_invalidate_forgets_and_namespaces_are_separate() -> None:
    cache = PromptCache(1024)
    cache.insert("t1", "a", "v", emb(2))
    cache.insert("t2", "a", "v", emb(2, fill=2.0))
    assert cache.invalidate("t1", "a")
    assert not cache.invalidate("t1", "a")
    assert cache.lookup("t1", "a", "v") is None
    assert torch.equal(cache.lookup("t2", "a", "v"), emb(2, fill=2.0))
    assert cache.stats().resident_bytes == tensor_bytes(emb(2))


def test_reinsert_replaces_without_double_counting_bytes() -> None:
    cache = PromptCache(1024)
    cache.insert("ns", "a", "v1", emb(2))
    cache.insert("ns", "a", "v2", emb(3))
    assert cache.stats().resident_bytes == tensor_bytes(emb(3))
    assert cache.lookup("ns", "a", "v2") is not None


def test_bytes_follow_dtype() -> None:
    cache = PromptCache(1024)
    cache.insert("ns", "a", "v", emb(4).to(torch.bfloat16))
    assert cache.stats().resident_bytes == 4 * 4 * 2


def test_observer_sees_hits_misses_evictions() -> None:
    events = Events()
    cache = PromptCache(32, observer=events)
    cache.lookup("ns", "a", "v")
    cache.insert("ns", "a", "v", emb(2))
    cache.lookup("ns", "a", "v")
    cache.insert("ns", "b", "v", emb(2))
    assert events.events == [CacheEvent.MISS, CacheEvent.HIT, CacheEvent.EVICTION]


def test_concurrent_use_keeps_accounting_consistent() -> None:
    cache = PromptCache(10 * 32)

    def work(worker: int) -> None:
        for i in range(300):
            name = f"a{(i * 7 + worker) % 25}"
            if cache.lookup("ns", name, "v") is None:
                cache.insert("ns", name, "v", emb(2))
            if i % 50 == 0:
                cache.invalidate("ns", name)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s.resident_bytes == s.resident_adapters * 32 <= cache.capacity_bytes
    assert s.hits + s.misses == 4 * 300
