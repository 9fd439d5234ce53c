"""S3AdapterStore against a real moto server over HTTP: round trips, 404/409, overwrite,
listing across pages, a writer killed before publishing, the record TTL, and an unreachable
endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapters_store import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStore,
    StoreUnavailableError,
)
from adapters_store import s3 as s3_module
from adapters_store.s3 import S3AdapterStore, parse_s3_url
from tests.adapters_store.helpers import make_parsed
from tests.moto_s3 import moto_s3_server

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moto():
    with moto_s3_server() as server:
        server.client().create_bucket(Bucket="adapters")
        yield server


@pytest.fixture
def prefix() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(moto, prefix) -> S3AdapterStore:
    return S3AdapterStore("adapters", prefix, client=moto.client())


def _keys(moto, prefix: str) -> list[str]:
    listed = moto.client().list_objects_v2(Bucket="adapters", Prefix=prefix + "/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_implements_the_protocol(store):
    assert isinstance(store, AdapterStore)


def test_round_trip_list_and_delete(store, moto, prefix):
    parsed = make_parsed(seed=1, rows=5)
    record = store.put("t1", "a", parsed)
    store.put("t1", "b", make_parsed(seed=2))
    store.put("t2", "a", make_parsed(seed=3))
    got = store.get("t1", "a", verify=True)
    assert torch.equal(got.embeddings, parsed.embeddings) and got.record == record
    assert store.get_record("t1", "a") == record
    assert store.get_config("t1", "a") == parsed.config_bytes
    assert store.exists("t1", "a") and not store.exists("t1", "zzz")
    assert [(r.namespace, r.adapter_id) for r in store.list()] == [
        ("t1", "a"), ("t1", "b"), ("t2", "a")]
    assert [r.adapter_id for r in store.list("t1")] == ["a", "b"]
    assert store.count() == 3 and store.count("t2") == 1
    store.delete("t1", "a")
    with pytest.raises(AdapterNotFoundError):
        store.get("t1", "a")
    with pytest.raises(AdapterNotFoundError):
        store.get_record("t1", "a")
    with pytest.raises(AdapterNotFoundError):
        store.delete("t1", "a")
    assert not any("/t1/a/" in k or k.endswith("/t1/a.json") for k in _keys(moto, prefix))


def test_create_only_conflicts_and_overwrite_replaces(store, moto, prefix):
    first = store.put("t", "a", make_parsed(seed=1))
    with pytest.raises(AdapterExistsError):
        store.put("t", "a", make_parsed(seed=2))
    assert store.get_record("t", "a") == first  # the refused put changed nothing
    second = store.put("t", "a", make_parsed(seed=3), overwrite=True)
    assert second.sha256 != first.sha256
    assert torch.equal(store.get("t", "a").embeddings, make_parsed(seed=3).embeddings)
    # One pointer and exactly one version (3 objects) left: the old version was collected.
    assert len(_keys(moto, prefix)) == 4


def test_concurrent_create_only_has_exactly_one_winner(moto, prefix):
    stores = [S3AdapterStore("adapters", prefix, client=moto.client()) for _ in range(6)]
    wins, conflicts = [], []

    def attempt(i: int) -> None:
        try:
            wins.append(stores[i].put("t", "race", make_parsed(seed=i)).sha256)
        except AdapterExistsError:
            conflicts.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(conflicts) == 5
    assert stores[0].get_record("t", "race").sha256 == wins[0]


def test_listing_pages_through_every_page(moto, prefix):
    store = S3AdapterStore("adapters", prefix, client=moto.client(), list_page_size=2)
    for i in range(5):
        store.put("t", f"a{i}", make_parsed(seed=i))
    store.put("u", "b", make_parsed())
    assert store.count() == 6 and store.count("t") == 5
    assert [r.adapter_id for r in store.list("t")] == [f"a{i}" for i in range(5)]
    assert [r.namespace for r in store.list()] == ["t"] * 5 + ["u"]


def test_writer_killed_before_publishing_leaves_the_old_adapter(store, moto, prefix):
    old = store.put("t", "a", make_parsed(seed=1))
    done = subprocess.run(
        [sys.executable, "-m", "tests.adapters_store.s3_crash_writer", moto.endpoint,
         "adapters", prefix], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 17, done.stderr
    # The dead writer's version objects are there, unreferenced; readers still see the old.
    assert len(_keys(moto, prefix)) == 1 + 3 + 3
    fresh = S3AdapterStore("adapters", prefix, client=moto.client())
    assert fresh.get_record("t", "a") == old
    assert torch.equal(fresh.get("t", "a", verify=True).embeddings,
                       make_parsed(seed=1).embeddings)
    assert [r.adapter_id for r in fresh.list()] == ["a"]


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The stores' clock, moved by hand: a slow request must not age a record."""
    now = [1000.0]
    monkeypatch.setattr(s3_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_record_ttl_bounds_how_long_another_writer_goes_unseen(moto, prefix, clock):
    reader = S3AdapterStore("adapters", prefix, client=moto.client(), record_ttl_s=0.5)
    writer = S3AdapterStore("adapters", prefix, client=moto.client())
    with pytest.raises(AdapterNotFoundError):
        reader.get_record("t", "a")
    writer.put("t", "a", make_parsed(seed=1))
    clock[0] += 0.375
    with pytest.raises(AdapterNotFoundError):  # still within the TTL of the negative answer
        reader.get_record("t", "a")
    clock[0] += 0.125  # the TTL has passed: the next read asks the bucket
    seen = reader.get_record("t", "a")
    assert seen.sha256 == writer.get_record("t", "a").sha256
    writer.delete("t", "a")
    clock[0] += 0.375
    assert reader.get_record("t", "a") == seen  # within the TTL: the record it read
    clock[0] += 0.125
    with pytest.raises(AdapterNotFoundError):
        reader.get_record("t", "a")


def test_peek_record_answers_only_from_what_this_replica_read_within_the_ttl(moto, prefix,
                                                                            clock):
    reader = S3AdapterStore("adapters", prefix, client=moto.client(), record_ttl_s=0.5)
    writer = S3AdapterStore("adapters", prefix, client=moto.client())
    assert reader.peek_record("t", "a") is None  # never read: a GET is needed
    with pytest.raises(AdapterNotFoundError):
        reader.get_record("t", "a")
    with pytest.raises(AdapterNotFoundError):  # the negative answer is remembered too
        reader.peek_record("t", "a")
    record = writer.put("t", "a", make_parsed(seed=1))
    clock[0] += 0.375
    with pytest.raises(AdapterNotFoundError):  # within the TTL: the answer it read
        reader.peek_record("t", "a")
    clock[0] += 0.125
    assert reader.peek_record("t", "a") is None  # expired: no stale answer
    assert reader.get_record("t", "a") == record
    assert reader.peek_record("t", "a") == record
    assert writer.peek_record("t", "a") is None  # record_ttl_s=0 never answers from memory


def test_unreachable_endpoint_is_store_unavailable():
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x",
                          config=Config(connect_timeout=0.5, retries={"max_attempts": 1}))
    store = S3AdapterStore("adapters", "p", client=client)
    with pytest.raises(StoreUnavailableError):
        store.ping()
    with pytest.raises(StoreUnavailableError):
        store.get_record("t", "a")
    with pytest.raises(StoreUnavailableError):
        store.put("t", "a", make_parsed())


@pytest.mark.parametrize(("url", "parsed"), [
    ("s3://bucket", ("bucket", "")), ("s3://bucket/a/b/", ("bucket", "a/b"))])
def test_parse_s3_url(url, parsed):
    assert parse_s3_url(url) == parsed


def _orphan(store: S3AdapterStore, namespace: str, adapter_id: str, version: str) -> None:
    """A version written and never published: what a writer killed before the pointer leaves."""
    record = store.put(namespace, f"tmp-{version}", make_parsed(seed=9))
    store._write_version(namespace, adapter_id, version, b"x" * 16, b"{}", record)
    store.delete(namespace, f"tmp-{version}")


def test_collect_garbage_removes_only_old_unreferenced_versions(store, moto, prefix):
    live = store.put("t", "a", make_parsed(seed=1))
    _orphan(store, "t", "a", "dead-1")  # beside a live adapter
    _orphan(store, "t", "gone", "dead-2")  # of an adapter that has no pointer at all
    before = _keys(moto, prefix)
    assert store.collect_garbage(min_age_s=3600) == []  # too young: could be a put under way
    orphans = store.collect_garbage(min_age_s=0, dry_run=True)
    assert sorted(orphans) == sorted(k for k in before if "/dead-" in k) and len(orphans) == 6
    assert _keys(moto, prefix) == before  # dry run deleted nothing
    assert sorted(store.collect_garbage(min_age_s=0)) == sorted(orphans)
    after = _keys(moto, prefix)
    assert not any("/dead-" in k for k in after) and len(after) == 1 + 3
    assert store.get("t", "a", verify=True).record == live  # the live version is untouched
    assert store.collect_garbage(min_age_s=0) == []


def test_store_gc_command_over_the_aws_variables(store, moto, prefix):
    store.put("t", "a", make_parsed(seed=1))
    _orphan(store, "t", "a", "dead-3")
    env = {**os.environ, **moto.env()}
    run = subprocess.run([sys.executable, "-m", "server", "store-gc", "--store",
                          f"s3://adapters/{prefix}", "--min-age-s", "0"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == 3 and all("/dead-3/" in k for k in run.stdout.split())
    assert "deleted 3 unreferenced version objects" in run.stderr
    assert not any("/dead-3/" in k for k in _keys(moto, prefix))
    assert store.get("t", "a", verify=True).embeddings.shape == (4, 8)
