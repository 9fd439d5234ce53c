"""While draining, new work is refused with 503 "draining"; reads and probes still answer."""

from __future__ import annotations

from tests.api.conftest import assert_envelope


async def test_draining_refuses_new_work_but_answers_reads(app, client):
    app.state.draining = True
    try:
        generate = await client.post("/v1/generate", json={"text": "hi", "max_new_tokens": 2})
        upload = await client.post("/v1/adapters", data={"adapter_id": "late"})
        delete = await client.delete("/v1/adapters/anything")
        ready = await client.get("/readyz")
        vllm_health = await client.get("/health")
        listed = await client.get("/v1/adapters")
        alive = await client.get("/healthz")
    finally:
        app.state.draining = False
    for r in (generate, upload, delete):
        assert_envelope(r, 503, "draining")
        assert r.headers["retry-after"] == "1"
    assert_envelope(ready, 503, "not_ready")
    assert_envelope(vllm_health, 503, "not_ready")
    assert listed.status_code == 200 and alive.status_code == 200
    after = await client.post("/v1/generate", json={"text": "hi", "max_new_tokens": 2})
    assert after.status_code == 200


async def test_vllm_tools_find_health_and_version(client):
    health = await client.get("/health")
    assert health.status_code == 200 and health.content == b""
    version = (await client.get("/version")).json()
    assert version["version"] and version["engine"] in ("core", "static")
