"""A request's handle between the asyncio side and the engine thread.

A Ticket carries the request through the scheduler. What the engine hands out for it reaches
asyncio only through the loop's Mailbox (call_soon_threadsafe, once per burst): each step's
deltas of all rows in one post, then the request's end (a failure, or None when it was
aborted), onto the ticket's queue. DeltaStream reads that queue for the frontend
(server.engine.output_processor), which makes text, chunks and the result of the deltas.
Closing the stream (or dropping it) aborts the request even if it was never iterated, which a
plain async generator cannot do (its finally never runs if it never started).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from server.engine.interface import GenerationRequest
from server.engine.mailbox import Mailbox, mailbox_for
from server.engine.prompt_layout import Layout, anchor_tokens
from server.engine.prompt_table import TableEntry
from server.engine.rows import RowDelta, is_live


class TicketState(StrEnum):
    QUEUED = "queued"  # waiting for its adapter or for a batch
    RUNNING = "running"  # in the batch on the model now
    DONE = "done"  # delivered, failed or aborted: nobody waits on the engine for it any more


@dataclass(frozen=True)
class Failure:
    """Put on a stream's queue instead of a result: the consumer raises `error`."""

    error: BaseException


class Ticket:
    """One submitted request's life in the engine; state changes under the scheduler's lock."""

    def __init__(self, request: GenerationRequest, *, seq: int, version: str | None,
                 virtual_tokens: int, loop: asyncio.AbstractEventLoop, stream: bool,
                 layout: Layout | None = None) -> None:
        self.request = request
        self.seq = seq  # submission order, what FIFO means
        self.version = version  # of the adapter record seen at submit; None: bare model
        self.virtual_tokens = virtual_tokens
        self.layout = layout  # a templated adapter's; None: the rows before the text
        self.anchor_tokens = 0 if layout is None else anchor_tokens(layout)
        self.loop = loop
        self._mailbox = mailbox_for(loop)
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when it joined the running rows
        self.state = TicketState.QUEUED
        # Once its adapter is resolved: the prompt table's entry (unpinned while queued), or,
        # when the table had no room at load time, the rows on the host ([n, hidden]).
        self.entry: TableEntry | None = None
        self.embeds: torch.Tensor | None = None
        self.stream = stream
        self.queue: asyncio.Queue = asyncio.Queue()  # RowDelta..., or Failure / None at the end

    @property
    def live(self) -> bool:
        return is_live(self.stream, self.request.params)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's text and template anchor tokens, for usage."""
        return len(self.request.prompt_ids) + self.anchor_tokens

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    @property
    def namespace(self) -> str:
        return self.request.namespace

    def is_aborted(self) -> bool:
        return self.state is TicketState.DONE

    def deliver(self, item: Failure | None) -> None:
        """From any thread: end the request on the asyncio side (None: cancelled)."""
        self._mailbox.post(self.queue.put_nowait, item)


def deliver_deltas(items: Sequence[tuple[Ticket, RowDelta]]) -> None:
    """On the loop: a step's deltas onto their tickets' queues (one mailbox post per step)."""
    for ticket, delta in items:
        ticket.queue.put_nowait(delta)


class QueueStream:
    """Async iterator over a queue a producer fills with a stream's items; aclose() (or
    dropping it) aborts. Subclasses say what an item means (`_unpack`)."""

    def __init__(self, queue: asyncio.Queue, abort: Callable[[], None]) -> None:
        self._queue = queue
        self._abort = abort
        self._done = False

    def __aiter__(self) -> QueueStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        item = await self._get()
        try:
            value, last = self._unpack(item)
        except BaseException:
            self._done = True
            raise
        self._done = last
        return value

    async def _get(self) -> object:
        try:
            return await self._queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._close()
            raise

    def _unpack(self, item: object) -> tuple[Any, bool]:
        """The item as a stream value and whether it is the last; raise what it says."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self._close()

    def close(self) -> None:
        """Abort, unless the last item has come."""
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort()  # no-op when it already finished

    def __del__(self) -> None:  # dropped without aclose (e.g. `break` out of async for)
        with contextlib.suppress(Exception):
            self._close()


class RowDeltaStream(QueueStream):
    """A request's deltas, up to the one that finishes its row: a Failure raises its error,
    None (aborted) raises CancelledError."""

    def _unpack(self, item: object) -> tuple[RowDelta, bool]:
        if isinstance(item, Failure):
            raise item.error
        if item is None:
            raise asyncio.CancelledError()
        assert isinstance(item, RowDelta)
        return item, item.finish_reason is not None


class DeltaStream(RowDeltaStream):
    """A ticket's deltas; close() aborts."""

    def __init__(self, ticket: Ticket, abort: Callable[[Ticket], None]) -> None:
        super().__init__(ticket.queue, lambda: abort(ticket))
        self.ticket = ticket

    @property
    def prompt_tokens(self) -> int:
        return self.ticket.prompt_tokens

    @property
    def virtual_tokens(self) -> int:
        return self.ticket.virtual_tokens
