"""What the engine runs once its model is loaded: the prompt table, the step loop's core and
the scheduler, chosen and wired here; and the gauges they report.

The engine core runs decoder-only models whose attention goes through transformers' attention
interface; seq2seq models, BLOOM (ALiBi) and `--batching static` run static batching. The log
says which loop runs and why. Both loops read soft prompts from the same prompt table.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace

import torch

from adapters_store.store import AdapterStore
from server.config import Batching, Settings
from server.engine.core.engine_core import EngineCore
from server.engine.core.kv_budget import KVBudgetError
from server.engine.core.loop import build_core
from server.engine.fairness import BatchPolicy
from server.engine.model_loader import LoadedModel
from server.engine.observer import EngineObserver
from server.engine.prompt_layout import Layouts
from server.engine.prompt_table import PromptTable, table_for
from server.engine.scheduler import Scheduler
from server.engine.tickets import Ticket
from server.engine.token_bounds import TokenBounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedModel
    table: PromptTable
    scheduler: Scheduler
    layouts: Layouts  # templated adapters' layouts, parsed once per template
    bounds: TokenBounds  # which ids a request's text and anchors may hold

    @property
    def batching(self) -> Batching:
        return Batching.CORE if self.scheduler.core is not None else Batching.STATIC


def build_runtime(settings: Settings, loaded: LoadedModel, store: AdapterStore, *,
                  observer: EngineObserver, policy: BatchPolicy) -> Runtime:
    """The table (installed in the model), the core where the model allows it, and a
    scheduler over them; the scheduler's thread is not started yet."""
    table = table_for(loaded.model, budget_bytes=settings.prompt_cache_bytes,
                      min_rows=settings.max_virtual_tokens, dtype=loaded.dtype,
                      device=loaded.device, observer=observer)
    # The prefix cache can use a prefix for every row of the prompt table; it needs at least
    # one per row of a full batch, each of a distinct adapter at the largest size.
    prefix_tokens = 0
    if settings.prefix_cache:
        prefix_tokens = min(table.capacity, settings.max_batch_size * settings.max_virtual_tokens)
    core = _core(settings, loaded, prefix_tokens, prefix_most=table.capacity)
    if core is not None and core.kv.max_len < loaded.info.max_context:
        # A row cannot use more than its slot holds: requests beyond it are refused at submit.
        loaded = replace(loaded, info=replace(loaded.info, max_context=core.kv.max_len))
    scheduler = Scheduler(
        loaded, store=store, table=table, observer=observer,
        max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue, policy=policy, core=core)
    return Runtime(loaded, table, scheduler, Layouts(loaded.tokenizer),
                   _token_bounds(loaded))


def _token_bounds(loaded: LoadedModel) -> TokenBounds:
    bounds = TokenBounds(loaded.tokenizer, loaded.vocab_size)
    extra = bounds.unembeddable_tokens()
    if extra:
        shown = ", ".join(repr(t) for t in extra[:8]) + (", ..." if len(extra) > 8 else "")
        log.warning("the tokenizer knows %s token(s) the model's input embedding has no row "
                    "for (ids %s to %s: %s); text, chats and template anchors holding them "
                    "are refused with 400 unembeddable_token", len(extra), loaded.vocab_size,
                    bounds.tokenizer_size - 1, shown)
    return bounds


def _core(settings: Settings, loaded: LoadedModel,
          prefix_tokens: int, prefix_most: int) -> EngineCore[Ticket] | None:
    """The engine core where the model allows it, else None (static batching)."""
    if settings.batching is Batching.STATIC:
        log.info("batching: static (--batching static)")
        return None
    if getattr(loaded.model.config, "is_encoder_decoder", False):
        log.info("batching: static (seq2seq models run static batching)")
        return None
    try:
        core = build_core(loaded, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens,
                          kv_cache_memory=settings.kv_cache_memory,
                          prefix_tokens=prefix_tokens, prefix_most=prefix_most,
                          fit_length=settings.max_model_len == 0,
                          cuda_graphs=settings.cuda_graphs)
    except KVBudgetError:
        raise  # the operator's budget is wrong: say so, do not serve another way
    except Exception as e:  # noqa: BLE001 - static batching still serves this model
        # Text, not the exception: a handler that keeps records would keep its traceback,
        # and with it the core.
        log.warning("batching: static, this model cannot run the engine core (%s: %s)",
                    type(e).__name__, str(e))
        core = None
    if core is None:  # out of the except block, where its traceback still held the core
        _free_device_memory(loaded.device)
        return None
    log.info("batching: core (%d KV slots of %d positions, %d MiB; --max-batch-tokens %d)",
             core.kv.slots, core.kv.max_len, core.kv.nbytes >> 20, settings.max_batch_tokens)
    if core.prefixes is not None:
        log.info("prefix cache: %d tokens of soft prompts' keys and values, %d MiB",
                 core.prefixes.capacity, core.prefixes.nbytes >> 20)
    elif not settings.prefix_cache:
        log.info("prefix cache: off (--no-prefix-cache)")
    return core


def _free_device_memory(device: torch.device) -> None:
    """The core given up holds reference cycles (its decode graphs call back into it): collect
    it now, and hand its KV cache's memory back, rather than keep most of a GPU until the
    cycle collector gets to it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runtime_stats(runtime: Runtime | None) -> dict[str, float]:
    """The scheduler's, the prompt table's and the core's gauges; zeros before the load."""
    if runtime is None:
        return {"queue_depth": 0.0, "in_flight": 0.0, "parked": 0.0,
                "cache_resident_adapters": 0.0, "cache_resident_bytes": 0.0,
                "cache_bytes": 0.0, "cache_hits": 0.0, "cache_misses": 0.0,
                "cache_evictions": 0.0}
    scheduler, ts = runtime.scheduler, runtime.table.stats()
    stats = {
        "queue_depth": float(scheduler.queue_depth),
        "in_flight": float(scheduler.in_flight),
        "parked": float(scheduler.parked),
        "cache_resident_adapters": float(ts.resident_adapters),
        "cache_resident_bytes": float(ts.resident_bytes),
        "cache_bytes": float(ts.resident_bytes),  # alias named in interface.py
        "cache_capacity_bytes": float(runtime.table.capacity_bytes),
        "cache_hits": float(ts.hits),
        "cache_misses": float(ts.misses),
        "cache_evictions": float(ts.evictions),
    }
    core = scheduler.core
    if core is not None:
        graphs = core.decode_graphs
        stats |= {
            "kv_slots": float(core.max_rows),
            "kv_slots_free": float(core.kv.free_slots),
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
