"""The store refresher drops resident prompts whose adapter another process deleted or
replaced, keeps current ones, and reports the stored count."""

from __future__ import annotations

import torch

from adapters_store import LocalAdapterStore
from server.engine.prompt_table import PromptTable, version_of
from server.engine.store_refresh import StoreRefresher
from tests.adapters_store.test_s3_store import make_parsed


def _table(hidden: int) -> PromptTable:
    return PromptTable(vocab_size=10, hidden=hidden, capacity_bytes=1 << 20,
                       dtype=torch.float32, device="cpu")


def test_refresh_evicts_deleted_and_replaced_adapters_only(tmp_path):
    ours, theirs = LocalAdapterStore(tmp_path), LocalAdapterStore(tmp_path)  # two replicas
    cache = _table(8)
    for name in ("kept", "deleted", "replaced"):
        record = ours.put("t", name, make_parsed(seed=len(name)))
        cache.insert("t", name, version_of(record), torch.zeros(4, 8), pinned=False)
    theirs.delete("t", "deleted")
    theirs.put("t", "replaced", make_parsed(seed=99), overwrite=True)
    theirs.put("t", "new", make_parsed(seed=7))
    counts: list[int] = []

    StoreRefresher(ours, cache, period_s=1.0, on_count=counts.append).refresh_once()

    assert cache.contains("t", "kept")
    assert not cache.contains("t", "deleted") and not cache.contains("t", "replaced")
    assert counts == [3]


def test_invalidate_with_a_version_spares_a_newer_entry():
    cache = _table(2)
    cache.insert("t", "a", "v2", torch.zeros(2, 2), pinned=False)
    assert not cache.invalidate("t", "a", version="v1")
    assert cache.contains("t", "a")
    assert cache.invalidate("t", "a", version="v2") and not cache.contains("t", "a")
