"""Soft prompts resident on the device as rows of one table, named by reserved token ids.

A request of an adapter compiles to plain token ids: the adapter's virtual tokens are ids at or
above the vocabulary size, each naming one row of this table, followed by the text's ids. The
model's input embedding is wrapped once, at load (VirtualTokenEmbedding), so that the lookup of
both kinds runs inside the model's forward, and so inside a captured graph; every architecture
embeds its ids through that module (a seq2seq model's encoder too), so a soft prompt reaches
the model exactly where PEFT puts it. Both step loops run this way.

The table is the prompt cache: an LRU of adapters bounded in bytes (`--prompt-cache-bytes`),
each entry a set of rows, filled by the adapter loader threads straight from the store. An id
is `vocab + generation * capacity + row`, where `generation` is unique to one insertion: the
embedding reads row `(id - vocab) % capacity`, and an id never names anything else, so a slot
reused by another adapter (or by a new version of the same one) can never be matched by an old
id, in this table or in any cache keyed by ids. Rows of an entry that running requests use are
pinned: they are not evicted, and an entry invalidated (its adapter overwritten or deleted)
leaves the index at once but keeps its rows until the last request holding it ends, and after
that until the room is needed.
A queued request holds its entry unpinned; if the rows were evicted before it starts, it waits
for its adapter's load again, and if the rest of the table is pinned by running requests, it
waits for them to finish.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from adapters_store.records import AdapterRecord
from server.engine.observer import CacheEvent, EngineObserver, NullObserver
from server.engine.row_allocator import RowAllocator
from server.engine.uploads import upload


def version_of(record: AdapterRecord) -> str:
    """What changes whenever the stored adapter does (an overwrite rewrites both)."""
    return f"{record.sha256}@{record.created_at}"


@dataclass(eq=False)
class TableEntry:
    """One adapter version's rows. `ids` is what a request puts before its text's ids."""

    key: tuple[str, str]  # (namespace, adapter_id)
    version: str
    rows: torch.Tensor  # [num_virtual_tokens] long, on the table's device
    ids: tuple[int, ...]
    nbytes: int
    pins: int = 0
    indexed: bool = True  # False once evicted or invalidated: freed when unpinned
    _row_list: list[int] = field(default_factory=list, repr=False)

    @property
    def freed(self) -> bool:
        """Its rows went back to the table (they may hold another adapter now)."""
        return not self._row_list


@dataclass(frozen=True)
class TableStats:
    hits: int
    misses: int
    evictions: int
    resident_adapters: int
    resident_bytes: int
    capacity_rows: int
    free_rows: int


class PromptTable:
    """Thread-safe: the engine thread looks up and releases, loader threads insert, API calls
    invalidate. Writes of an entry's rows happen before its ids are handed out, and only to rows
    no handed-out id names, so a forward reading the table never sees a row change under it."""

    def __init__(self, *, vocab_size: int, hidden: int, capacity_bytes: int,
                 dtype: torch.dtype, device: torch.device | str,
                 observer: EngineObserver | None = None) -> None:
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        self.vocab_size = vocab_size
        self.capacity = max(1, capacity_bytes // row_bytes)  # rows
        self.row_bytes = row_bytes
        # Never-written rows are never selected (an id names only a row written before it
        # existed, and torch.where discards the other branch), so the table need not be
        # zeroed: on a CPU its untouched pages then cost no memory.
        self.weight = torch.empty(self.capacity, hidden, dtype=dtype, device=device)
        self._rows = RowAllocator(self.capacity)
        # Entries out of the index (invalidated, or replaced) that nothing pins, oldest first:
        # their rows are taken back when room is needed, so a queued request admitted with
        # that version can still pin them until then; and once they hold more than
        # `retired_reserve` rows, before a never-written row is taken. Otherwise churn
        # (overwrites, deletes) would write every row of the table once, and on a CPU the
        # process's memory would grow to the table's whole size.
        self._retired: OrderedDict[int, TableEntry] = OrderedDict()
        self._retired_rows = 0
        self.retired_reserve = max(1, self.capacity // 64)
        self._entries: OrderedDict[tuple[str, str], TableEntry] = OrderedDict()
        self._generation = 0
        self._hits = self._misses = self._evictions = 0
        self._observer = observer or NullObserver()
        self._lock = threading.Lock()

    # ---- requests -----------------------------------------------------------------------------

    def lookup(self, namespace: str, adapter_id: str, version: str) -> TableEntry | None:
        """The resident entry of exactly `version` (a hit, most recently used now), unpinned;
        else None (a miss). A resident entry of another version is stale and leaves here."""
        key = (namespace, adapter_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version != version:
                self._unindex(entry)
                entry = None
            if entry is None:
                self._misses += 1
            else:
                self._entries.move_to_end(key)
                self._hits += 1
        self._observer.cache_event(CacheEvent.MISS if entry is None else CacheEvent.HIT)
        return entry

    def pin(self, entry: TableEntry) -> bool:
        """Hold `entry`'s rows for a request about to run; False if they were taken back
        meanwhile (for room). An invalidated entry whose rows are still there can be pinned:
        the request runs the version it was admitted with."""
        with self._lock:
            if entry.freed:
                return False
            self._unretire(entry)
            entry.pins += 1
            if entry.indexed:
                self._entries.move_to_end(entry.key)
            return True

    def release(self, entry: TableEntry) -> None:
        """A request holding `entry` is done; rows nothing indexes become reclaimable."""
        with self._lock:
            if entry.pins <= 0:
                raise RuntimeError("prompt table entry released more often than pinned")
            entry.pins -= 1
            if entry.pins == 0 and not entry.indexed:
                self._retire(entry)

    # ---- loading and invalidation -------------------------------------------------------------

    def insert(self, namespace: str, adapter_id: str, version: str, embeds: torch.Tensor, *,
               pinned: bool = True) -> TableEntry | None:
        """Copy `embeds` ([num_virtual_tokens, hidden]) into free rows, evicting unpinned least
        recently used entries as needed; returns the entry (pinned once for the caller unless
        `pinned` is False), or None when the rows cannot be found (larger than the table, or
        the rest is pinned). Replaces a resident entry of the same adapter."""
        n = int(embeds.shape[0])
        if embeds.dim() != 2 or embeds.shape[1] != self.weight.shape[1]:
            raise ValueError(f"soft prompt of shape {tuple(embeds.shape)}; expected "
                             f"[num_virtual_tokens, {self.weight.shape[1]}]")
        if n == 0 or n > self.capacity:
            return None
        evicted = 0
        key = (namespace, adapter_id)
        # No copy that waits for the device under the lock: the engine thread needs the lock
        # between its steps, and a copy from pageable host memory first waits for every step
        # queued on the stream. So the rows go to the device before the lock, and the index
        # (made under it) is uploaded without waiting (server.engine.uploads).
        data = embeds.to(self.weight.device, self.weight.dtype, non_blocking=True)
        with self._lock:
            if (old := self._entries.get(key)) is not None:
                self._unindex(old)
            while (self._retired and self._retired_rows > self.retired_reserve
                   and self._rows.reusable < n):
                self._reclaim_oldest_retired()
            while self._free_count() < n:
                if self._retired:
                    self._reclaim_oldest_retired()
                    continue
                victim = next((e for e in self._entries.values() if e.pins == 0), None)
                if victim is None:
                    return None
                self._unindex(victim, reclaim=True)
                self._evictions += 1
                evicted += 1
            rows = self._rows.take(n)
            self._generation += 1
            base = self.vocab_size + self._generation * self.capacity
            entry = TableEntry(key=key, version=version, rows=upload(rows, self.weight.device),
                               ids=tuple(base + r for r in rows), nbytes=n * self.row_bytes,
                               pins=int(pinned), _row_list=rows)
            # Written under the lock and before the ids exist anywhere else.
            self.weight.index_copy_(0, entry.rows, data)
            self._entries[key] = entry
        for _ in range(evicted):
            self._observer.cache_event(CacheEvent.EVICTION)
        return entry

    def invalidate(self, namespace: str, adapter_id: str, *, version: str | None = None) -> bool:
        """Forget an adapter (deleted or overwritten); True if it was resident. With `version`,
        only that version. Requests already holding it finish with its rows."""
        with self._lock:
            entry = self._entries.get((namespace, adapter_id))
            if entry is None or (version is not None and entry.version != version):
                return False
            self._unindex(entry)
            return True

    def resident_versions(self) -> dict[tuple[str, str], str]:
        """(namespace, adapter_id) -> version of every resident entry, for revalidation."""
        with self._lock:
            return {key: entry.version for key, entry in self._entries.items()}

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.row_bytes

    def contains(self, namespace: str, adapter_id: str) -> bool:
        with self._lock:
            return (namespace, adapter_id) in self._entries

    def stats(self) -> TableStats:
        with self._lock:
            return TableStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                              resident_adapters=len(self._entries),
                              resident_bytes=sum(e.nbytes for e in self._entries.values()),
                              capacity_rows=self.capacity,
                              free_rows=self._free_count() + self._retired_rows)

    # ---- internals (under the lock) ----------------------------------------------------------

    def _free_count(self) -> int:
        """Rows that hold nothing (retired entries' rows not counted)."""
        return self._rows.free

    def _unindex(self, entry: TableEntry, *, reclaim: bool = False) -> None:
        """Out of the index; unpinned rows are freed now (`reclaim`: evicted for room) or
        retired (invalidated: taken back when room is needed)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        entry.indexed = False
        if entry.pins == 0:
            if reclaim:
                self._free_rows(entry)
            else:
                self._retire(entry)

    def _retire(self, entry: TableEntry) -> None:
        if id(entry) in self._retired:
            return
        self._retired[id(entry)] = entry
        self._retired_rows += len(entry._row_list)

    def _unretire(self, entry: TableEntry) -> None:
        if self._retired.pop(id(entry), None) is not None:
            self._retired_rows -= len(entry._row_list)

    def _reclaim_oldest_retired(self) -> None:
        entry = self._retired.popitem(last=False)[1]
        self._retired_rows -= len(entry._row_list)
        self._free_rows(entry)

    def _free_rows(self, entry: TableEntry) -> None:
        self._rows.give_back(entry._row_list)
        entry._row_list = []


class VirtualTokenEmbedding(torch.nn.Module):
    """The model's input embedding, extended: ids below the vocabulary size are word embeddings,
    ids at or above it are rows of the prompt table. Shape-static (no data-dependent control
    flow), so it can be captured in a graph."""

    def __init__(self, base: torch.nn.Module, table: PromptTable) -> None:
        super().__init__()
        self.base = base
        self.table = table
        self.vocab_size = table.vocab_size

    @property
    def weight(self) -> torch.Tensor:
        """The word embeddings (tied output embeddings keep pointing at the same tensor)."""
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        virtual = input_ids >= self.vocab_size
        words = self.base(torch.where(virtual, 0, input_ids))
        rows = (input_ids - self.vocab_size).clamp(min=0) % self.table.capacity
        soft = self.table.weight[rows].to(words.dtype)
        return torch.where(virtual.unsqueeze(-1), soft, words)


def table_for(model: torch.nn.Module, *, budget_bytes: int, min_rows: int,
              dtype: torch.dtype, device: torch.device | str,
              observer: EngineObserver | None = None) -> PromptTable:
    """The prompt table of a loaded model, installed as its input embedding.

    It holds `budget_bytes` (`--prompt-cache-bytes`), but never fewer than `min_rows` rows
    (`--max-virtual-tokens`), so that any adapter the server accepts can run."""
    vocab, hidden = (int(n) for n in model.get_input_embeddings().weight.shape)
    row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
    table = PromptTable(vocab_size=vocab, hidden=hidden,
                        capacity_bytes=max(budget_bytes, min_rows * row_bytes),
                        dtype=dtype, device=device, observer=observer)
    install(model, table)
    return table


def install(model: torch.nn.Module, table: PromptTable) -> VirtualTokenEmbedding:
    """Wrap `model`'s input embedding once, at load; returns the wrapper."""
    current = model.get_input_embeddings()
    if isinstance(current, VirtualTokenEmbedding):
        raise RuntimeError("the model's input embedding is already wrapped")
    wrapper = VirtualTokenEmbedding(current, table)
    model.set_input_embeddings(wrapper)
    return wrapper
