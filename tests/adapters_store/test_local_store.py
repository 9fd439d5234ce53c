"""LocalAdapterStore: round trips, ids and namespaces, atomic overwrite, concurrency, cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import replace
from datetime import datetime

import pytest
import torch

from adapters_store import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStore,
    InvalidAdapterError,
    InvalidAdapterIdError,
    LocalAdapterStore,
    StoreUnavailableError,
)
from tests.adapters_store.helpers import make_parsed


@pytest.fixture
def store(tmp_path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "store")


def test_implements_the_protocol(store):
    assert isinstance(store, AdapterStore)


def test_put_then_get_round_trips(store):
    parsed = make_parsed()
    record = store.put("acme", "sentiment", parsed)

    loaded = store.get("acme", "sentiment", verify=True)

    assert loaded.record == record == store.get_record("acme", "sentiment")
    torch.testing.assert_close(loaded.embeddings, parsed.embeddings, rtol=0, atol=0)
    assert (record.namespace, record.adapter_id) == ("acme", "sentiment")
    assert (record.num_virtual_tokens, record.token_dim) == (4, 8)
    assert record.created_at.endswith("Z")
    datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    assert store.get_config("acme", "sentiment") == parsed.config_bytes


def test_stored_layout_and_sha256(store):
    record = store.put("acme", "sentiment", make_parsed())
    folder = store.root / "acme" / "sentiment"
    data = (folder / "embeddings.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record.sha256
    assert len(data) == record.size_bytes
    assert json.loads((folder / "record.json").read_text()) == record.to_dict()
    assert (folder / "adapter_config.json").read_bytes() == make_parsed().config_bytes


def test_namespaces_are_separate(store):
    store.put("tenant-a", "sentiment", make_parsed(1))
    store.put("tenant-b", "sentiment", make_parsed(2))
    a = store.get("tenant-a", "sentiment").embeddings
    b = store.get("tenant-b", "sentiment").embeddings
    assert not torch.equal(a, b)
    store.delete("tenant-a", "sentiment")
    assert store.exists("tenant-b", "sentiment")


def test_existing_id_needs_explicit_overwrite(store):
    first = store.put("acme", "x", make_parsed(1))
    with pytest.raises(AdapterExistsError, match="already exists"):
        store.put("acme", "x", make_parsed(2))
    assert store.get_record("acme", "x") == first

    second = store.put("acme", "x", make_parsed(2), overwrite=True)

    assert store.get_record("acme", "x") == second != first
    assert store.peek_record("acme", "x") == second  # local: always answers, never stale
    torch.testing.assert_close(store.get("acme", "x").embeddings, make_parsed(2).embeddings)
    assert len(os.listdir(store.root / ".objects")) == 1  # the old version is gone


def test_missing_adapter_is_not_found(store):
    assert not store.exists("acme", "nope")
    for call in (store.get, store.get_record, store.peek_record, store.delete):
        with pytest.raises(AdapterNotFoundError, match="no adapter 'nope'"):
            call("acme", "nope")


def test_delete_removes_everything(store):
    store.put("acme", "x", make_parsed())
    store.delete("acme", "x")
    assert not store.exists("acme", "x")
    assert store.list() == []
    assert os.listdir(store.root / ".objects") == []
    with pytest.raises(AdapterNotFoundError):
        store.delete("acme", "x")


@pytest.mark.parametrize("bad", ["../etc", ".hidden", "", "a/b", "x" * 129, "-lead", "é"])
def test_invalid_ids_and_namespaces_are_rejected(bad, store):
    with pytest.raises(InvalidAdapterIdError, match="must match"):
        store.put("acme", bad, make_parsed())
    with pytest.raises(InvalidAdapterIdError, match="invalid namespace"):
        store.put(bad, "ok", make_parsed())
    with pytest.raises(InvalidAdapterIdError):
        store.get("acme", bad)
    assert store.list() == []


def test_put_rejects_an_inconsistent_adapter(store):
    with pytest.raises(InvalidAdapterError, match="float32"):
        store.put("acme", "x", replace(make_parsed(), embeddings=torch.zeros(4, 8).half()))


def test_list_is_sorted_across_namespaces_and_filters(store):
    for ns, aid in [("b", "z"), ("a", "y"), ("b", "a"), ("a", "b2"), ("a", "b10")]:
        store.put(ns, aid, make_parsed())
    keys = [(r.namespace, r.adapter_id) for r in store.list()]
    assert keys == [("a", "b10"), ("a", "b2"), ("a", "y"), ("b", "a"), ("b", "z")]
    assert [r.adapter_id for r in store.list("b")] == ["a", "z"]
    assert store.list("nobody") == []


def test_ping_fails_when_the_root_is_gone(store):
    store.ping()
    shutil.rmtree(store.root)
    store.root.write_text("not a directory")
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        store.ping()


def test_unusable_root_is_reported_at_startup(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailableError, match="not usable"):
        LocalAdapterStore(tmp_path / "file" / "store")


def test_startup_removes_leftovers_of_dead_writers(store):
    store.put("acme", "kept", make_parsed())
    dead = "999999999-deadbeef"
    (store.root / ".tmp" / dead).mkdir()
    (store.root / ".tmp" / f"{dead}.link").symlink_to("../.objects/x")
    (store.root / ".objects" / dead).mkdir()

    reopened = LocalAdapterStore(store.root)

    assert os.listdir(store.root / ".tmp") == []
    assert len(os.listdir(store.root / ".objects")) == 1
    assert reopened.get("acme", "kept", verify=True)


def test_concurrent_overwrites_of_one_id_stay_consistent(store):
    errors = []

    def writer(seed: int) -> None:
        try:
            for i in range(10):
                store.put("acme", "hot", make_parsed(seed * 100 + i), overwrite=True)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                store.get("acme", "hot", verify=True)
            except Exception as e:  # noqa: BLE001 - AdapterNotFoundError included
                errors.append(e)

    store.put("acme", "hot", make_parsed(-1))
    stop = threading.Event()
    readers = [threading.Thread(target=reader, args=(stop,)) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()

    assert errors == []
    assert store.get("acme", "hot", verify=True)
    assert len(os.listdir(store.root / ".objects")) == 1


def test_concurrent_creates_let_exactly_one_win(store):
    outcomes = []
    barrier = threading.Barrier(8)

    def create(seed: int) -> None:
        barrier.wait()
        try:
            store.put("acme", "race", make_parsed(seed))
            outcomes.append("ok")
        except AdapterExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["exists"] * 7 + ["ok"]
    assert len(os.listdir(store.root / ".objects")) == 1


def test_count_matches_list_without_reading_records(tmp_path):
    store = LocalAdapterStore(tmp_path)
    for ns, aid in (("t1", "a"), ("t1", "b"), ("t2", "a")):
        store.put(ns, aid, make_parsed())
    store.delete("t1", "b")
    assert store.count() == len(store.list()) == 2
    assert store.count("t1") == 1 and store.count("nobody") == 0


def test_stored_bytes_counts_every_file_written(store, tmp_path):
    """What the storage quota counts: embeddings, the config verbatim and the record itself."""
    parsed = replace(make_parsed(), config_bytes=b"{" + b" " * 5000 + b"}")
    record = store.put("acme", "padded", parsed)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert record.stored_bytes > record.size_bytes + 5000
    assert record.stored_bytes == on_disk
