"""The real server (`python -m server serve`, a subprocess on loopback) under concurrent load.

Every request is its own client connection, all started at t=0, streaming (Server-Sent Events)
so the time to first token is what a client sees. The server shares the engine runner's store
directory and settings (`--engine` among them). Each run also records the bytes a request sends
and receives, and the runner the server's startup time (start to `/readyz`), to set beside
other servers of the same workload.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.fixtures import RequestSpec, warm_up_requests
from benchmarks.harness.results import Run
from server.config import Settings
from tests.e2e.server_process import LoopbackProcess, ServerProcess

_FLAGS = ("device", "dtype", "max_batch_size", "max_wait_ms", "max_queue", "prompt_cache_bytes",
          "tenant_max_concurrent_requests", "max_virtual_tokens", "max_model_len", "batching",
          "engine", "kv_cache_memory")


class StreamingRunner:
    """One streaming client per request, all started at t=0, against a server on loopback.
    A subclass starts `self.server`, calls `_connect`, and says what a request's body is
    (`body`), which events carry tokens (`is_token`, for the time to first token) and what a
    finished stream must hold (`check`)."""

    path: str
    server: LoopbackProcess

    def _connect(self, requests: list[RequestSpec]) -> None:
        self.requests = requests
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(
            base_url=self.server.url, timeout=httpx.Timeout(3600, connect=60),
            limits=httpx.Limits(max_connections=len(requests) + 8,
                                max_keepalive_connections=len(requests) + 8))

    @property
    def startup_s(self) -> float | None:
        return self.server.startup_s

    def body(self, spec: RequestSpec) -> bytes:
        raise NotImplementedError

    def is_token(self, event: dict[str, Any]) -> bool:
        return True

    def check(self, spec: RequestSpec, events: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def warm_up(self, *, with_adapters: bool) -> None:
        self.loop.run_until_complete(self._round(warm_up_requests(self.requests, with_adapters),
                                                 lambda _: None))

    def run(self, tick: Callable[[int], None]) -> Run:
        return self.loop.run_until_complete(self._round(self.requests, tick))

    async def _round(self, requests: list[RequestSpec], tick: Callable[[int], None]) -> Run:
        latencies = [0.0] * len(requests)
        ttfts = [0.0] * len(requests)
        sent = [0] * len(requests)
        received = [0] * len(requests)
        t0 = time.perf_counter()

        async def one(k: int, spec: RequestSpec) -> int:
            content = self.body(spec)
            sent[k] = len(content)
            events: list[dict[str, Any]] = []
            async with self.client.stream("POST", self.path, content=content,
                                          headers={"content-type": "application/json"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
                async for line in counted_lines(r, received, k):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    events.append(json.loads(line.removeprefix("data: ")))
                    if not ttfts[k] and self.is_token(events[-1]):
                        ttfts[k] = time.perf_counter() - t0
            latencies[k] = time.perf_counter() - t0
            tick(1)
            self.check(spec, events)
            return spec.new_tokens

        tokens = sum(await asyncio.gather(*(one(k, s) for k, s in enumerate(requests))))
        return Run(seconds=time.perf_counter() - t0, tokens=tokens, requests=len(requests),
                   latencies_s=latencies, ttft_s=ttfts,
                   extra={"request_bytes": sum(sent) / len(sent),
                          "response_bytes": sum(received) / len(received)})

    def close(self) -> None:
        """The server stops even when the client cannot close (a round cut off by a signal
        leaves its streams and the loop behind), so no server outlives the benchmark."""
        try:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()
        finally:
            self.server.stop()


class HttpRunner(StreamingRunner):
    """This server's `/v1/generate`, streamed."""

    path = "/v1/generate"

    def __init__(self, settings: Settings, requests: list[RequestSpec], log_path: Path, *,
                 engine_process: bool = False) -> None:
        flags: list[str] = ["--log-level", "warning"]
        if engine_process:
            flags.append("--engine-process")
        for name in _FLAGS:
            value = getattr(settings, name)
            flags += ["--" + name.replace("_", "-"), str(getattr(value, "value", value))]
        # settings_for gives the baselines' thread count (plain generate, the in-process
        # engine run in this process): the comparison is of engines, not of thread policies.
        # 0 is the server's own sizing (cpu-contention measures it).
        flags += ["--torch-threads", str(settings.torch_threads)]
        self.server = ServerProcess(Path(settings.model), Path(settings.store), log_path, *flags)
        self.server.start(timeout=1800)
        self._connect(requests)

    def body(self, spec: RequestSpec) -> bytes:
        return json.dumps({"adapter_id": spec.adapter_id, "text": spec.text,
                           "max_new_tokens": spec.new_tokens, "ignore_eos": True,
                           "stream": True}, separators=(",", ":")).encode()

    def check(self, spec: RequestSpec, events: list[dict[str, Any]]) -> None:
        final = events[-1] if events else None
        if final is None or "error" in final:
            raise RuntimeError(f"stream ended without a result: {final}")
        usage = final["usage"]
        assert usage["prompt_tokens"] == len(spec.prompt_ids), usage
        assert usage["completion_tokens"] == spec.new_tokens, usage

    def overhead(self, count: int) -> dict[str, float]:
        """Sequential 1-token requests: client latency minus the engine time the server reports
        in `Server-Timing` is what the HTTP layer adds (client, TCP, uvicorn, validation,
        tokenization, JSON, logging, metrics)."""
        spec = self.requests[0]
        body = {"adapter_id": spec.adapter_id, "text": spec.text, "max_new_tokens": 1}
        lat, engine = [], []
        with httpx.Client(base_url=self.server.url, timeout=120) as c:
            for i in range(count + 10):
                started = time.perf_counter()
                r = c.post("/v1/generate", json=body)
                ms = (time.perf_counter() - started) * 1000
                r.raise_for_status()
                if i >= 10:  # warm-up
                    lat.append(ms)
                    engine.append(float(r.headers["server-timing"].split("dur=")[1]))
        return {"requests": count, "latency_ms_p50": statistics.median(lat),
                "engine_ms_p50": statistics.median(engine),
                "overhead_ms_p50": statistics.median(a - b for a, b in zip(lat, engine,
                                                                             strict=True))}


async def counted_lines(response: httpx.Response, received: list[int],
                        k: int) -> AsyncIterator[str]:
    """The response's lines, adding its body's bytes to `received[k]` as they arrive."""
    pending = b""
    async for chunk in response.aiter_bytes():
        received[k] += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode().rstrip("\r")
    if pending:
        yield pending.decode()
