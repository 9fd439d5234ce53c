"""Prometheus metrics: one CollectorRegistry per app, the engine observer, scrape-time gauges.

No metric carries an adapter id label (tenants create adapters without bound). Gauges that
mirror engine state (queue depth, in-flight, resident adapters, ...) are read from
engine.stats() at scrape time by a custom collector, so they can never drift from the engine.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.interface import EngineClient, GenerationResult
from server.engine.observer import CacheEvent

# No `*_created` series: one extra timestamp series per counter/histogram (and label set) that
# no dashboard or alert here reads.
disable_created_metrics()

PREFIX = "softprompt_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A prompt's embeddings are built in tens of microseconds to a few milliseconds.
_BUILD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

# engine.stats() key -> (metric name without prefix, help). Unknown keys are exported too,
# as softprompt_engine_<key>, so a new engine gauge shows up without an API change.
_STATS_GAUGES = {
    "queue_depth": ("queue_depth", "Requests waiting for a batch (or their adapter)."),
    "queue_capacity": ("queue_capacity", "--max-queue: queued requests before 429 (for "
                       "saturation alerts: queue_depth / queue_capacity)."),
    "in_flight": ("in_flight_requests", "Requests submitted to the engine and not finished."),
    "parked": ("parked_requests", "Running requests preempted by the fair policy (KV slot "
               "freed, recomputed when they resume) so another tenant could have its share of "
               "the batch."),
    "cache_resident_adapters": ("resident_adapters", "Adapters resident in the prompt cache."),
    "cache_bytes": ("resident_adapter_bytes", "Bytes of prompts resident in the prompt cache."),
    "stored_adapters": ("stored_adapters", "Adapters in the store."),
}
# engine.stats() key -> (counter name without prefix and _total, help): the engine counts,
# the collector reports the running totals.
_STATS_COUNTERS = {
    "prefix_hits": ("prefix_cache_hits", "Rows that joined with their soft prompt's keys and "
                    "values from the prefix cache."),
    "prefix_misses": ("prefix_cache_misses", "Rows of an adapter that joined without them "
                      "(computed, and then kept)."),
    "prefix_evictions": ("prefix_cache_evictions", "Prefix cache entries evicted for room."),
    "prefix_tokens_saved": ("prefix_cache_tokens_saved", "Prefill tokens not computed "
                            "because the prefix cache held them."),
}
# Covered by the observer's counters (or aliases of a gauge above): not exported twice.
_STATS_SKIP = frozenset({"cache_resident_bytes", "cache_hits", "cache_misses", "cache_evictions"})
_NAME_OK = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Label values come from closed sets: a client chooses its method name and path, and every
# distinct value would be a new series kept for the life of the process.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUSES = frozenset(int(s) for s in HTTPStatus) | {499}  # 499: the client went away
OTHER = "other"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


def status_label(status: int) -> str:
    return str(status) if status in _STATUSES else OTHER


class VllmMetricsCollector(Collector):
    """vLLM's own metrics (prefix-cache hits, KV cache usage, preemptions, queue times), which
    it registers in the process's default registry when the vllm engine runs, exported beside
    ours. Their labels are vLLM's bounded ones (model name, engine index); nothing without
    that engine."""

    def collect(self) -> Iterator:
        if "vllm" not in sys.modules:
            return
        from prometheus_client import REGISTRY

        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


class EngineStatsCollector(Collector):
    """Reads engine.stats() and model_info at scrape time."""

    def __init__(self, engine: EngineClient, http_in_flight: Callable[[], float]) -> None:
        self._engine = engine
        self._http_in_flight = http_in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = dict(self._engine.stats())
        for key, (name, doc) in _STATS_GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(stats.pop(key, 0.0)))
        for key, (name, doc) in _STATS_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=float(stats.pop(key, 0.0)))
        for key, value in sorted(stats.items()):
            if key not in _STATS_SKIP and _NAME_OK.fullmatch(key):
                yield GaugeMetricFamily(f"{PREFIX}engine_{key}", f"engine.stats()[{key!r}]",
                                        value=float(value))
        tenant_stats = getattr(self._engine, "tenant_stats", None)
        if tenant_stats is not None:
            family = GaugeMetricFamily(
                PREFIX + "tenant_requests", "Requests in the engine by tenant and state: queued "
                "(waiting for a batch or their adapter) or running (in the batch, preempted rows "
                "included). Only tenants with requests in flight appear.",
                labels=["tenant", "state"])
            for tenant, by_state in sorted(tenant_stats().items()):
                for state, count in sorted(by_state.items()):
                    family.add_metric([tenant, state], float(count))
            yield family
        yield GaugeMetricFamily(PREFIX + "http_requests_in_flight",
                                "HTTP requests being handled (streams until they end).",
                                value=self._http_in_flight())
        yield GaugeMetricFamily(PREFIX + "ready", "1 when /readyz would answer 200.",
                                value=1.0 if self._engine.is_ready() else 0.0)
        progress = getattr(self._engine, "progress", None)
        if progress is not None:
            yield GaugeMetricFamily(
                PREFIX + "engine_stalled_seconds", "How long the engine has shown no progress "
                "while requests wait on it (0 while it moves or has nothing to do); past "
                "--engine-stall-timeout-s the replica is not ready.", value=progress().stalled_s)
        try:
            info = self._engine.model_info
        except Exception:  # noqa: BLE001 - not loaded yet: no model_info sample
            info = None
        if info is not None:
            family = GaugeMetricFamily(PREFIX + "model_info", "The served base model (always 1).",
                                       labels=["model", "architecture", "dtype", "device"])
            family.add_metric([info.name, info.architecture, info.dtype, info.device], 1.0)
            yield family


class ApiMetrics:
    """All metrics of one app. Also the EngineObserver passed to build_engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # tenant: a configured tenant, "default" (no --api-keys), "admin" or "unauthenticated";
        # bounded by the keys file. Never an adapter id (unbounded).
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint, status and "
                                "tenant.", ["endpoint", "method", "status", "tenant"], registry=r)
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds", "HTTP request duration (streams: to the end).",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        # Per tenant, so a tenant starved by another's flood shows in its own TTFT.
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Submit to first generated token, by tenant.", ["tenant"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._queue_wait = Histogram(PREFIX + "queue_wait_seconds",
                                    "Submit to the request's batch starting, by tenant.",
                                    ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests.", ["tenant"], registry=r)
        self.virtual_tokens = Counter(PREFIX + "virtual_tokens", "Virtual (soft prompt) tokens "
                                      "of finished requests.", ["tenant"], registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "Completion tokens of "
                                        "finished requests.", ["tenant"], registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Requests per model batch.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_adapters = Histogram(PREFIX + "batch_distinct_adapters",
                                        "Distinct adapters per model batch.",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.batch_row_steps = Counter(
            PREFIX + "batch_row_steps", "Row-steps of model batches: kind=generated produced a "
            "token, kind=padding was spent on a row that had already finished (static "
            "batching runs every row to the batch's longest).", ["kind"], registry=r)
        self.cache_events = {
            CacheEvent.HIT: Counter(PREFIX + "prompt_cache_hits", "Prompt cache hits.",
                                    registry=r),
            CacheEvent.MISS: Counter(PREFIX + "prompt_cache_misses", "Prompt cache misses.",
                                     registry=r),
            CacheEvent.EVICTION: Counter(PREFIX + "prompt_cache_evictions",
                                         "Prompts evicted from the cache.", registry=r),
        }
        self.adapter_load = Histogram(PREFIX + "adapter_load_seconds",
                                      "Loading one adapter from the store onto the device.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_build = Histogram(
            PREFIX + "prompt_build_seconds", "Building one request's prompt embeddings from its "
            "adapter's resident rows and its text (--engine vllm only).",
            buckets=_BUILD_BUCKETS, registry=r)
        self.http_in_flight = 0  # changed on the event loop only, by EdgeMiddleware

    def bind_engine(self, engine: EngineClient) -> None:
        """Register the scrape-time collector; once, when the app gets its engine."""
        self.registry.register(EngineStatsCollector(engine, lambda: float(self.http_in_flight)))
        self.registry.register(VllmMetricsCollector())

    # ---- recorded by the HTTP layer -----------------------------------------------------------

    def observe_request(self, *, endpoint: str, method: str, status: int, seconds: float,
                        tenant: str = "unauthenticated") -> None:
        """`endpoint` is a route's path template or "unmatched", never the raw path."""
        self.requests.labels(endpoint=endpoint, method=method_label(method),
                             status=status_label(status), tenant=tenant).inc()
        self.request_duration.labels(endpoint=endpoint).observe(seconds)

    def observe_result(self, result: GenerationResult, *, tenant: str = "default") -> None:
        self.prompt_tokens.labels(tenant=tenant).inc(result.prompt_tokens)
        self.virtual_tokens.labels(tenant=tenant).inc(result.virtual_tokens)
        self.generated_tokens.labels(tenant=tenant).inc(result.completion_tokens)

    # ---- EngineObserver (called from engine threads; prometheus_client is thread-safe) -------

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        self.batch_size.observe(size)
        self.batch_adapters.observe(distinct_adapters)

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        self.batch_row_steps.labels(kind="generated").inc(generated_tokens)
        self.batch_row_steps.labels(kind="padding").inc(max(0, size * steps - generated_tokens))

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        self._queue_wait.labels(tenant=tenant).observe(seconds)

    def first_token(self, seconds: float, *, tenant: str) -> None:
        self.ttft.labels(tenant=tenant).observe(seconds)

    def cache_event(self, event: CacheEvent) -> None:
        self.cache_events[CacheEvent(event)].inc()

    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_load.observe(seconds)

    def prompt_built(self, seconds: float) -> None:
        self.prompt_build.observe(seconds)
