"""What a request or call of the HTTP process waits on while the engine process (server.
engine.remote) works on it: where the pipe's reader thread delivers its messages, and, for a
request, the stream of its deltas of token ids that the frontend reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.engine import wire
from server.engine.mailbox import mailbox_for
from server.engine.rows import RowDelta
from server.engine.tickets import QueueStream


@dataclass
class Pending:
    """A request or call waiting on the engine process: where its messages go."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # adapter calls
    queue: asyncio.Queue | None = None  # requests (generate and streams): every message
    request_id: str | None = None  # requests: what abort(request_id) names

    def deliver(self, item: Any) -> None:
        """From the reader thread: `item` (a message dict or an exception) onto the loop. A
        delta's RowDelta (thousands of TokenLogprobs for a prompt's logprobs) is built here,
        so the loop only queues ready objects."""
        if isinstance(item, dict) and item.get("op") == "delta":
            try:
                item = {**item, "delta": wire.delta_from_wire(item["delta"])}
            except Exception as e:  # noqa: BLE001 - this request fails, not the whole pipe
                item = e
        mailbox_for(self.loop).post(self._on_loop, item)

    def _on_loop(self, item: Any) -> None:
        if self.queue is not None:
            self.queue.put_nowait(item)
            return
        assert self.future is not None
        if self.future.done():
            return
        if isinstance(item, BaseException):
            self.future.set_exception(item)
        elif item.get("op") == "cancelled":
            self.future.cancel()
        elif "error" in item:  # an "error", or a "reply" carrying one
            self.future.set_exception(wire.error_from_wire(item["error"]))
        else:
            self.future.set_result(item)


class RemoteDeltas(QueueStream):
    """A request's deltas of token ids from the engine process, for this process's frontend
    (server.engine.output_processor); close() aborts. Its queue holds the engine process's
    messages for the request, in order."""

    def __init__(self, queue: asyncio.Queue, abort: Callable[[], None]) -> None:
        super().__init__(queue, abort)
        self.prompt_tokens = self.virtual_tokens = 0  # from the engine's acceptance

    async def accepted(self) -> None:
        """Wait for the engine to take the request; raise why it did not."""
        item = await self._get()
        if not (isinstance(item, dict) and item["op"] == "accepted"):
            self._done = True
            self._unpack(item)  # raises: nothing but an error can come before "accepted"
            raise AssertionError(f"engine pipe: {item!r} before the request was accepted")
        self.prompt_tokens = int(item["prompt_tokens"])
        self.virtual_tokens = int(item["virtual_tokens"])

    def _unpack(self, item: object) -> tuple[RowDelta, bool]:
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, dict)
        op = item["op"]
        if op == "delta":  # decoded by Pending.deliver, off the loop
            delta: RowDelta = item["delta"]
            return delta, delta.finish_reason is not None
        if op == "error":
            raise wire.error_from_wire(item["error"])
        raise asyncio.CancelledError()  # "cancelled": aborted by the engine (drain deadline)
