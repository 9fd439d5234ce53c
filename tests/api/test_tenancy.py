"""Tenants through HTTP with a real engine: keys, isolation matrix, admin ?tenant=, reload."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.api.tenants import KeyFileError, parse_key_file
from tests.api.conftest import asgi_client, assert_envelope, started_engine
from tests.factories import make_adapter

KEYS = {"acme": "acme-key", "beta": "beta-key", "admin": "admin-key"}


def write_keys(path: Path, *, extra_tenants: list[dict] | None = None) -> Path:
    beta_hash = "sha256:" + hashlib.sha256(KEYS["beta"].encode()).hexdigest()
    tenants = [{"name": "acme", "keys": [KEYS["acme"]]},
               {"name": "beta", "keys": [beta_hash]}, *(extra_tenants or [])]
    path.write_text(json.dumps({"tenants": tenants, "admin_keys": [KEYS["admin"]]}))
    return path


@pytest.fixture(scope="module")
def tenancy(tiny_model_dirs, tmp_path_factory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("tenancy")
    keys = write_keys(root / "keys.json")
    settings, engine, metrics = started_engine(tiny_model_dirs["llama"], root / "store",
                                               api_keys=keys, max_new_tokens_limit=8)
    adapter = make_adapter(tiny_model_dirs["llama"], root / "adapter", "prompt_tuning",
                           num_virtual_tokens=3, seed=5)
    yield create_app(settings, engine, metrics=metrics, manage_engine=False), adapter, keys
    engine.shutdown(10)


@pytest.fixture()
async def tclient(tenancy):
    async with asgi_client(tenancy[0]) as c:
        yield c


def _auth(who: str) -> dict[str, str]:
    if who == "none":
        return {}
    if who == "wrong":
        return {"Authorization": "Bearer not-a-key"}
    return {"Authorization": f"Bearer {KEYS[who]}"}


def _files(adapter: Path) -> dict:
    return {"config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors",
                        (adapter / "adapter_model.safetensors").read_bytes())}


async def _call(c: httpx.AsyncClient, endpoint: str, who: str, adapter_id: str,
                adapter: Path, params: dict) -> httpx.Response:
    headers = _auth(who)
    if endpoint == "get":
        return await c.get(f"/v1/adapters/{adapter_id}", headers=headers, params=params)
    if endpoint == "delete":
        return await c.delete(f"/v1/adapters/{adapter_id}", headers=headers, params=params)
    if endpoint == "list":
        return await c.get("/v1/adapters", headers=headers, params=params)
    if endpoint == "upload":
        return await c.post("/v1/adapters", headers=headers, params=params,
                            data={"adapter_id": adapter_id}, files=_files(adapter))
    return await c.post("/v1/generate", headers=headers, params=params,
                        json={"adapter_id": adapter_id, "text": "hi", "max_new_tokens": 2})


# caller -> expected status per endpoint, acting on acme's adapter "owned".
# "admin" names the tenant with ?tenant=acme; "admin-bare" does not.
MATRIX = {
    "acme": {"get": 200, "delete": 204, "list": 200, "upload": 409, "generate": 200},
    "beta": {"get": 404, "delete": 404, "list": 200, "upload": 201, "generate": 404},
    "admin": {"get": 200, "delete": 204, "list": 200, "upload": 409, "generate": 200},
    "admin-bare": {"get": 422, "delete": 422, "list": 200, "upload": 422, "generate": 422},
    "none": dict.fromkeys(("get", "delete", "list", "upload", "generate"), 401),
    "wrong": dict.fromkeys(("get", "delete", "list", "upload", "generate"), 401),
}


@pytest.mark.parametrize("endpoint", ["get", "delete", "list", "upload", "generate"])
@pytest.mark.parametrize("caller", list(MATRIX))
async def test_isolation_matrix(tclient, tenancy, endpoint, caller):
    _, adapter, _ = tenancy
    admin_acme = {"Authorization": f"Bearer {KEYS['admin']}"}
    r = await tclient.post("/v1/adapters", headers=admin_acme,
                           params={"tenant": "acme", "overwrite": "true"},
                           data={"adapter_id": "owned"}, files=_files(adapter))
    assert r.status_code == 201, r.text
    await tclient.delete("/v1/adapters/owned", headers=_auth("beta"))  # beta's own copy
    who = "admin" if caller == "admin-bare" else caller
    params = {"tenant": "acme"} if caller == "admin" else {}
    r = await _call(tclient, endpoint, who, "owned", adapter, params)
    want = MATRIX[caller][endpoint]
    if want >= 400:
        error = assert_envelope(r, want)
        if want == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        if want == 404:  # indistinguishable from an id that exists nowhere
            missing = await _call(tclient, endpoint, who, "nowhere", adapter, params)
            assert missing.status_code == 404
            assert error["message"] == missing.json()["error"]["message"].replace(
                "nowhere", "owned")
        if want == 422:
            assert "?tenant=" in error["message"]
    else:
        assert r.status_code == want, r.text
    if endpoint == "list" and want == 200:
        listed = {(a.get("tenant"), a["adapter_id"]) for a in r.json()["adapters"]}
        expected_seen = {"acme": (None, "owned"), "admin": (None, "owned"),
                         "admin-bare": ("acme", "owned")}
        if caller in expected_seen:
            assert expected_seen[caller] in listed
        else:
            assert all(a_id != "owned" for _, a_id in listed)
    # acme's adapter survives whatever another tenant or a refused caller did
    still = await tclient.get("/v1/adapters/owned", headers=_auth("acme"))
    assert still.status_code == (404 if endpoint == "delete" and want == 204 else 200)


async def test_admin_with_an_unknown_tenant_is_refused(tclient):
    r = await tclient.get("/v1/adapters", headers=_auth("admin"), params={"tenant": "ghost"})
    assert "ghost" in assert_envelope(r, 422)["message"]


async def test_health_and_metrics_need_no_key(tclient):
    for path in ("/healthz", "/readyz", "/health", "/version", "/metrics"):
        assert (await tclient.get(path)).status_code == 200, path


async def test_request_and_token_metrics_carry_the_tenant_label(tclient):
    from tests.e2e.server_process import metric

    await tclient.get("/v1/adapters", headers=_auth("wrong"))
    r = await tclient.post("/v1/generate", headers=_auth("beta"),
                           json={"text": "count me", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    text = (await tclient.get("/metrics")).text
    assert metric(text, "softprompt_generated_tokens_total", {"tenant": "beta"}) >= 2
    # Latency by tenant: one tenant's waits can be told from another's.
    for name in ("softprompt_time_to_first_token_seconds_count",
                 "softprompt_queue_wait_seconds_count"):
        assert metric(text, name, {"tenant": "beta"}) >= 1
        assert metric(text, name) == 0  # no series without the label
    assert metric(text, "softprompt_requests_total", {
        "endpoint": "/v1/generate", "method": "POST", "status": "200", "tenant": "beta"}) >= 1
    assert metric(text, "softprompt_requests_total", {
        "endpoint": "/v1/adapters", "method": "GET", "status": "401",
        "tenant": "unauthenticated"}) >= 1
    assert "owned" not in text  # no adapter-id label


async def test_keys_file_reloads_on_mtime_and_keeps_old_keys_when_broken(tclient, tenancy):
    app, _, keys = tenancy
    new = {"Authorization": "Bearer gamma-key"}
    assert (await tclient.get("/v1/adapters", headers=new)).status_code == 401
    write_keys(keys, extra_tenants=[{"name": "gamma", "keys": ["gamma-key"]}])
    os.utime(keys, ns=(time.time_ns(), time.time_ns() + 10**9))
    app.state.keyring._checked = 0.0  # skip the 1 s stat throttle
    assert (await tclient.get("/v1/adapters", headers=new)).status_code == 200
    keys.write_text("{not json")
    assert app.state.keyring.reload() is False
    assert (await tclient.get("/v1/adapters", headers=new)).status_code == 200
    write_keys(keys)
    assert app.state.keyring.reload() is True
    assert (await tclient.get("/v1/adapters", headers=new)).status_code == 401


def test_keys_file_weights_parse_with_a_default_and_name_the_field_when_wrong(tmp_path):
    keys = write_keys(tmp_path / "keys.json",
                      extra_tenants=[{"name": "gold", "keys": ["gold-key"], "weight": 2.5}])
    table = parse_key_file(keys)
    assert (table.weight("gold"), table.weight("acme"), table.weight("unknown")) == (2.5, 1, 1)
    for bad in (0, -1, 1001, "heavy"):
        write_keys(keys, extra_tenants=[{"name": "gold", "keys": ["gold-key"], "weight": bad}])
        with pytest.raises(KeyFileError, match=r"tenants\.2\.weight"):
            parse_key_file(keys)


async def test_tenant_weights_reach_the_fair_scheduler_and_follow_reloads(tenancy):
    app, _, keys = tenancy
    weight_of = app.state.engine._policy.weight_of  # what the engine thread asks per decision
    assert (weight_of("acme"), weight_of("gamma")) == (1, 1)
    write_keys(keys, extra_tenants=[{"name": "gamma", "keys": ["gamma-key"], "weight": 4}])
    try:
        assert app.state.keyring.reload() is True
        assert (weight_of("acme"), weight_of("gamma")) == (1, 4)
    finally:
        write_keys(keys)
        assert app.state.keyring.reload() is True
    assert weight_of("gamma") == 1


@pytest.mark.parametrize("name", ["acme\n", "acme\r", "\nacme", "ac\nme"])
def test_a_tenant_name_with_a_newline_is_refused(tmp_path, name):
    """`$` matches before a final newline; names are the store's path components and must
    match the id pattern whole."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": [{"name": name, "keys": ["k1"]}]}))
    with pytest.raises(KeyFileError, match="tenant name"):
        parse_key_file(path)


def test_a_sha256_key_with_a_trailing_newline_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": [{"name": "acme",
                                             "keys": ["sha256:" + "a" * 64 + "\n"]}]}))
    with pytest.raises(KeyFileError, match="64 hex digits"):
        parse_key_file(path)


def test_a_non_finite_rate_in_the_keys_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text('{"tenants": [{"name": "acme", "keys": ["k1"], '
                    '"quotas": {"requests_per_second": NaN}}]}')
    with pytest.raises(KeyFileError, match="requests_per_second"):
        parse_key_file(path)
