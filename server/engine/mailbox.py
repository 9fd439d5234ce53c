"""Hand-over from the engine thread to an event loop: one wake-up per burst, not per item.

loop.call_soon_threadsafe writes a byte to the loop's self-pipe on every call, a system call
made on the engine thread while it holds the GIL. The engine delivers one item per finished row
and, for streams, one per row per decode step, so with a full batch of streams that is dozens of
writes between two steps (5% of the engine thread's samples in the fairness benchmark, with no
streams at all). A Mailbox queues what is posted and wakes the loop only when the queue was
empty; the loop then runs everything queued so far in posting order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

_boxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary())
_boxes_lock = threading.Lock()


class Mailbox:
    """Callbacks posted from any thread, run on `loop` in posting order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: mailbox_for's table maps the loop to this object, which must not keep it alive.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[Any], None], Any]] = []
        self.wakeups = 0  # times the loop was woken: what this class saves, for tests

    def post(self, callback: Callable[[Any], None], item: Any) -> None:
        """Run callback(item) on the loop soon; a no-op once the loop is closed."""
        with self._lock:
            self._items.append((callback, item))
            if len(self._items) > 1:
                return  # a wake-up is already on its way and will take this too
            self.wakeups += 1
        loop = self._loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed loop: nobody is listening any more
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for callback, item in items:
            try:
                callback(item)
            except Exception as e:  # noqa: BLE001 - one bad callback must not drop the rest
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "mailbox callback failed", "exception": e})


def mailbox_for(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's one Mailbox (created on first use, gone with the loop)."""
    with _boxes_lock:
        box = _boxes.get(loop)
        if box is None:
            _boxes[loop] = box = Mailbox(loop)
        return box
