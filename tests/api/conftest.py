"""The app in process around a REAL engine on the tiny Llama-shaped model (httpx ASGITransport)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.api.metrics import ApiMetrics
from server.config import Settings
from server.engine.engine import Engine
from server.engine.factory import build_engine


def started_engine(model_dir: Path, store: Path, **settings_kw) -> tuple[Settings, Engine,
                                                                        ApiMetrics]:
    settings = Settings(model=str(model_dir), store=str(store), device="cpu", dtype="float32",
                        **settings_kw)
    metrics = ApiMetrics()
    engine = build_engine(settings, observer=metrics)
    engine.start()
    engine.wait_until_ready(120)
    return settings, engine, metrics


@pytest.fixture(scope="module")
def app(tiny_model_dirs, tmp_path_factory) -> Iterator:
    settings, engine, metrics = started_engine(
        tiny_model_dirs["llama"], tmp_path_factory.mktemp("api-store"),
        max_upload_bytes=200_000, max_new_tokens_limit=64, max_input_tokens=100)
    yield create_app(settings, engine, metrics=metrics, manage_engine=False)
    engine.shutdown(10)


def asgi_client(app) -> httpx.AsyncClient:
    """An httpx client that talks to the app in process (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=60)


@pytest.fixture()
async def client(app):
    async with asgi_client(app) as c:
        yield c


def assert_envelope(r: httpx.Response, status: int, error_type: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if error_type is not None:
        assert body["error"]["type"] == error_type
    return body["error"]
