"""What the engine runs once its model is loaded: the engine --engine picks (server.engine.
engine_choice), and for the built-in one the prompt table, the step loop's core and the
scheduler, chosen and wired here.

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
from server.config import Batching, EngineKind, Settings
from server.engine.core.engine_core import EngineCore
from server.engine.core.kv_budget import KVBudgetError
from server.engine.core.loop import build_core
from server.engine.core_client import BuiltinCore, CoreClient
from server.engine.engine_choice import choose_engine
from server.engine.fairness import BatchPolicy
from server.engine.model_loader import LoadedModel, load_model
from server.engine.observer import EngineObserver
from server.engine.prompt_layout import Layouts
from server.engine.prompt_table import table_for
from server.engine.scheduler import Scheduler
from server.engine.tickets import Ticket
from server.engine.token_bounds import TokenBounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedModel
    core: CoreClient  # what runs the requests (server.engine.core_client)
    layouts: Layouts  # templated adapters' layouts, parsed once per template
    bounds: TokenBounds  # which ids a request's text and anchors may hold

    @property
    def batching(self) -> str:
        return self.core.name


def build_runtime(settings: Settings, store: AdapterStore, *, observer: EngineObserver,
                  policy: BatchPolicy) -> Runtime:
    """Load the model and wire the core that --engine picks; nothing runs yet (start() the
    core)."""
    if choose_engine(settings) is EngineKind.VLLM:
        from server.engine.vllm.runtime import build_vllm_core

        loaded, core = build_vllm_core(settings, store, observer=observer,
                                       weight_of=getattr(policy, "weight_of", lambda _t: 1.0))
    else:
        loaded = load_model(settings)
        loaded, core = _builtin(settings, loaded, store, observer=observer, policy=policy)
    return Runtime(loaded, core, Layouts(loaded.tokenizer), _token_bounds(loaded))


def _builtin(settings: Settings, loaded: LoadedModel, store: AdapterStore, *,
             observer: EngineObserver, policy: BatchPolicy) -> tuple[LoadedModel, BuiltinCore]:
    """The table (installed in the model), the engine core where the model allows it, and a
    scheduler over them."""
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
    return loaded, BuiltinCore(scheduler, table)


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
