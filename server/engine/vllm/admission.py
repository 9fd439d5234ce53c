"""Admission in front of vLLM: weighted fair shares across tenants, a bound on what is in it.

vLLM schedules what it is given first come, first served, so one tenant's burst would fill
its queue ahead of everyone. Requests therefore wait here, per tenant, and are released into
vLLM while fewer than `max_in_flight` are there (--max-batch-size: what vLLM runs at once); the
next to go is the waiting tenant with the fewest requests in flight per unit of weight (the
--api-keys weight), the earliest arrival breaking ties. So a tenant alone may fill every
place, and a second tenant's request takes the next free one. `max_queue` bounds the waiting
requests (429 beyond).

With a contended cap (--contended-tenant-rows), while another tenant has work (or had some
within the last second), a tenant is let in only while it has fewer than the cap (times its
weight) inside vLLM; alone, it may fill every place. On hardware where a step's cost grows
with its rows (a CPU), that keeps a light tenant's steps short beside a heavy tenant's
backlog, as the built-in engine's cap does.

Used on one event loop only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable

from server.engine.errors import EngineNotReadyError, QueueFullError
from server.engine.fairness import ContendedCap


class Admission:
    def __init__(self, *, max_in_flight: int, max_queue: int,
                 weight_of: Callable[[str], float], contended_rows: int | None = None,
                 active_window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self._weight_of = weight_of
        self._contended = ContendedCap(contended_rows, active_window_s=active_window_s,
                                       clock=clock)
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._running: dict[str, int] = {}
        self._seq = itertools.count()
        self.in_flight = 0
        self.closed = False

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def check(self) -> None:
        """Raise now what a request would meet: a full queue, or an engine shutting down."""
        if self.closed:
            raise EngineNotReadyError("the engine is shutting down")
        if self.queued >= self.max_queue:
            raise QueueFullError(f"{self.queued} requests are queued (--max-queue "
                                 f"{self.max_queue}); retry later", retry_after_s=1.0)

    async def acquire(self, tenant: str) -> None:
        """Wait for this tenant's turn; cancelled, the request gives up its place."""
        if (not self.closed and not self._waiting and self.in_flight < self.max_in_flight
                and self._under_cap(tenant, self._caps({tenant}))):
            self._take(tenant)
            return
        self.check()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._seq), future)
        self._waiting.setdefault(tenant, deque()).append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(tenant)  # released to us just as we were cancelled
            else:
                queue = self._waiting.get(tenant)
                if queue is not None and entry in queue:
                    queue.remove(entry)
                    if not queue:
                        del self._waiting[tenant]
            raise

    def release(self, tenant: str) -> None:
        """A request left vLLM (finished, failed or aborted): the next one may go."""
        self.in_flight -= 1
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]
        self._admit()

    def running(self) -> dict[str, int]:
        return dict(self._running)

    def waiting(self) -> dict[str, int]:
        return {t: len(q) for t, q in self._waiting.items()}

    def close(self) -> None:
        """Refuse new requests and fail the waiting ones (the engine is stopping)."""
        self.closed = True
        for queue in self._waiting.values():
            for _, future in queue:
                if not future.done():
                    future.set_exception(EngineNotReadyError("the engine shut down before "
                                                             "this request started"))
        self._waiting.clear()

    def _take(self, tenant: str) -> None:
        self.in_flight += 1
        self._running[tenant] = self._running.get(tenant, 0) + 1

    def _caps(self, present: set[str]) -> dict[str, int] | None:
        """Each active tenant's limit inside vLLM while another is active; None: no limit."""
        return self._contended.caps(present | set(self._waiting) | set(self._running),
                                    self._weight_of)

    def _under_cap(self, tenant: str, caps: dict[str, int] | None) -> bool:
        return caps is None or self._running.get(tenant, 0) < caps[tenant]

    def _admit(self) -> None:
        while self._waiting and self.in_flight < self.max_in_flight:
            caps = self._caps(set())
            open_to = [t for t in self._waiting if self._under_cap(t, caps)]
            if not open_to:  # every waiting tenant is at its cap: places stay free
                return
            tenant = min(open_to, key=lambda t: (
                self._running.get(t, 0) / max(self._weight_of(t), 1e-9),
                self._waiting[t][0][0]))
            queue = self._waiting[tenant]
            _, future = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if future.done():  # cancelled meanwhile
                continue
            self._take(tenant)
            future.set_result(None)
