"""The engine thread's loop over an EngineCore (`--batching core`).

Between two steps the scheduler's policy decides which queued requests join, which running
rows make room for another tenant (preempted: their slots are freed and they are recomputed
when resumed, nothing is copied) and which preempted rows resume. A request of an adapter
runs as token ids: its soft prompt's rows are pinned in the prompt table for as long as the
request lives (server.engine.prompt_pins).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from server.engine.core.engine_core import CoreRow, EngineCore
from server.engine.core.kv_budget import kv_plan
from server.engine.core.kv_cache import SlotKVCache, cache_shape
from server.engine.core.prefix_cache import PrefixCache
from server.engine.interface import SamplingParams
from server.engine.loop_host import LoopHost
from server.engine.prompt_pins import PromptPins
from server.engine.prompt_table import PromptTable
from server.engine.rows import BatchRow, RowOutput
from server.engine.tickets import Ticket, TicketState

log = logging.getLogger(__name__)


class CoreLoop:
    """Owned by the engine thread."""

    def __init__(self, scheduler: LoopHost, core: EngineCore[Ticket], table: PromptTable) -> None:
        self._s = scheduler
        self._core = core
        self._pins = PromptPins(scheduler, table)
        self._parked: dict[int, CoreRow[Ticket]] = {}  # id(ticket) -> preempted row

    def run(self) -> None:
        s, core = self._s, self._core
        while True:
            self._forget_dead_parked()
            parked = [row.handle for row in self._parked.values()]
            plan = s.next_plan(core.handles, parked)
            if plan is None:
                break
            for row in core.preempt(plan.park):
                self._parked[id(row.handle)] = row
            core.resume([self._parked.pop(id(t)) for t in plan.resume if id(t) in self._parked])
            now = time.monotonic()
            left: list[tuple[Ticket, RowOutput]] = []
            joining, started = [], []
            for ticket in plan.admit:
                ids = self._pins.ids(ticket)
                if ids is None:
                    continue
                ticket.started_at = now
                started.append(ticket)
                out = core.add(ticket, s.row(ticket, ids), ids)
                if out is None:
                    joining.append(ticket)
                else:
                    left.append((ticket, out))
            s.observe_batch_start(core.handles, started, now)
            stepping = core.handles
            try:
                left += core.step()
            except Exception as e:  # noqa: BLE001 - the rows of this forward fail, nobody else
                core.drop(stepping)
                for ticket in stepping:
                    self._pins.release(ticket)
                s.fail_batch(stepping, e)
            finished = time.monotonic()
            for ticket, out in left:
                self._pins.release(ticket)
                run_s = finished - (ticket.started_at or finished)
                s.note_batch_time(run_s, weight=0.05)
                if out.aborted:  # a finished row ended its request with its last delta
                    s.end_aborted(ticket, out)
            s.flush_outputs()
            stats = core.last
            s.observer.batch_finished(size=stats.rows, steps=1,
                                      generated_tokens=stats.decodes + len(joining))
            s.parked = len(self._parked)
        # Stopped: stop() has failed whatever was still running or parked.

    def _forget_dead_parked(self) -> None:
        """Preempted rows whose request ended meanwhile (aborted, failed) are dropped."""
        for key, row in list(self._parked.items()):
            if row.handle.state is TicketState.DONE:
                del self._parked[key]
                self._pins.release(row.handle)


def build_core(loaded: Any, *, max_batch_size: int, max_batch_tokens: int,
               kv_cache_memory: str = "auto", prefix_tokens: int = 0,
               prefix_most: int | None = None, fit_length: bool = False,
               cuda_graphs: bool = True) -> EngineCore[Ticket]:
    """The core for a loaded decoder-only model whose input embedding already reads the prompt
    table: a KV cache of one slot per batch row, and a prefix cache in what the slots leave of
    the budget (`prefix_tokens` and `prefix_most` as in kv_plan; 0: none). `fit_length`: a
    slot may hold fewer positions than the model's context for every row to fit the budget
    (the core's `kv.max_len` says how many). Raises if the model cannot run it (the caller then runs
    another loop; the model's attention is restored first). `cuda_graphs`: False runs
    decode steps eagerly on CUDA too."""
    model = loaded.model
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("seq2seq models run static batching")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    length = min(loaded.info.max_context, _max_positions(model.config))
    # One slot more than rows: decode steps padded to a bucket (CUDA graphs) write into it.
    shape = cache_shape(model.config)
    token_bytes = shape.bytes_per_token(loaded.dtype)
    plan = kv_plan(kv_cache_memory, length=length, token_bytes=token_bytes,
                   rows=max_batch_size, prefix_tokens=prefix_tokens,
                   device=torch.device(loaded.device), fit_length=fit_length,
                   prefix_most=prefix_most if prefix_tokens > 0 else 0)
    cache = SlotKVCache(shape, slots=plan.slots, max_len=plan.length, dtype=loaded.dtype,
                        device=loaded.device)
    prefixes = None
    if plan.prefix_tokens > 0:
        prefixes = PrefixCache(shape, tokens=plan.prefix_tokens, dtype=loaded.dtype,
                               device=loaded.device)
    elif prefix_tokens > 0:
        log.warning("prefix cache: off, --kv-cache-memory %s leaves no room beside the KV "
                    "slots", kv_cache_memory)
    original = model.config._attn_implementation
    try:
        core: EngineCore[Ticket] = EngineCore(model, loaded.tokenizer, cache,
                                              max_batch_tokens=max_batch_tokens,
                                              max_rows=min(max_batch_size, plan.slots - 1),
                                              prefixes=prefixes,
                                              graphs=None if cuda_graphs else False)
        _probe(core, vocab)
        graphs = core.decode_graphs
        if graphs is not None and graphs.capture:
            started = time.monotonic()
            captured = graphs.capture_all()
            log.info("decode steps: %d CUDA graphs captured in %.1f s (%d buckets eager); "
                     "%d MiB reserved on the device in all", captured,
                     time.monotonic() - started, len(graphs.eager_buckets),
                     torch.cuda.memory_reserved(loaded.device) >> 20)
    except BaseException:
        model.set_attn_implementation(original)
        raise
    return core


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if (value := getattr(config, name, None)) is not None:
            return int(value)
    return 2048


def _probe(core: EngineCore[Any], vocab: int) -> None:
    """Two rows, a prefill and a decode step; raises if the model's attention does not go
    through the core's cache (the decode would not see the prefill)."""
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    free = core.kv.free_slots  # less than all: padded decode steps keep a scratch slot
    for handle, ids in enumerate(([0], [min(1, vocab - 1), 0])):
        core.add(handle, BatchRow(ids, None, params), ids)  # type: ignore[arg-type]
    while len(core):
        core.step()
    if core.kv.calls == 0:
        raise RuntimeError("the model's attention does not go through transformers' attention "
                           "interface")
    if core.kv.free_slots != free:
        raise RuntimeError("the engine core's probe left slots in use")
