"""The prompt table: rows on the device named by reserved ids; a reused row never serves, or
matches, what it held before."""

from __future__ import annotations

import torch

from server.engine.prompt_table import PromptTable, VirtualTokenEmbedding

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
    assert table.lookup("t", "a", "v1") is None  # the old version is gone


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
    assert table.lookup("t", "a", "v2") is new


def test_lookup_counts_hits_and_misses_and_pin_holds_the_rows():
    table = _table(4)
    a = table.insert("t", "a", "v1", _rows(2, 1.0), pinned=False)
    assert table.lookup("t", "a", "v1") is a and a.pins == 0
    assert table.pin(a) and a.pins == 1
    assert table.lookup("t", "a", "v0") is None  # another version: stale, dropped
    stats = table.stats()
    assert (stats.hits, stats.misses, stats.resident_adapters) == (1, 1, 0)
    table.release(a)
    assert table.stats().free_rows == 4


def test_an_entry_evicted_while_unpinned_cannot_be_pinned_again():
    table = _table(4)
    a = table.insert("t", "a", "v1", _rows(3, 1.0), pinned=False)  # a queued request holds it
    b = table.insert("t", "b", "v1", _rows(3, 2.0), pinned=False)  # evicts a: rows reused
    assert b is not None and a.freed and not table.pin(a)
    assert table.pin(b) and torch.equal(table.weight[b.rows], _rows(3, 2.0))


def test_an_invalidated_entry_still_held_can_be_pinned_by_its_version():
    table = _table(6)
    a = table.insert("t", "a", "v1", _rows(3, 1.0))  # a running request holds it
    table.invalidate("t", "a")
    assert table.pin(a) and a.pins == 2  # a queued request of v1 starts on the same rows
    table.release(a)
    table.release(a)
    assert table.stats().free_rows == 6


def test_an_overwritten_entry_stays_pinnable_by_its_queued_requests_until_room_is_needed():
    table = _table(6)
    old = table.insert("t", "a", "v1", _rows(3, 1.0), pinned=False)  # a queued request's
    table.invalidate("t", "a")  # overwritten before the request started
    assert not table.contains("t", "a") and table.stats().free_rows == 6
    assert table.pin(old)  # it still runs the version it was admitted with
    assert torch.equal(table.weight[old.rows], _rows(3, 1.0))
    table.release(old)
    new = table.insert("t", "b", "v1", _rows(5, 2.0))  # needs the retired rows back
    assert new is not None and old.freed and not table.pin(old)
    assert table.stats().evictions == 0  # taking back retired rows is not an eviction


def test_the_table_always_holds_the_largest_adapter_accepted():
    from server.engine.prompt_table import VirtualTokenEmbedding, table_for
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(VOCAB, HIDDEN)
    model.get_input_embeddings = lambda: model.embed
    model.set_input_embeddings = lambda m: setattr(model, "embed", m)
    table = table_for(model, budget_bytes=HIDDEN * 4, min_rows=10, dtype=torch.float32,
                      device="cpu")
    assert table.capacity == 10 and isinstance(model.embed, VirtualTokenEmbedding)


def test_churn_reuses_retired_rows_instead_of_writing_the_whole_table():
    """Adapters overwritten and deleted over and over: the rows ever written stay near what is
    resident plus the retired reserve, not the table's capacity (on a CPU, memory)."""
    table = _table(1024)
    assert table.retired_reserve == 16
    for i in range(400):
        entry = table.insert("t", f"a{i % 3}", f"v{i}", _rows(5, float(i)))  # an overwrite
        table.release(entry)
        if i % 7 == 0:
            table.invalidate("t", f"a{i % 3}")  # a delete
    # At most 3 resident adapters of 5 rows, the reserve, and the rows of one insert.
    assert table._rows.written <= 3 * 5 + table.retired_reserve + 5
    assert table.stats().evictions == 0
    assert table.lookup("t", "a1", "v397") is not None  # the latest version is served


def test_retired_rows_within_the_reserve_stay_pinnable():
    table = _table(1024)
    old = table.insert("t", "a", "v1", _rows(3, 1.0), pinned=False)  # a queued request's
    table.invalidate("t", "a")  # overwritten before it started: 3 rows retired, within 16
    new = table.insert("t", "b", "v1", _rows(5, 2.0))
    assert new is not None and not old.freed and table.pin(old)
    assert torch.equal(table.weight[old.rows], _rows(3, 1.0))
