"""The engine thread: owns the model, forms batches, runs them, hands results back to asyncio.

Requests whose adapter is resident (or that use the bare model) are *ready*; a request whose
adapter misses the prompt cache waits for its load (server.engine.adapter_loader), so a cold
adapter never holds up anyone else's batch. A `BatchPolicy` picks which ready requests run
next (fairly across tenants by default). The step loops are server.engine.core.loop and
server.engine.static_loop; this module plans what they run and delivers what they return.

The engine core (server.engine.core, the default for decoder-only models whose attention
goes through transformers' attention interface) runs one step at a time over every running
row: between two steps the policy decides who joins, who is preempted to make room for another
tenant and who resumes, and the core's token budget bounds each step's prefill. Static
batching (seq2seq models, BLOOM, or --batching static): the policy picks up to max_batch_size
and run_batch runs them to the longest row. Either way, an idle engine waits at most max_wait
after the oldest ready request arrived for batch mates.

Each step's output travels back through the loop's Mailbox as one batch of token-id deltas
(server.engine.rows), to each request's queue, where the frontend
(server.engine.output_processor) detokenizes them and looks for stop strings. The thread
never blocks on the event loop and vice versa.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

from adapters_store.store import AdapterStore
from server.engine.adapter_loader import AdapterLoader
from server.engine.core.loop import CoreLoop
from server.engine.errors import (
    EngineNotReadyError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)
from server.engine.fairness import BatchPolicy, RoundRobinPolicy
from server.engine.heartbeat import Heartbeat
from server.engine.interface import GenerationRequest
from server.engine.loop_host import Plan
from server.engine.model_loader import LoadedModel
from server.engine.observer import EngineObserver
from server.engine.prompt_layout import Layout, text_start
from server.engine.prompt_table import PromptTable
from server.engine.rows import BatchRow, InvalidRowError, RowDelta, RowOutput
from server.engine.static_loop import StaticLoop
from server.engine.tickets import Failure, Ticket, TicketState, deliver_deltas

log = logging.getLogger(__name__)


class Scheduler:
    """Thread-safe submit/abort; one engine thread and a small adapter-loader pool.

    `table`: the prompt table installed in the model (server.engine.prompt_table.table_for).
    `core`: the EngineCore from server.engine.core.loop.build_core, or None for static
    batching.
    """

    def __init__(self, loaded: LoadedModel, *, store: AdapterStore, table: PromptTable,
                 observer: EngineObserver, max_batch_size: int, max_wait_s: float,
                 max_queue: int, policy: BatchPolicy | None = None,
                 loader_threads: int = 2, core: Any = None) -> None:
        self.loaded = loaded
        self.observer = observer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._policy = policy or RoundRobinPolicy()  # fair across tenants
        self.table = table
        self.core = core  # EngineCore, or None: static batching
        self.parked = 0  # rows preempted by the fair policy, waiting to resume, for the gauge
        self._cond = threading.Condition()
        self._ready: list[Ticket] = []
        # Tickets made ready so far, and as of the last plan: a full batch with no new arrival
        # has nothing to decide, and the policy is not run over a long queue every step.
        self._arrivals = self._planned_arrivals = 0
        self._live: dict[str, Ticket] = {}  # request_id -> ticket, until DONE
        self._queued = 0  # tickets in state QUEUED
        self._seq = 0
        self._draining = False
        self._no_mates = False  # a drain began: nothing waits for batch mates any more
        self._stopped = False
        # Running mean of how long max_batch_size requests take to clear, for Retry-After:
        # a static batch's duration, or one request's time in the running batch.
        self._batch_seconds = 1.0
        self._outbox: list[tuple[Ticket, RowDelta]] = []  # this step's deltas (engine thread)
        # The engine thread beats after every step and rests while it waits for work.
        self.heartbeat = Heartbeat("the engine thread")
        self._adapters = AdapterLoader(
            store=store, table=table, observer=observer, lock=self._cond,
            make_ready=self._make_ready, fail=self.fail, threads=loader_threads)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- asyncio side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._draining

    def stalled(self, bound_s: float) -> bool:
        """Readiness: requests wait and the engine thread has taken no step for `bound_s`."""
        return self.heartbeat.stalled(len(self._live), bound_s)

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def tenant_counts(self) -> dict[str, dict[str, int]]:
        """{tenant: {"queued": n, "running": m}} over the requests in flight (thread-safe)."""
        counts: dict[str, dict[str, int]] = {}
        with self._cond:
            for ticket in self._live.values():
                if ticket.state is not TicketState.DONE:
                    by_state = counts.setdefault(ticket.namespace, {"queued": 0, "running": 0})
                    by_state[ticket.state.value] += 1
        return counts

    def submit(self, request: GenerationRequest, *, version: str | None, virtual_tokens: int,
               stream: bool, layout: Layout | None = None) -> Ticket:
        """Queue a validated request; must be called on the event loop that will consume it."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._draining or not self._thread.is_alive():
                raise EngineNotReadyError("the engine is shutting down")
            if self._queued >= self._max_queue:
                raise QueueFullError(
                    f"{self._queued} requests are queued (--max-queue {self._max_queue}); "
                    "retry later", retry_after_s=self._retry_after())
            if request.request_id in self._live:
                raise InvalidRequestError(
                    f"request id {request.request_id!r} is already in flight; ids must be unique")
            self._seq += 1
            ticket = Ticket(request, seq=self._seq, version=version,
                            virtual_tokens=virtual_tokens, loop=loop, stream=stream,
                            layout=layout)
            self._live[request.request_id] = ticket
            self._queued += 1
            if request.adapter_id is None:
                self._make_ready(ticket)
            else:
                self._adapters.resolve(ticket)
            self._cond.notify_all()
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Stop working on a request (no-op once done); a running row stops at its next step."""
        if self._finish(ticket):
            ticket.deliver(None)

    def abort_id(self, request_id: str) -> None:
        ticket = self._live.get(request_id)
        if ticket is not None:
            self.abort(ticket)

    def begin_drain(self) -> None:
        """The server stopped taking requests: what waits for batch mates starts now, since
        none will come (with a long --max-wait-ms the drain would otherwise wait it out)."""
        with self._cond:
            self._no_mates = True
            self._cond.notify_all()

    def stop(self, timeout: float) -> None:
        """Refuse new requests, let queued and running ones finish for up to `timeout` seconds,
        then fail what is left with EngineNotReadyError and stop the threads."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            self._stopped = True
            left = list(self._live.values())
            self._cond.notify_all()
        for ticket in left:
            self.fail(ticket, EngineNotReadyError("the engine shut down before this request "
                                                   "finished"))
        self._thread.join(5.0)
        self._adapters.shutdown()

    # ---- adapters ----------------------------------------------------------------------------

    def _make_ready(self, ticket: Ticket) -> None:
        """Under the lock."""
        self._ready.append(ticket)
        self._arrivals += 1

    def requeue(self, ticket: Ticket, *, reload: bool) -> None:
        """An admitted request that cannot start yet goes back to the queue, keeping its
        place. `reload`: its soft prompt left the prompt table while it waited (evicted), so it
        waits for its adapter's load again; else it is ready again at once (its rows wait on
        the host for room in the table, which running requests hold)."""
        with self._cond:
            if ticket.state is not TicketState.RUNNING:
                return
            ticket.state = TicketState.QUEUED
            self._queued += 1
            if reload:
                ticket.entry = None
                self._adapters.resolve(ticket)
            else:
                self._make_ready(ticket)
            self._cond.notify_all()

    # ---- the engine thread; the step loops (core.loop, static_loop) call what is public -------

    def _run(self) -> None:
        try:
            if self.core is not None:
                CoreLoop(self, self.core, self.table).run()
            else:
                StaticLoop(self, self.table).run()
        except BaseException as e:  # the thread must not die silently: fail everyone
            log.critical("engine thread crashed: %s: %s", type(e).__name__, e, exc_info=True)
            with self._cond:
                self._draining = True
                left = list(self._live.values())
            for ticket in left:
                self.fail(ticket, GenerationError(f"the engine thread crashed: "
                                                   f"{type(e).__name__}"))
            raise

    def next_plan(self, running: Sequence[Ticket] = (),
                   parked: Sequence[Ticket] = ()) -> Plan | None:
        """What to park, resume and admit before the next step; None when stopping and
        nothing is left to do.

        With no rows running or parked, blocks until a batch is due (max_batch_size ready, or
        max_wait after the oldest); otherwise never blocks (rows must keep decoding).
        """
        with self._cond:
            while True:
                self._ready = [t for t in self._ready if t.state is TicketState.QUEUED]
                busy = bool(running or parked)
                if self._stopped or (self._draining and self._queued == 0 and not busy):
                    return None
                if busy:
                    break
                if not self._ready:
                    self._rest(None)
                    continue
                if len(self._ready) >= self._max_batch_size or self._draining or self._no_mates:
                    break
                oldest = min(t.submitted_at for t in self._ready)
                wait = oldest + self._max_wait_s - time.monotonic()
                if wait <= 0:
                    break
                self._rest(wait)
            if len(running) >= self._max_batch_size and self._arrivals == self._planned_arrivals:
                return Plan([], [], [])
            self._planned_arrivals = self._arrivals
            waiting = [*self._ready, *(t for t in parked if t.state is TicketState.RUNNING)]
            park: list[Ticket] = []
            room = self._max_batch_size - len(parked)  # at most one batch waits to resume
            if waiting and room > 0:
                park = self._policy.preempt(running, waiting, self._max_batch_size)[:room]
            parking = {id(t) for t in park}
            staying = [t for t in running if id(t) not in parking]
            chosen = self._policy.select(waiting, self._max_batch_size - len(staying), staying)
            resume = [t for t in chosen if t.state is TicketState.RUNNING]  # parked rows
            admit = [t for t in chosen if t.state is TicketState.QUEUED]
            admitted = {id(t) for t in admit}
            self._ready = [t for t in self._ready if id(t) not in admitted]
            for ticket in admit:
                ticket.state = TicketState.RUNNING
            self._queued -= len(admit)
            return Plan(park, resume, admit)

    def _rest(self, timeout: float | None) -> None:
        """Under the lock: wait for work (or batch mates); not a stall, however long."""
        self.heartbeat.rest()
        try:
            self._cond.wait(timeout)
        finally:
            self.heartbeat.wake()

    def observe_batch_start(self, tickets: Sequence[Ticket], joining: Sequence[Ticket],
                             now: float) -> None:
        adapters = {(t.namespace, t.request.adapter_id) for t in tickets
                    if t.request.adapter_id is not None}
        self.observer.batch_started(size=len(tickets), distinct_adapters=len(adapters))
        for ticket in joining:
            self.observer.queue_wait(now - ticket.submitted_at, tenant=ticket.namespace)

    def fail_batch(self, tickets: Sequence[Ticket], error: Exception) -> None:
        """A model failure fails the rows that shared the failing call, and only them."""
        log.error("batch of %s requests failed: %s: %s", len(tickets), type(error).__name__,
                  error, exc_info=error)
        for ticket in tickets:
            self.fail(ticket, GenerationError(
                f"generation failed for the batch holding this request: "
                f"{type(error).__name__}: {error}"))

    def end_aborted(self, ticket: Ticket, out: RowOutput) -> None:
        """An aborted row ends quietly; a row that failed alone gets its own error."""
        if out.error is None:
            self.abort(ticket)
            return
        log.warning("request %s failed alone: %s: %s", ticket.request.request_id,
                    type(out.error).__name__, out.error)
        if isinstance(out.error, InvalidRowError):
            self.fail(ticket, InvalidRequestError(str(out.error)))
        else:
            self.fail(ticket, GenerationError(f"generation failed for this request: "
                                               f"{type(out.error).__name__}: {out.error}"))

    def row(self, ticket: Ticket, ids: Sequence[int]) -> BatchRow:
        """The ticket as a model row reading `ids` (virtual ids, then the text's)."""
        def on_first_token() -> None:
            self.observer.first_token(time.monotonic() - ticket.submitted_at,
                                       tenant=ticket.namespace)

        def on_delta(delta: RowDelta) -> None:
            if ticket.state is not TicketState.DONE:
                self._outbox.append((ticket, delta))
                if delta.finish_reason is not None:  # it ends here, at the step it finished,
                    self._finish(ticket)  # not with the rest of its static batch

        text = len(ticket.request.prompt_ids)
        start = len(ids) - text if ticket.layout is None else text_start(ticket.layout)
        return BatchRow(
            prompt_ids=ids, prompt_embeds=None, text_span=(start, start + text),
            params=ticket.request.params, on_delta=on_delta, live=ticket.live,
            is_aborted=ticket.is_aborted, on_first_token=on_first_token)

    def flush_outputs(self) -> None:
        """Hand the step's deltas to the frontend: one mailbox post per event loop, however
        many rows. The loops call it after every step: it is also the engine's heartbeat."""
        self.heartbeat.beat()
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_box: dict[int, tuple[Any, list[tuple[Ticket, RowDelta]]]] = {}
        for ticket, delta in items:
            box = ticket.mailbox
            by_box.setdefault(id(box), (box, []))[1].append((ticket, delta))
        for box, batch in by_box.values():
            box.post(deliver_deltas, batch)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _finish(self, ticket: Ticket) -> bool:
        """Mark DONE and drop from the gauges; False if it already was (deliver nothing)."""
        with self._cond:
            if ticket.state is TicketState.DONE:
                return False
            if ticket.state is TicketState.QUEUED:
                self._queued -= 1
            ticket.state = TicketState.DONE
            if self._live.get(ticket.request.request_id) is ticket:
                del self._live[ticket.request.request_id]
            self._cond.notify_all()
            return True

    def fail(self, ticket: Ticket, error: BaseException) -> None:
        if self._finish(ticket):
            ticket.deliver(Failure(error))

    def note_batch_time(self, seconds: float, *, weight: float) -> None:
        """A loop's measure of how long max_batch_size requests take to clear (a static
        batch's duration, or one request's time in the core's steps), for Retry-After."""
        self._batch_seconds = (1 - weight) * self._batch_seconds + weight * seconds

    def _retry_after(self) -> float:
        """Roughly how long until the queue has room: batches ahead times a batch's duration."""
        batches = math.ceil(self._queued / self._max_batch_size)
        return min(60.0, max(1.0, batches * self._batch_seconds))

