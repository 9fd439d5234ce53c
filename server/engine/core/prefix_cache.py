"""Keys and values of soft prompts, computed once per adapter version and copied into rows.

Every request of an adapter begins with the same virtual tokens at the same positions, so
their keys and values are the same for all of them. The first row of an adapter version that
computes its virtual tokens leaves a copy of their keys and values here; a row that joins later
with the same virtual ids gets them copied into its slot and prefills only its text. The key is
the virtual ids themselves: they carry the prompt table's generation (server.engine.
prompt_table), so an adapter overwritten, deleted or evicted from the table and loaded again
has new ids, and an old entry can never match it. Only the leading run of virtual ids is
shared: ordinary text is never matched, so one tenant's request can never learn from its
timing what another tenant sent, and adapters belong to one tenant's namespace.

A row that joins while another row of the same adapter is still computing the prefix computes
it too (nothing waits); whichever finishes first stores it. Entries are evicted least recently
used when a new one needs room. The pool is allocated once, from the KV cache's budget, in
the model's dtype and on its device, so an entry is only ever reused where it was computed;
it is not zeroed (a row only reads positions it copied or computed), so on a CPU its untouched
pages cost no memory. Per layer:

    keys[layer], values[layer]: [tokens, kv_heads, head_dim]

and an entry is a list of pool rows, not necessarily contiguous.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.engine.core.kv_cache import CacheShape, SlotKVCache
from server.engine.row_allocator import RowAllocator


@dataclass(eq=False)
class PrefixEntry:
    key: tuple[int, ...]
    rows: torch.Tensor  # [len(key)] long, pool rows on the device
    row_list: list[int]


@dataclass(frozen=True)
class PrefixStats:
    hits: int
    misses: int
    evictions: int
    tokens_saved: int
    entries: int
    capacity_tokens: int
    used_tokens: int


class PrefixCache:
    """Owned by the engine thread, like the KV cache it copies to and from."""

    def __init__(self, shape: CacheShape, *, tokens: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if tokens < 1:
            raise ValueError("a prefix cache needs room for at least one token")
        self.capacity = tokens
        self.keys = [torch.empty(tokens, shape.kv_heads, shape.head_dim, dtype=dtype,
                                 device=device) for _ in range(shape.layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self._device = torch.device(device)
        self._rows = RowAllocator(tokens)
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self._used = 0
        self.hits = self.misses = self.evictions = self.tokens_saved = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._entries

    def fill(self, key: tuple[int, ...], cache: SlotKVCache, slot: int, count: int) -> bool:
        """A joining row whose prompt begins with `key`: copy the first `count` positions
        (at most len(key)) into its slot; False (a miss) when `key` is not here."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return False
        self._entries.move_to_end(key)
        self.hits += 1
        self.tokens_saved += count
        target = self._slot_index(cache, slot, count)
        for layer in range(len(self.keys)):
            cache.keys[layer].index_copy_(0, target, self.keys[layer][entry.rows[:count]])
            cache.values[layer].index_copy_(0, target, self.values[layer][entry.rows[:count]])
        return True

    def store(self, key: tuple[int, ...], cache: SlotKVCache, slot: int) -> bool:
        """A row has computed the positions `key` covers: keep a copy of them (evicting least
        recently used entries for room); False when it is here already or can never fit."""
        n = len(key)
        if key in self._entries or n > self.capacity:
            return False
        while self._rows.free < n:
            _, victim = self._entries.popitem(last=False)
            self._give_back(victim)
            self.evictions += 1
        rows = self._rows.take(n)
        entry = PrefixEntry(key, torch.tensor(rows, dtype=torch.long, device=self._device), rows)
        source = self._slot_index(cache, slot, n)
        for layer in range(len(self.keys)):
            self.keys[layer].index_copy_(0, entry.rows, cache.keys[layer][source])
            self.values[layer].index_copy_(0, entry.rows, cache.values[layer][source])
        self._entries[key] = entry
        self._used += n
        return True

    def stats(self) -> PrefixStats:
        return PrefixStats(self.hits, self.misses, self.evictions, self.tokens_saved,
                           len(self._entries), self.capacity, self._used)

    # ---- internals ---------------------------------------------------------------------------

    def _slot_index(self, cache: SlotKVCache, slot: int, count: int) -> torch.Tensor:
        start = slot * cache.max_len
        return torch.arange(start, start + count, dtype=torch.long, device=self._device)

    def _give_back(self, entry: PrefixEntry) -> None:
        self._rows.give_back(entry.row_list)
        self._used -= len(entry.row_list)
