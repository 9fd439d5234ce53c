"""A uvicorn Server that drains on SIGTERM before it stops listening.

Uvicorn's own handler closes the listener at once and re-raises the signal afterwards (so the
process dies by SIGTERM, not exit 0). Here the first SIGTERM/SIGINT only flips
`app.state.draining`: /readyz answers 503 and new work is refused (server.api.drain), while
requests already running — streams included — go on. When none is left, or when
`drain_timeout_s` has passed, the normal shutdown runs (lifespan closes the engine). A second
SIGINT forces an immediate exit, as in plain uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("softprompt.drain")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, app: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self.drain_expired = False  # True when work was still running at the deadline
        self._engine_told = False  # the engine knows no more requests will come

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes of the event loop: only set flags here.
        if self._drain_deadline is not None or self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._app.state.draining = True
        self._drain_deadline = time.monotonic() + self._drain_timeout_s

    def _busy(self) -> int:
        """Requests still being served: HTTP responses open (streams) plus engine rows."""
        metrics = getattr(self._app.state, "metrics", None)
        http = max(0, getattr(metrics, "http_in_flight", 0))
        engine = self._app.state.engine
        stats = getattr(engine, "stats", None)
        rows = int(stats()["in_flight"]) if stats is not None else 0
        return max(http, rows)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._drain_deadline is None:
            return False
        if not self._engine_told:
            self._engine_told = True
            begin_drain = getattr(self._app.state.engine, "begin_drain", None)
            if begin_drain is not None:
                begin_drain()
        if counter % 10 == 0:
            log.info("draining: %d request(s) in flight", self._busy())
        if self._busy() == 0:
            log.info("drained; shutting down")
            return True
        if time.monotonic() >= self._drain_deadline:
            self.drain_expired = True
            self._app.state.drain_expired = True
            log.warning("drain timeout (%.1f s) reached with %d request(s) in flight; "
                        "aborting them", self._drain_timeout_s, self._busy())
            # Stop the engine now: the rows still queued or running fail with 503 instead of
            # finishing inside uvicorn's own shutdown grace, so the deadline really is one.
            shutdown = getattr(self._app.state.engine, "shutdown", None)
            if shutdown is not None:
                await asyncio.to_thread(shutdown, 0.0)
            return True
        return False
