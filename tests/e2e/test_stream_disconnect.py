"""Clients that walk away mid-stream are aborted and leave nothing behind in the engine."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import ENGINE_MODES
from tests.e2e.server_process import ServerProcess, metric

GAUGES = ("softprompt_in_flight_requests", "softprompt_queue_depth")


@pytest.fixture(scope="module", **ENGINE_MODES)
def small_batch_server(request, model_dir, tmp_path_factory):
    """Batches of 8, so most of the 50 streams are still queued when their clients leave; the
    engine in process and in its own (aborts then cross the pipe)."""
    root = tmp_path_factory.mktemp("disconnect")
    with ServerProcess(model_dir, root / "store", root / "server.log",
                       "--max-batch-size", "8", "--max-wait-ms", "5", *request.param) as proc:
        yield proc


async def _open_and_leave(client: httpx.AsyncClient, i: int) -> None:
    body = {"text": f"stream {i}", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
    if i % 2:  # leave before the response starts (still queued or before its first token)
        try:
            async with asyncio.timeout(0.3):
                async with client.stream("POST", "/v1/generate", json=body) as r:
                    await r.aread()
        except TimeoutError:
            return
    else:  # leave after the first event
        async with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break


def test_fifty_disconnecting_streams_leave_gauges_at_zero(small_batch_server):
    url = small_batch_server.url

    async def run() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(_open_and_leave(client, i) for i in range(50)))

    started = time.monotonic()
    asyncio.run(run())
    # Without aborts the engine would run 7 batches of 400 steps (about a minute on 2 CPU
    # cores: one 400-token row alone takes ~8 s); aborted, it drains in a second or two.
    deadline = started + 20
    while True:
        text = httpx.get(url + "/metrics").text
        values = [metric(text, g) for g in GAUGES]
        # The scrape itself is the one HTTP request in flight.
        if values == [0.0, 0.0] and metric(text, "softprompt_http_requests_in_flight") == 1.0:
            break
        assert time.monotonic() < deadline, f"gauges stuck at {values}"
        time.sleep(0.1)
    # The server still serves after all that.
    r = httpx.post(url + "/v1/generate", json={"text": "still there", "max_new_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
