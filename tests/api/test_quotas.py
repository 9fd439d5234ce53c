"""Per-tenant quotas through HTTP with a real engine, and the QuotaManager's accounting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from server.api import quotas as quotas_module
from server.api.app import create_app
from server.api.errors import TooManyRequestsError
from server.api.quotas import QuotaManager
from server.config import Settings
from tests.api.conftest import asgi_client, assert_envelope, started_engine
from tests.factories import make_adapter

TENANTS = [
    {"name": "tight", "keys": ["tight-key"],
     "quotas": {"max_adapters": 1, "max_concurrent_requests": 1, "max_new_tokens": 4,
                "max_input_tokens": 5}},
    {"name": "slow", "keys": ["slow-key"], "quotas": {"requests_per_second": 0.5}},
    {"name": "small", "keys": ["small-key"], "quotas": {"max_stored_bytes": 100}},
    {"name": "pair", "keys": ["pair-key"], "quotas": {"max_concurrent_requests": 2}},
]


def _h(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant}-key"}


@pytest.fixture(scope="module")
def quota_app(tiny_model_dirs, tmp_path_factory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("quotas")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"tenants": TENANTS}))
    settings, engine, metrics = started_engine(tiny_model_dirs["llama"], root / "store",
                                               api_keys=keys)
    adapter = make_adapter(tiny_model_dirs["llama"], root / "adapter", "prompt_tuning",
                           num_virtual_tokens=3, seed=6)
    yield create_app(settings, engine, metrics=metrics, manage_engine=False), adapter
    engine.shutdown(10)


@pytest.fixture()
async def qclient(quota_app):
    async with asgi_client(quota_app[0]) as c:
        yield c


def _files(adapter) -> dict:
    return {"config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors",
                        (adapter / "adapter_model.safetensors").read_bytes())}


@pytest.mark.parametrize(("body", "limit"), [
    ({"text": "hi", "max_new_tokens": 5}, "max_new_tokens=4"),
    ({"text": "abcdefgh", "max_new_tokens": 2}, "max_input_tokens=5"),
])
async def test_request_size_quotas_are_422_naming_the_limit(qclient, body, limit):
    r = await qclient.post("/v1/generate", headers=_h("tight"), json=body)
    assert limit in assert_envelope(r, 422, "validation_error")["message"]
    ok = await qclient.post("/v1/generate", headers=_h("tight"),
                            json={"text": "hi", "max_new_tokens": 4})
    assert ok.status_code == 200, ok.text


async def test_adapter_count_and_bytes_quotas_are_413(qclient, quota_app):
    app, adapter = quota_app
    first = await qclient.post("/v1/adapters", headers=_h("tight"), data={"adapter_id": "one"},
                               files=_files(adapter))
    assert first.status_code == 201, first.text
    second = await qclient.post("/v1/adapters", headers=_h("tight"),
                                data={"adapter_id": "two"}, files=_files(adapter))
    assert "max_adapters=1" in assert_envelope(second, 413, "quota_exceeded")["message"]
    replace = await qclient.post("/v1/adapters", headers=_h("tight"), params={"overwrite": "1"},
                                 data={"adapter_id": "one"}, files=_files(adapter))
    assert replace.status_code == 201, replace.text
    big = await qclient.post("/v1/adapters", headers=_h("small"), data={"adapter_id": "big"},
                             files=_files(adapter))
    assert "max_stored_bytes=100" in assert_envelope(big, 413, "quota_exceeded")["message"]
    listed = await qclient.get("/v1/adapters", headers=_h("small"))
    assert listed.json()["adapters"] == []  # refused after storing: deleted again


async def test_rate_limit_is_429_with_retry_after(qclient):
    body = {"text": "hi", "max_new_tokens": 1}
    assert (await qclient.post("/v1/generate", headers=_h("slow"), json=body)).status_code == 200
    r = await qclient.post("/v1/generate", headers=_h("slow"), json=body)
    assert "requests_per_second=0.5" in assert_envelope(r, 429, "rate_limited")["message"]
    assert int(r.headers["retry-after"]) >= 1


async def test_concurrency_limit_counts_held_leases_and_frees_them(qclient, quota_app):
    app, _ = quota_app
    manager: QuotaManager = app.state.quotas
    body = {"text": "hi", "max_new_tokens": 2}
    for stream in (False, True):
        r = await qclient.post("/v1/generate", headers=_h("tight"), json=body | {"stream": stream})
        assert r.status_code == 200, r.text
        assert manager.active("tight") == 0
    _, quotas = manager, manager.limits("tight", app.state.keyring.table)
    lease = manager.admit("tight", quotas)  # another request of the tenant in flight
    try:
        r = await qclient.post("/v1/generate", headers=_h("tight"), json=body)
        assert "max_concurrent_requests=1" in assert_envelope(r, 429)["message"]
        assert r.headers["retry-after"] == "1"
        other = await qclient.post("/v1/generate", headers=_h("slow"), json=body)
        assert other.status_code in (200, 429)  # its own bucket, never tight's slot
        assert "max_concurrent" not in other.text
    finally:
        lease.release()
    assert (await qclient.post("/v1/generate", headers=_h("tight"), json=body)).status_code == 200


def test_token_bucket_refills_at_the_rate(monkeypatch):
    clock = [100.0]  # the bucket's clock, moved by hand: a slow machine must not refill it
    monkeypatch.setattr(quotas_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    manager = QuotaManager(Settings(tenant_requests_per_second=1000.0,
                                    tenant_max_concurrent_requests=2000))
    quotas = manager.limits("t", None)
    leases = [manager.admit("t", quotas) for _ in range(1000)]  # burst = rate
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert manager.active("t") == 0
    with pytest.raises(TooManyRequestsError) as exc:
        manager.admit("t", quotas)
    assert exc.value.retry_after_s == pytest.approx(0.001)
    clock[0] += 0.0055  # 5.5 ms at 1000/s: five more
    for _ in range(5):
        manager.admit("t", quotas).release()
    with pytest.raises(TooManyRequestsError):
        manager.admit("t", quotas)


async def test_each_of_n_choices_takes_a_concurrency_slot(qclient, quota_app):
    """n choices run as n sequences: a tenant held to 2 at once cannot run 3 in one request."""
    app, _ = quota_app
    manager: QuotaManager = app.state.quotas
    quotas = manager.limits("pair", app.state.keyring.table)
    body = {"prompt": "hi", "max_tokens": 2, "n": 2}
    name = (await qclient.get("/v1/models", headers=_h("pair"))).json()["data"][0]["id"]
    r = await qclient.post("/v1/completions", headers=_h("pair"), json=body | {"model": name})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    assert manager.active("pair") == 0
    r = await qclient.post("/v1/completions", headers=_h("pair"),
                           json=body | {"model": name, "n": 3})
    assert r.status_code == 400 and "max_concurrent_requests=2" in r.json()["error"]["message"]
    lease = manager.admit("pair", quotas)  # one of the tenant's requests in flight
    try:
        r = await qclient.post("/v1/completions", headers=_h("pair"), json=body | {"model": name})
        assert r.status_code == 429 and "max_concurrent_requests=2" in r.text
    finally:
        lease.release()
    assert manager.active("pair") == 0
