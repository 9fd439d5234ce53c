"""What the engine thread's loops (the core loop, static batching) and their prompt pins need
from the scheduler that starts them.

The scheduler plans and delivers; a loop runs the plan on the model. The loops depend on this
narrow surface, not on the scheduler's module, so the engine's imports run one way:
scheduler -> loops -> this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.model_loader import LoadedModel
from server.engine.observer import EngineObserver
from server.engine.rows import BatchRow, RowOutput
from server.engine.tickets import Ticket


@dataclass(frozen=True)
class Plan:
    """What the engine thread does before its next step."""

    park: list[Ticket]  # running rows to take out of the steps (fair preemption)
    resume: list[Ticket]  # preempted rows to put back
    admit: list[Ticket]  # queued requests to start


class LoopHost(Protocol):
    """The scheduler, as the loop it started sees it."""

    loaded: LoadedModel
    observer: EngineObserver
    parked: int  # preempted rows the loop holds, for the engine's stats

    def next_plan(self, running: Sequence[Ticket] = (),
                  parked: Sequence[Ticket] = ()) -> Plan | None: ...

    def row(self, ticket: Ticket, ids: Sequence[int]) -> BatchRow: ...

    def observe_batch_start(self, tickets: Sequence[Ticket], joining: Sequence[Ticket],
                            now: float) -> None: ...

    def flush_outputs(self) -> None: ...

    def note_batch_time(self, seconds: float, *, weight: float) -> None: ...

    def end_aborted(self, ticket: Ticket, out: RowOutput) -> None: ...

    def fail_batch(self, tickets: Sequence[Ticket], error: Exception) -> None: ...

    def fail(self, ticket: Ticket, error: BaseException) -> None: ...

    def requeue(self, ticket: Ticket, *, reload: bool) -> None: ...
