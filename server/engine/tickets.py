"""A request's handle between the asyncio side and the engine thread.

A Ticket carries the request through the scheduler; results reach asyncio only through the
loop's Mailbox (call_soon_threadsafe, once per burst), to a Future (generate) or a Queue
(streams). TokenStream is what
open_stream returns: closing it (or dropping it) aborts the request even if it was never
iterated, which a plain async generator cannot do (its finally never runs if it never started).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from server.engine.interface import GenerationRequest, GenerationResult, TokenChunk
from server.engine.mailbox import mailbox_for
from server.engine.prompt_layout import Layout, anchor_tokens
from server.engine.prompt_table import TableEntry


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
        self.future: asyncio.Future | None = None if stream else loop.create_future()
        self.queue: asyncio.Queue | None = asyncio.Queue() if stream else None

    @property
    def namespace(self) -> str:
        return self.request.namespace

    def is_aborted(self) -> bool:
        return self.state is TicketState.DONE

    def deliver(self, item: GenerationResult | TokenChunk | Failure | None) -> None:
        """From any thread: hand `item` to the asyncio side (None: cancelled)."""
        self._mailbox.post(self._deliver_on_loop, item)

    def _deliver_on_loop(self, item: GenerationResult | TokenChunk | Failure | None) -> None:
        if self.queue is not None:
            self.queue.put_nowait(Failure(asyncio.CancelledError()) if item is None else item)
        elif self.future is not None and not self.future.done():
            if item is None:
                self.future.cancel()
            elif isinstance(item, Failure):
                self.future.set_exception(item.error)
            elif isinstance(item, GenerationResult):
                self.future.set_result(item)



class QueueStream:
    """Async iterator over a queue a producer fills with a stream's items; aclose() (or
    dropping it) aborts. Subclasses say what an item means (`_unpack`)."""

    def __init__(self, queue: asyncio.Queue, abort: Callable[[], None]) -> None:
        self._queue = queue
        self._abort = abort
        self._done = False

    def __aiter__(self) -> QueueStream:
        return self

    async def __anext__(self) -> TokenChunk | GenerationResult:
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

    def _unpack(self, item: object) -> tuple[TokenChunk | GenerationResult, bool]:
        """The item as a stream value and whether it is the last; raise what it says."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort()  # no-op when it already finished

    def __del__(self) -> None:  # dropped without aclose (e.g. `break` out of async for)
        with contextlib.suppress(Exception):
            self._close()


class TokenStream(QueueStream):
    """A ticket's stream: TokenChunk..., then one GenerationResult; aclose() aborts."""

    def __init__(self, ticket: Ticket, abort: Callable[[Ticket], None]) -> None:
        assert ticket.queue is not None
        super().__init__(ticket.queue, lambda: abort(ticket))
        self.request_id = ticket.request.request_id

    def _unpack(self, item: object) -> tuple[TokenChunk | GenerationResult, bool]:
        if isinstance(item, Failure):
            raise item.error
        assert isinstance(item, TokenChunk | GenerationResult)
        return item, isinstance(item, GenerationResult)
