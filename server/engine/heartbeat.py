"""The readiness rule for a wedged engine: work waits on a loop that has shown no progress for
longer than a bound (--engine-stall-timeout-s).

A loop beats when it makes progress: the engine thread after each step (server.engine.
scheduler), the HTTP process whenever a message arrives from the engine process (server.
engine.remote; that process's event loop reports four times a second). Nothing waiting is
never a stall, and neither is a loop resting until it has work: the clock starts when work
begins to wait, not at the last step before an idle hour. A single long step (a large prefill
on a slow CPU) is a stall only once it outlasts the bound, so the bound must exceed the
longest step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.engine.interface import EngineProgress

log = logging.getLogger(__name__)


class Heartbeat:
    """When a loop last showed progress. `clock`: seconds, monotonic (tests drive it by hand).
    Beats and reads may come from different threads: each is one attribute write or read."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # what the log calls the loop: "the engine thread", ...
        self._clock = clock
        self._last = clock()
        self._resting = False
        self._stalled = False  # as of the last check, to log changes once

    def beat(self) -> None:
        """Progress: a step taken, a message received. Also what a loop with no work calls
        when work arrives, since nothing before that can be late."""
        self._last = self._clock()

    def rest(self) -> None:
        """The loop waits for work it does not have yet (requests may wait meanwhile on
        something else, such as their adapter's load): no stall, however long."""
        self._resting = True

    def wake(self) -> None:
        """The loop has something to do again: progress is measured from now."""
        self.beat()
        self._resting = False

    def progress(self, waiting: int) -> EngineProgress:
        """`waiting`: requests queued or running on the loop."""
        if waiting <= 0 or self._resting:
            return EngineProgress(waiting=max(waiting, 0), stalled_s=0.0)
        return EngineProgress(waiting=waiting, stalled_s=max(0.0, self._clock() - self._last))

    def stalled(self, waiting: int, bound_s: float) -> bool:
        """The rule (EngineProgress.stalled), with the change logged when it flips."""
        progress = self.progress(waiting)
        stalled = progress.stalled(bound_s)
        if stalled != self._stalled:
            self._stalled = stalled
            if stalled:
                log.error("%s has shown no progress for %.1f s while %d request(s) wait "
                          "(--engine-stall-timeout-s %g): not ready", self.name,
                          progress.stalled_s, progress.waiting, bound_s)
            else:
                log.warning("%s is making progress again", self.name)
        return stalled
