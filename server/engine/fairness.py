"""Fair batch selection across tenants: round-robin over namespaces.

With FIFO, a tenant that keeps hundreds of requests queued fills every batch and a tenant with a
few requests waits behind all of them. Round-robin takes one request per tenant in turn (each
tenant's own requests stay in submission order), so a small tenant's requests all land in the
next batch or two however deep another tenant's backlog is. Tenants are visited in the order of
their oldest ready request, which makes the policy stateless and still rotating: a tenant just
served has a newer head than one that was skipped.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Protocol, TypeVar


class _Queued(Protocol):
    seq: int

    @property
    def namespace(self) -> str: ...


T = TypeVar("T", bound=_Queued)


class RoundRobinPolicy:
    """One request per tenant per round until the batch is full."""

    def select(self, ready: Sequence[T], max_batch_size: int) -> list[T]:
        by_tenant: dict[str, list[T]] = defaultdict(list)
        for ticket in sorted(ready, key=lambda t: t.seq):
            by_tenant[ticket.namespace].append(ticket)
        rounds = deque(deque(queue) for queue in by_tenant.values())  # oldest head first
        picked: list[T] = []
        while rounds and len(picked) < max_batch_size:
            queue = rounds.popleft()
            picked.append(queue.popleft())
            if queue:
                rounds.append(queue)
        return picked
