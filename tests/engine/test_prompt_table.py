"""The prompt table: rows on the device named by reserved ids; a reused row never serves, or
matches, what it held before."""

from __future__ import annotations

import torch

from server.engine.core.prompt_table import PromptTable, VirtualTokenEmbedding

VOCAB, HIDDEN = 50, 4


def _table(rows: int) -> PromptTable:
    return PromptTable(vocab_size=VOCAB, hidden=HIDDEN, capacity_bytes=rows * HIDDEN * 4,
                       dtype=torch.float32, device="cpu")


def _rows(n: int, value: float) -> torch.Tensor:
    return torch.full((n, HIDDEN), value)


def test_ids_embed_to_their_rows_and_words_to_the_vocabulary():
    table = _table(8)
    base = torch.nn.Embedding(VOCAB, HIDDEN)
    embed = VirtualTokenEmbedding(base, table)
    a = table.insert("t", "a", "v1", torch.arange(12.0).view(3, HIDDEN))
    ids = torch.tensor([[*a.ids, 7, 3]])
    out = embed(ids)[0]
    assert torch.equal(out[:3], torch.arange(12.0).view(3, HIDDEN))
    assert torch.equal(out[3:], base(torch.tensor([7, 3])))
    assert all(i >= VOCAB for i in a.ids)


def test_a_reused_row_gets_new_ids_and_old_ids_never_come_back():
    table = _table(4)
    a = table.insert("t", "a", "v1", _rows(4, 1.0))
    table.release(a)
    b = table.insert("t", "b", "v1", _rows(4, 2.0))  # evicts a: the same rows, new ids
    assert set(b._row_list) == set(range(4)) and not table.contains("t", "a")
    assert not set(a.ids) & set(b.ids)
    table.release(b)
    a2 = table.insert("t", "a", "v2", _rows(4, 3.0))  # a new version of a
    assert not set(a2.ids) & (set(a.ids) | set(b.ids))
    assert table.acquire("t", "a", "v1") is None  # the old version is gone


def test_pinned_rows_are_never_evicted_or_overwritten():
    table = _table(4)
    a = table.insert("t", "a", "v1", _rows(3, 1.0))  # pinned by its request
    assert table.insert("t", "b", "v1", _rows(2, 2.0)) is None  # only one row is free
    c = table.insert("t", "c", "v1", _rows(1, 3.0))
    assert c is not None
    assert torch.equal(table.weight[a.rows], _rows(3, 1.0))


def test_an_overwrite_while_in_use_keeps_the_old_rows_until_released():
    table = _table(6)
    old = table.insert("t", "a", "v1", _rows(3, 1.0))
    assert table.invalidate("t", "a")
    new = table.insert("t", "a", "v2", _rows(3, 2.0))
    assert not set(old._row_list) & set(new._row_list)  # the running request keeps its rows
    assert torch.equal(table.weight[old.rows], _rows(3, 1.0))
    assert table.stats().free_rows == 0
    table.release(old)
    assert table.stats().free_rows == 3
    assert table.acquire("t", "a", "v2") is new


def test_lookup_counts_hits_and_misses_and_pins():
    table = _table(4)
    a = table.insert("t", "a", "v1", _rows(2, 1.0))
    table.release(a)
    assert table.acquire("t", "a", "v1") is a and a.pins == 1
    assert table.acquire("t", "a", "v0") is None  # another version: stale, dropped
    stats = table.stats()
    assert (stats.hits, stats.misses, stats.resident_adapters) == (1, 1, 0)
    table.release(a)
    assert table.stats().free_rows == 4
