"""/v1/generate and the edge in process: limits, statuses, envelope, access log, OpenAPI."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from server.api.app import create_app
from server.api.errors import classify
from server.config import Settings
from server.engine.errors import (
    AdapterNotFoundError,
    FileTooLargeError,
    InvalidAdapterError,
    QueueFullError,
    UnsupportedAdapterTypeError,
)
from server.engine.factory import build_engine
from tests.api.conftest import asgi_client, assert_envelope, started_engine


@pytest.mark.parametrize("body", [
    {"text": "x", "max_new_tokens": 65},  # above --max-new-tokens-limit 64
    {"text": "x" * 200},  # above --max-input-tokens 100
    {"text": "x", "stop": ["a"] * 17},  # above --max-stop-strings 16
    {"text": "x", "stop": [""]},
    {"text": "x", "seed": -1},
    {"text": 5},
    {"text": "x", "stream": "maybe"},
])
async def test_out_of_range_requests_are_422(client, body):
    assert_envelope(await client.post("/v1/generate", json=body), 422, "validation_error")


async def test_unknown_fields_are_refused_naming_them(client):
    """Ignored, a typo would silently do nothing: 422 names each unknown field."""
    r = await client.post("/v1/generate", json={"text": "x", "max_new_tokens": 2, "n": 3,
                                                "prompt": "y"})
    assert_envelope(r, 422, "validation_error")
    message = r.json()["error"]["message"]
    assert "'n'" in message and "'prompt' (did you mean 'text'?)" in message


async def test_stream_for_unknown_adapter_gets_a_real_404(client):
    r = await client.post("/v1/generate", json={"adapter_id": "ghost", "text": "x",
                                                "stream": True})
    assert_envelope(r, 404, "adapter_not_found")


async def test_engine_time_is_reported_for_overhead_measurement(client):
    r = await client.post("/v1/generate", json={"text": "x", "max_new_tokens": 1})
    assert r.status_code == 200 and r.headers["server-timing"].startswith("engine;dur=")
    assert r.headers["x-request-id"]


async def test_one_json_access_line_per_request_without_secrets(client, caplog):
    caplog.set_level(logging.INFO, logger="softprompt.access")
    r = await client.post("/v1/generate", json={"text": "log me", "max_new_tokens": 3},
                          headers={"Authorization": "Bearer sk-very-secret"})
    assert r.status_code == 200
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "softprompt.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["path"] == "/v1/generate" and line["status"] == 200
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] == 7
    assert line["latency_ms"] > 0
    assert "sk-very-secret" not in caplog.text


async def test_full_queue_is_429_with_retry_after(tiny_model_dirs, tmp_path):
    settings, engine, metrics = started_engine(tiny_model_dirs["llama"], tmp_path,
                                               max_queue=1, max_batch_size=1, max_wait_ms=0)
    app = create_app(settings, engine, metrics=metrics, manage_engine=False)
    try:
        async with asgi_client(app) as c:
            body = {"text": "busy", "max_new_tokens": 20, "ignore_eos": True}
            responses = await asyncio.gather(*(c.post("/v1/generate", json=body)
                                               for _ in range(8)))
    finally:
        engine.shutdown(10)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert_envelope(rejected, 429, "queue_full")
    assert int(rejected.headers["retry-after"]) >= 1


async def test_not_ready_until_the_model_is_loaded(tiny_model_dirs, tmp_path):
    settings = Settings(model=str(tiny_model_dirs["llama"]), store=str(tmp_path), device="cpu")
    engine = build_engine(settings)  # never started: the model is "still loading"
    app = create_app(settings, engine, manage_engine=False)
    async with asgi_client(app) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert_envelope(await c.get("/readyz"), 503, "not_ready")
        assert_envelope(await c.get("/health"), 503, "not_ready")
        assert (await c.get("/version")).json()["engine"] is None
        assert_envelope(await c.post("/v1/generate", json={"text": "x"}), 503, "not_ready")
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200 and "softprompt_ready 0.0" in metrics.text


async def test_unexpected_exceptions_are_500_envelopes_and_logged_by_type(app, caplog):
    async def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/test-boom", boom)
    async with asgi_client(app) as c:
        r = await c.get("/test-boom")
    error = assert_envelope(r, 500, "internal_error")
    assert "secret" not in error["message"]
    assert "RuntimeError" in caplog.text


def test_error_table_maps_subclasses_through_their_nearest_base():
    assert classify(FileTooLargeError("x")).status == 413
    assert classify(UnsupportedAdapterTypeError("x")).status == 400
    assert classify(InvalidAdapterError("x")).status == 400
    assert classify(AdapterNotFoundError("x")).status == 404
    assert classify(QueueFullError("x")).status == 429
    assert classify(KeyError("x")) is None


async def test_openapi_documents_every_endpoint_and_error(client):
    spec = (await client.get("/openapi.json")).json()
    expected = {("/v1/generate", "post"): {"404", "422", "429", "503"},
                ("/v1/adapters", "post"): {"400", "409", "413", "422"},
                ("/v1/adapters", "get"): set(),
                ("/v1/adapters/{adapter_id}", "get"): {"404"},
                ("/v1/adapters/{adapter_id}", "delete"): {"404"},
                ("/healthz", "get"): set(), ("/readyz", "get"): {"503"},
                ("/metrics", "get"): set()}
    for (path, method), errors in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert errors <= set(responses), (path, method)
        for status in errors:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse")
    upload = spec["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
    assert set(upload["multipart/form-data"]["schema"]["properties"]) == {
        "adapter_id", "config", "weights", "archive", "template"}
    assert "text/event-stream" in spec["paths"]["/v1/generate"]["post"]["responses"]["200"][
        "content"]
