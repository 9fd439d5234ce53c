"""What the engine's frontend asks of a core, whichever runs the model.

The frontend (server.engine.engine: validation, adapters, templates, the output processor)
is written once. Behind it a core takes a validated request and hands back its deltas of
token ids (server.engine.rows.RowDelta); the frontend turns them into text, stop
strings, logprobs and usage, so answers read the same on every core.

Two cores implement this: the built-in one (BuiltinCore below: the scheduler thread, the
prompt table and the step loops) and vLLM's (server.engine.vllm). A core also holds the
resident soft prompts, which uploads, deletes and the store refresher invalidate.
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.engine.interface import EngineProgress, GenerationRequest
from server.engine.output_processor import DeltaSource
from server.engine.prompt_layout import Layout
from server.engine.prompt_table import PromptTable
from server.engine.scheduler import Scheduler
from server.engine.tickets import DeltaStream

# The gauges before a core exists (the model is loading).
IDLE_STATS = {"queue_depth": 0.0, "in_flight": 0.0, "parked": 0.0,
              "cache_resident_adapters": 0.0, "cache_resident_bytes": 0.0, "cache_bytes": 0.0,
              "cache_hits": 0.0, "cache_misses": 0.0, "cache_evictions": 0.0}


class Submission(DeltaSource, Protocol):
    """A submitted request's deltas, with the counts its usage reports."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def virtual_tokens(self) -> int: ...


class CoreClient(Protocol):
    name: str  # what the log and /metrics call it: "core", "static", "vllm"
    prompt_capacity: int  # the most virtual tokens one request's adapter may have

    def start(self) -> None: ...

    def submit(self, request: GenerationRequest, *, version: str | None, virtual_tokens: int,
               stream: bool, layout: Layout | None) -> Submission:
        """On the event loop that consumes the deltas; raises QueueFullError,
        EngineNotReadyError, InvalidRequestError before anything runs."""
        ...

    def abort(self, request_id: str) -> None: ...

    def invalidate(self, namespace: str, adapter_id: str, *,
                   version: str | None = None) -> bool:
        """Forget a resident soft prompt (overwritten or deleted); True if it was resident."""
        ...

    def resident_versions(self) -> dict[tuple[str, str], str]: ...

    @property
    def alive(self) -> bool: ...

    def stalled(self, bound_s: float) -> bool:
        """Readiness: requests wait and the core has shown no progress for `bound_s`."""
        ...

    def progress(self) -> EngineProgress: ...

    def begin_drain(self) -> None:
        """The server takes no more requests: start what waits, without waiting for more."""
        ...

    def stop(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` s, then stop."""
        ...

    def stats(self) -> dict[str, float]: ...

    def tenant_counts(self) -> dict[str, dict[str, int]]: ...


class BuiltinCore:
    """The built-in engine as a core client: the scheduler thread over the prompt table."""

    def __init__(self, scheduler: Scheduler, table: PromptTable) -> None:
        self.scheduler = scheduler
        self.table = table
        self.name = "core" if scheduler.core is not None else "static"
        self.prompt_capacity = table.capacity

    def start(self) -> None:
        self.scheduler.start()

    def submit(self, request: GenerationRequest, *, version: str | None, virtual_tokens: int,
               stream: bool, layout: Layout | None) -> DeltaStream:
        ticket = self.scheduler.submit(request, version=version, virtual_tokens=virtual_tokens,
                                       stream=stream, layout=layout)
        return DeltaStream(ticket, self.scheduler.abort)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_id(request_id)

    def invalidate(self, namespace: str, adapter_id: str, *,
                   version: str | None = None) -> bool:
        return self.table.invalidate(namespace, adapter_id, version=version)

    def resident_versions(self) -> dict[tuple[str, str], str]:
        return self.table.resident_versions()

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def stalled(self, bound_s: float) -> bool:
        return self.scheduler.stalled(bound_s)

    def progress(self) -> EngineProgress:
        return self.scheduler.heartbeat.progress(self.scheduler.in_flight)

    def begin_drain(self) -> None:
        self.scheduler.begin_drain()

    def stop(self, timeout: float) -> None:
        self.scheduler.stop(timeout)

    def stats(self) -> dict[str, float]:
        return builtin_stats(self.scheduler, self.table)

    def tenant_counts(self) -> dict[str, dict[str, int]]:
        return self.scheduler.tenant_counts()


def builtin_stats(scheduler: Scheduler, table: PromptTable) -> dict[str, float]:
    """The scheduler's, the prompt table's and the step loop's gauges."""
    ts = table.stats()
    stats = {
        "queue_depth": float(scheduler.queue_depth),
        "in_flight": float(scheduler.in_flight),
        "parked": float(scheduler.parked),
        "cache_resident_adapters": float(ts.resident_adapters),
        "cache_resident_bytes": float(ts.resident_bytes),
        "cache_bytes": float(ts.resident_bytes),  # alias named in interface.py
        "cache_capacity_bytes": float(table.capacity_bytes),
        "cache_hits": float(ts.hits),
        "cache_misses": float(ts.misses),
        "cache_evictions": float(ts.evictions),
        # What the engine's process computes with (--torch-threads, or its automatic sizing).
        "torch_threads": float(torch.get_num_threads()),
    }
    core = scheduler.core
    if core is not None:
        graphs = core.decode_graphs
        stats |= {
            "kv_slots": float(core.max_rows),
            "kv_slots_free": float(core.free_rows),  # of kv_slots, never more
            "kv_cache_bytes": float(core.kv.nbytes),
            "graph_captured_buckets": float(graphs.captured if graphs else 0),
            "graph_eager_buckets": float(len(graphs.eager_buckets) if graphs else 0),
        }
        if core.prefixes is not None:
            ps = core.prefixes.stats()
            stats |= {
                "prefix_hits": float(ps.hits),
                "prefix_misses": float(ps.misses),
                "prefix_evictions": float(ps.evictions),
                "prefix_tokens_saved": float(ps.tokens_saved),
                "prefix_entries": float(ps.entries),
                "prefix_capacity_tokens": float(ps.capacity_tokens),
                "prefix_used_tokens": float(ps.used_tokens),
            }
    return stats
