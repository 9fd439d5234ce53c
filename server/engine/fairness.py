"""Batch policies: which requests run next. The default is fair across tenants: max-min fair
shares of the batch's slots (FifoPolicy, oldest first, is there to compare against).

With FIFO, a tenant that keeps hundreds of requests queued fills every batch and a tenant with a
few requests waits behind all of them. Here each free slot goes to the tenant with the fewest
rows in the batch so far (ties: the tenant whose oldest ready request is oldest), and a tenant's
own requests stay in submission order. With an empty batch that is round-robin: one request per
tenant in turn.

Continuous batching adds preemption: when a tenant below its fair share has requests waiting
and the batch is full, tenants above their share give up their newest rows. Those rows are
parked (their KV cache kept, no steps taken) and resume before their tenant's queued requests
as soon as slots free up, so a small tenant never waits for a large tenant's rows to finish.
Shares are max-min fair (water-filling): a tenant that needs fewer slots than an equal split
gets all it needs and the rest is divided among the others, so no slot is left idle.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar


class _Queued(Protocol):
    seq: int

    @property
    def namespace(self) -> str: ...


T = TypeVar("T", bound=_Queued)


def fair_shares(demand: Mapping[str, int], capacity: int) -> dict[str, int]:
    """Max-min fair split of `capacity` slots over tenants' demands (water-filling).

    Every tenant gets min(demand, level) for one level; when slots do not divide evenly, the
    tenants with the smallest remaining demand (then the smallest name) get the spare ones.
    """
    shares = dict.fromkeys(demand, 0)
    remaining = {t: d for t, d in demand.items() if d > 0}
    left = capacity
    while remaining and left > 0:
        each = max(1, left // len(remaining))
        for tenant in sorted(remaining, key=lambda t: (remaining[t], t)):
            give = min(each, remaining[tenant], left)
            shares[tenant] += give
            remaining[tenant] -= give
            left -= give
            if not remaining[tenant]:
                del remaining[tenant]
            if not left:
                break
    return shares


class BatchPolicy(Protocol):
    """Which requests run next. May keep state across calls."""

    def select(self, ready: Sequence[T], slots: int,
               running: Sequence[T] = ()) -> list[T]:
        """Up to `slots` of `ready` to start (or resume), given the rows already running."""
        ...

    def preempt(self, running: Sequence[T], waiting: Sequence[T],
                capacity: int) -> list[T]:
        """Running rows to park to make room for `waiting` (continuous batching only)."""
        ...


class FifoPolicy:
    """Oldest first, across tenants, never preempting: one tenant's backlog delays everyone."""

    def select(self, ready: Sequence[T], slots: int,
               running: Sequence[T] = ()) -> list[T]:
        return sorted(ready, key=lambda t: t.seq)[:slots]

    def preempt(self, running: Sequence[T], waiting: Sequence[T],
                capacity: int) -> list[T]:
        return []


class RoundRobinPolicy:
    """Fair across tenants: least-loaded tenant first, preemption up to max-min fair shares."""

    def select(self, ready: Sequence[T], slots: int, running: Sequence[T] = ()) -> list[T]:
        """Up to `slots` of `ready`: each to the tenant with the fewest rows (running + picked)."""
        queues: dict[str, deque[T]] = defaultdict(deque)
        for item in sorted(ready, key=lambda t: t.seq):
            queues[item.namespace].append(item)
        load = Counter(t.namespace for t in running)
        heap = [(load[ns], queue[0].seq, ns) for ns, queue in queues.items()]
        heapq.heapify(heap)
        picked: list[T] = []
        while heap and len(picked) < slots:
            rows, _, ns = heapq.heappop(heap)
            queue = queues[ns]
            picked.append(queue.popleft())
            if queue:
                heapq.heappush(heap, (rows + 1, queue[0].seq, ns))
        return picked

    def preempt(self, running: Sequence[T], waiting: Sequence[T], capacity: int) -> list[T]:
        """The running rows to park so that waiting tenants below their share get slots now:
        only as many as the free slots do not already cover, newest first, from the tenants
        furthest above their share."""
        if not waiting:
            return []
        run = Counter(t.namespace for t in running)
        wait = Counter(t.namespace for t in waiting)
        shares = fair_shares({ns: run[ns] + wait[ns] for ns in run | wait}, capacity)
        owed = sum(min(wait[ns], max(0, shares[ns] - run[ns])) for ns in wait)
        need = owed - (capacity - len(running))
        over = {ns: run[ns] - shares[ns] for ns in run if run[ns] > shares[ns]}
        newest: dict[str, list[T]] = defaultdict(list)
        for row in sorted(running, key=lambda t: t.seq, reverse=True):
            newest[row.namespace].append(row)
        victims: list[T] = []
        while need > 0 and over:
            ns = max(over, key=lambda n: (over[n], n))
            victims.append(newest[ns].pop(0))
            over[ns] -= 1
            if not over[ns]:
                del over[ns]
            need -= 1
        return victims
