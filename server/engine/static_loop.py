"""The engine thread's loop for static batching (`--batching static`, seq2seq models, and
decoder-only models the engine core cannot run).

The policy picks up to max_batch_size ready requests and one run_batch call runs them all to
the longest row; each step's deltas go to the frontend from inside that call, so a row that
finishes early is answered then.
"""

from __future__ import annotations

import time

from server.engine import generation
from server.engine.loop_host import LoopHost
from server.engine.prompt_pins import PromptPins
from server.engine.prompt_table import PromptTable
from server.engine.tickets import Ticket


class StaticLoop:
    """Owned by the engine thread."""

    def __init__(self, scheduler: LoopHost, table: PromptTable) -> None:
        self._s = scheduler
        self._pins = PromptPins(scheduler, table)

    def run(self) -> None:
        while (plan := self._s.next_plan()) is not None:
            batch = [(t, ids) for t in plan.admit if (ids := self._pins.ids(t)) is not None]
            try:
                if batch:
                    self._run_batch(batch)
            finally:
                for ticket, _ in batch:
                    self._pins.release(ticket)

    def _run_batch(self, admitted: list[tuple[Ticket, list[int]]]) -> None:
        s = self._s
        batch = [ticket for ticket, _ in admitted]
        started = time.monotonic()
        for ticket in batch:
            ticket.started_at = started
        s.observe_batch_start(batch, batch, started)
        rows = [s.row(ticket, ids) for ticket, ids in admitted]
        loaded = s.loaded
        try:
            outputs = generation.run_batch(loaded.model, loaded.tokenizer, rows,
                                           after_step=s.flush_outputs)
        except Exception as e:  # noqa: BLE001 - isolate the failure to this batch
            s.fail_batch(batch, e)
            return
        finally:
            s.flush_outputs()
            elapsed = time.monotonic() - started
            s.note_batch_time(elapsed, weight=0.2)
        # Every token computed counts, an aborted row's too (a stop string aborts its row).
        generated = [len(out.token_ids) for out in outputs]
        s.observer.batch_finished(size=len(batch), steps=max(generated, default=0),
                                   generated_tokens=sum(generated))
        for ticket, out in zip(batch, outputs, strict=True):
            if out.aborted:  # a finished row ended its request with its last delta
                s.end_aborted(ticket, out)
