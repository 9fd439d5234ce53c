"""Clients that walk away mid-stream are aborted and leave nothing behind in the engine."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import ENGINE_MODES
from tests.e2e.server_process import ServerProcess, metric

GAUGES = ("softprompt_in_flight_requests", "softprompt_queue_depth")
HANG_S = 120  # a bound on each wait that only a hang reaches


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
    generated = ("softprompt_batch_row_steps_total", {"kind": "generated"})
    before = metric(httpx.get(url + "/metrics", timeout=HANG_S).text, *generated)

    async def run() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=HANG_S, limits=limits) as client:
            await asyncio.gather(*(_open_and_leave(client, i) for i in range(50)))

    asyncio.run(run())
    deadline = time.monotonic() + HANG_S
    while True:
        text = httpx.get(url + "/metrics", timeout=HANG_S).text
        values = [metric(text, g) for g in GAUGES]
        # The scrape itself is the one HTTP request in flight.
        if values == [0.0, 0.0] and metric(text, "softprompt_http_requests_in_flight") == 1.0:
            break
        assert time.monotonic() < deadline, f"gauges stuck at {values}"
        time.sleep(0.1)
    # Without aborts every stream runs to its 400th token (50 x 400 tokens, about a minute on
    # 2 CPU cores); aborted, each stops within a few tokens of its client leaving. Counted in
    # tokens, so a slow machine neither fails this nor lets a missing abort through.
    made = metric(text, *generated) - before
    assert made < 50 * 400 // 4, made
    # The server still serves after all that.
    r = httpx.post(url + "/v1/generate", json={"text": "still there", "max_new_tokens": 3},
                   timeout=HANG_S)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
