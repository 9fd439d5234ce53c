"""The engine in process: every request submitted at t=0, as concurrent asyncio tasks.

Requests use Engine.generate (what /v1/generate without streaming does); time to first token is
the engine's own measurement (submit to first token), as exported in its metrics."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters_store import LocalAdapterStore
from benchmarks.harness.fixtures import NAMESPACE, RequestSpec, dtype_of, warm_up_requests
from benchmarks.harness.results import Run, percentiles_ms
from benchmarks.harness.workloads import Workload, max_model_len, vllm_kv_cache
from server.config import Settings
from server.engine.engine import Engine
from server.engine.interface import GenerationRequest, SamplingParams
from server.engine.observer import CacheEvent, NullObserver

_ids = itertools.count()


class Recorder(NullObserver):
    """What the engine reports: cache events, cold loads, batch shapes. Engine threads write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.cache = {e: 0 for e in CacheEvent}
            self.loads: list[float] = []
            self.batch_sizes: list[int] = []
            self.row_steps = 0
            self.batches_finished = 0
            self.generated = 0
            self.first_tokens: list[float] = []  # submit to first token, per request
            self.decode_steps: list[float] = []  # seconds between a step and the decode after
            self._last_step: float | None = None

    def cache_event(self, event: CacheEvent) -> None:
        with self._lock:
            self.cache[CacheEvent(event)] += 1

    def adapter_loaded(self, seconds: float) -> None:
        with self._lock:
            self.loads.append(seconds)

    def first_token(self, seconds: float, *, tenant: str) -> None:
        with self._lock:
            self.first_tokens.append(seconds)

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        with self._lock:
            self.batch_sizes.append(size)

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.row_steps += size * steps
            self.batches_finished += 1
            self.generated += generated_tokens
            # A one-step batch in which every row drew a token: a decode step (the engine
            # loops); its time is from the end of the step before.
            if steps == 1 and generated_tokens == size and self._last_step is not None:
                self.decode_steps.append(now - self._last_step)
            self._last_step = now


def settings_for(workload: Workload, model_dir: Path, store_dir: Path,
                 max_wait_ms: float, batching: str = "core", *,
                 engine: str = "builtin") -> Settings:
    """The same settings for the in-process engine and the HTTP server.

    `--max-model-len` is the workload's longest request rounded up to a power of two, as an
    operator would set it: each KV slot then holds what a row needs rather than the model's
    whole context, so the engine, the server and the baselines' model fit on one GPU together
    (three copies of the 8B shape's weights, and two KV caches). The engine is named rather
    than left to auto, which would pick vllm on a GPU host where it is installed.

    `--torch-threads` is this process's count, which the baselines here compute with: left
    automatic, the in-process engine would set the whole process to one thread fewer than
    the cores (the server's default leaves a core to its HTTP process), and the baselines and
    the HTTP server after it would inherit that. The comparison is of engines, not of thread
    policies."""
    max_len = max_model_len(workload)
    # The prompt table holds the workload's adapters twice over (many-adapters: the number it
    # names), and so bounds the prefix cache, which takes what the slots leave on a GPU.
    cached = workload.cache_adapters or 2 * workload.adapters
    cache_bytes = cached * workload.virtual_tokens * workload.shape.hidden \
        * dtype_of(workload.dtype).itemsize
    return Settings(model=str(model_dir), store=str(store_dir), device=workload.device,
                    dtype=workload.dtype, max_batch_size=workload.max_batch_size,
                    max_wait_ms=max_wait_ms, batching=batching,
                    max_queue=max(1024, 2 * workload.requests),
                    prompt_cache_bytes=cache_bytes,
                    tenant_max_concurrent_requests=max(256, 2 * workload.requests),
                    max_virtual_tokens=workload.virtual_tokens,
                    max_model_len=max_len, engine=engine, torch_threads=torch.get_num_threads(),
                    kv_cache_memory=vllm_kv_cache(workload, max_len) if engine == "vllm"
                    else "auto")


class EngineRunner:
    def __init__(self, settings: Settings, requests: list[RequestSpec]) -> None:
        self.requests = requests
        self.recorder = Recorder()
        self.loop = asyncio.new_event_loop()
        self.engine = Engine(settings, LocalAdapterStore(settings.store), observer=self.recorder)
        self.engine.start()
        self.engine.wait_until_ready(1800)

    def warm_up(self, *, with_adapters: bool) -> None:
        """Compile/allocate once; with_adapters also makes every adapter used resident."""
        self.loop.run_until_complete(self._round(warm_up_requests(self.requests, with_adapters),
                                                 lambda _: None))

    def run(self, tick: Callable[[int], None]) -> Run:
        self.recorder.reset()
        return self.loop.run_until_complete(self._round(self.requests, tick))

    async def _round(self, requests: list[RequestSpec], tick: Callable[[int], None]) -> Run:
        latencies: list[float] = [0.0] * len(requests)
        t0 = time.perf_counter()

        async def one(k: int, spec: RequestSpec) -> int:
            req = GenerationRequest(
                request_id=f"bench-{next(_ids)}", prompt_ids=spec.prompt_ids,
                adapter_id=spec.adapter_id, namespace=NAMESPACE,
                params=SamplingParams(max_new_tokens=spec.new_tokens, ignore_eos=True))
            result = await self.engine.generate(req)
            latencies[k] = time.perf_counter() - t0
            tick(1)
            assert result.completion_tokens == spec.new_tokens, result
            return spec.new_tokens

        tokens = sum(await asyncio.gather(*(one(k, s) for k, s in enumerate(requests))))
        seconds = time.perf_counter() - t0
        rec = self.recorder
        while rec.batches_finished < len(rec.batch_sizes):  # results leave before the batch
            await asyncio.sleep(0.005)                      # reports that it finished
        hits, misses = rec.cache[CacheEvent.HIT], rec.cache[CacheEvent.MISS]
        extra = {
            "batches": len(rec.batch_sizes),
            "mean_batch_size": sum(rec.batch_sizes) / max(1, len(rec.batch_sizes)),
            "wasted_row_steps_pct": 100 * (1 - rec.generated / rec.row_steps)
            if rec.row_steps else 0.0,
            "prompt_cache": {"hits": hits, "misses": misses,
                             "evictions": rec.cache[CacheEvent.EVICTION],
                             "hit_rate": hits / (hits + misses) if hits + misses else None},
            "cold_loads": len(rec.loads),
            "cold_load_ms": percentiles_ms(rec.loads),
            "decode_step_ms": percentiles_ms(rec.decode_steps),
        }
        return Run(seconds=seconds, tokens=tokens, requests=len(requests),
                   latencies_s=latencies, ttft_s=list(rec.first_tokens), extra=extra)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose(60))
        self.loop.close()
