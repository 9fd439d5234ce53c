"""A bound on uploads parsed at once: parsing holds an adapter's tensors in memory (and a
P-tuning collapse runs its encoder), so a burst of uploads must queue for a turn rather than
all run together. Loop-agnostic (the engine serves one event loop in process and another in
its own process), so it polls instead of holding an asyncio primitive."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.engine.errors import QueueFullError

_POLL_S = 0.02


class UploadSlots:
    def __init__(self, slots: int, *, wait_s: float = 30.0) -> None:
        self._free = slots
        self._slots = slots
        self._wait_s = wait_s
        self._lock = threading.Lock()

    def _take(self) -> bool:
        with self._lock:
            if self._free == 0:
                return False
            self._free -= 1
            return True

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one slot for the body; QueueFullError (429) after waiting wait_s for one."""
        deadline = time.monotonic() + self._wait_s
        while not self._take():
            if time.monotonic() >= deadline:
                raise QueueFullError(
                    f"{self._slots} uploads are being parsed (--max-concurrent-uploads) and "
                    f"none finished within {self._wait_s:g} s; retry later", retry_after_s=5.0)
            await asyncio.sleep(_POLL_S)
        try:
            yield
        finally:
            with self._lock:
                self._free += 1
