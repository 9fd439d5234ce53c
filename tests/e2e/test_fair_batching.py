"""Fair batching through the real server (the engine core, by default): tenant a's long
streams fill the batch, tenant b's request preempts one of them instead of waiting, and
a's streams still finish whole;
with weights from the keys file, b parks as many as its weighted share allows."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.e2e.server_process import ServerProcess, metric

KEYS = {"tenant-a": "a-secret-1", "tenant-b": "b-secret-2"}


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def _stream(client: httpx.AsyncClient, text: str, started: asyncio.Event, *,
                  max_new_tokens: int = 300) -> dict:
    """A streaming generate as tenant a; returns its final event."""
    body = {"text": text, "max_new_tokens": max_new_tokens, "ignore_eos": True,
            "stream": True}
    final: dict = {}
    async with client.stream("POST", "/v1/generate", json=body,
                             headers=_auth("tenant-a")) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            started.set()
            event = json.loads(line[len("data: "):])
            if "finish_reason" in event:
                final = event
    return final


def _serve(model_dir, tmp_path, *flags: str) -> ServerProcess:
    """The real server with tenants a and b (weight 1 each) in its keys file, started."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": [{"name": n, "keys": [k]} for n, k in KEYS.items()]}))
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                           "--api-keys", str(keys), *flags)
    server.start()
    return server


async def test_a_full_batch_makes_room_for_another_tenant_over_http(model_dir, tmp_path):
    server = _serve(model_dir, tmp_path, "--max-batch-size", "2")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            starts = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.ensure_future(_stream(client, t, s))
                       for t, s in zip(("abc", "de"), starts, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)

            b_body = {"text": "Hi!", "max_new_tokens": 60, "ignore_eos": True}
            b_task = asyncio.ensure_future(client.post("/v1/generate", json=b_body,
                                                       headers=_auth("tenant-b")))
            parked = 0.0
            while not b_task.done():
                scrape = (await client.get("/metrics")).text
                parked = max(parked, metric(scrape, "softprompt_parked_requests"))
                await asyncio.sleep(0.005)
            b = b_task.result()
            assert b.status_code == 200, b.text
            assert b.json()["usage"]["completion_tokens"] == 60
            assert not any(s.done() for s in streams)  # b did not wait for a's rows
            assert parked == 1

            finals = await asyncio.gather(*streams)
            assert [f["usage"]["completion_tokens"] for f in finals] == [300, 300]
            scrape = (await client.get("/metrics")).text
            assert metric(scrape, "softprompt_parked_requests") == 0
            assert metric(scrape, "softprompt_in_flight_requests") == 0
        assert "batching: core" in server.full_log()
    finally:
        server.stop()


async def test_a_heavier_tenant_parks_up_to_its_weighted_share_over_http(model_dir, tmp_path):
    """Batch of 4, all a's streams; b (weight 3 against 1) sends 4 requests. Weighted shares
    are b 3, a 1, so three of a's rows park (an equal split would park two)."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": [{"name": "tenant-a", "keys": [KEYS["tenant-a"]]},
                                            {"name": "tenant-b", "keys": [KEYS["tenant-b"]],
                                             "weight": 3}]}))
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                           "--api-keys", str(keys), "--max-batch-size", "4")
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            starts = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.ensure_future(_stream(client, t, s))
                       for t, s in zip(("abc", "de", "f", "gh"), starts, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)

            b_body = {"text": "Hi!", "max_new_tokens": 60, "ignore_eos": True}
            b_tasks = [asyncio.ensure_future(client.post("/v1/generate", json=b_body,
                                                         headers=_auth("tenant-b")))
                       for _ in range(4)]
            parked = 0.0
            while not all(t.done() for t in b_tasks):
                scrape = (await client.get("/metrics")).text
                parked = max(parked, metric(scrape, "softprompt_parked_requests"))
                await asyncio.sleep(0.005)
            for task in b_tasks:
                assert task.result().status_code == 200, task.result().text
            assert not any(s.done() for s in streams)
            assert parked == 3

            finals = await asyncio.gather(*streams)
            assert [f["usage"]["completion_tokens"] for f in finals] == [300] * 4
    finally:
        server.stop()


async def test_beside_another_tenant_a_flood_is_held_to_the_contended_cap_over_http(
        model_dir, tmp_path):
    """--contended-tenant-rows 2 caps a flooding tenant at 2 rows of 8 while another tenant
    has work: of a's six streams two rows run and the rest wait, though five slots are free, and
    the tenant gauges show it."""
    server = _serve(model_dir, tmp_path, "--max-batch-size", "8", "--contended-tenant-rows", "2")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            b_body = {"text": "Hi!", "max_new_tokens": 480, "ignore_eos": True}
            b_task = asyncio.ensure_future(client.post("/v1/generate", json=b_body,
                                                       headers=_auth("tenant-b")))

            def gauge(scrape: str, tenant: str, state: str) -> float:
                return metric(scrape, "softprompt_tenant_requests",
                              {"tenant": tenant, "state": state})

            async def scrape_until(predicate) -> str:
                async with asyncio.timeout(30):
                    while not predicate(scrape := (await client.get("/metrics")).text):
                        await asyncio.sleep(0.01)
                return scrape

            await scrape_until(lambda s: gauge(s, "tenant-b", "running") == 1)
            starts = [asyncio.Event() for _ in range(6)]
            streams = [asyncio.ensure_future(_stream(client, "abc", s, max_new_tokens=480))
                       for s in starts]

            # Tiny rows finish fast: count a's finished ones too. Once all six are admitted,
            # a never runs more than two rows though five slots are free; the rest wait.
            def states(scrape: str) -> tuple[float, float, float]:
                done = metric(scrape, "softprompt_requests_total",
                              {"endpoint": "/v1/generate", "method": "POST", "status": "200",
                               "tenant": "tenant-a"})
                return gauge(scrape, "tenant-a", "running"), gauge(scrape, "tenant-a",
                                                                    "queued"), done

            await scrape_until(lambda s: sum(states(s)) == 6)
            # Only readings taken while b still runs say anything about the cap: b's one row
            # finishes on its own time, and after that a may rightly take every free slot.
            seen = []
            while len(seen) < 20:
                scrape = (await client.get("/metrics")).text
                if gauge(scrape, "tenant-b", "running") != 1:
                    break
                seen.append(states(scrape))
                await asyncio.sleep(0.005)
            assert len(seen) >= 3, seen
            assert max(running for running, _, _ in seen) == 2, seen
            running, queued, done = seen[0]
            assert queued >= 1 and done < 4, seen
            for stream in streams:
                stream.cancel()
            b_task.cancel()
            await asyncio.gather(*streams, b_task, return_exceptions=True)
        assert "one starts at most 2 row(s)" in server.full_log()
    finally:
        server.stop()
