"""--max-request-body-bytes: JSON bodies over the limit get 413 before they are held in memory;
adapter uploads keep their own (larger) limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest

from server.api.app import create_app
from tests.api.conftest import asgi_client, assert_envelope, started_engine
from tests.factories import make_adapter

LIMIT = 4096


@pytest.fixture(scope="module")
def small_app(tiny_model_dirs, tmp_path_factory) -> Iterator:
    settings, engine, metrics = started_engine(
        tiny_model_dirs["llama"], tmp_path_factory.mktemp("body-store"),
        max_request_body_bytes=LIMIT)
    yield create_app(settings, engine, metrics=metrics, manage_engine=False)
    engine.shutdown(10)


@pytest.fixture()
async def client(small_app):
    async with asgi_client(small_app) as c:
        yield c


def _body(size: int) -> bytes:
    """A valid generate body of exactly `size` bytes."""
    head = json.dumps({"text": "", "max_new_tokens": 1}).encode()
    return json.dumps({"text": "a" * (size - len(head)), "max_new_tokens": 1}).encode()


async def test_declared_length_over_the_limit_is_413_with_the_envelope(client):
    r = await client.post("/v1/generate", content=_body(LIMIT + 1),
                          headers={"content-type": "application/json"})
    error = assert_envelope(r, 413, "payload_too_large")
    assert str(LIMIT) in error["message"] and "--max-request-body-bytes" in error["message"]


async def test_a_chunked_body_is_cut_off_as_it_streams_in(client):
    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        body = _body(10 * LIMIT)
        for i in range(0, len(body), 1024):
            sent.append(i)
            yield body[i:i + 1024]

    r = await client.post("/v1/generate", content=chunks(),
                          headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, "payload_too_large")


async def test_openai_routes_answer_in_openai_error_shape(client):
    body = json.dumps({"model": "x", "prompt": "a" * LIMIT}).encode()
    r = await client.post("/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_body_at_the_limit_is_served(client):
    r = await client.post("/v1/generate", content=_body(LIMIT),
                          headers={"content-type": "application/json"})
    assert r.status_code != 413, r.text  # served (200) or refused for its content, not size
    r = await client.post("/v1/generate", json={"text": "hello", "max_new_tokens": 2})
    assert r.status_code == 200


async def test_uploads_are_not_held_to_the_json_limit(client, tiny_model_dirs, tmp_path):
    adapter = make_adapter(tiny_model_dirs["llama"], tmp_path / "a", "prompt_tuning",
                           num_virtual_tokens=16)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert len(weights) > LIMIT
    r = await client.post("/v1/adapters", data={"adapter_id": "big"}, files={
        "config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", weights)})
    assert r.status_code == 201, r.text
