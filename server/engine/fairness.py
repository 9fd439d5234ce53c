"""Batch policies: which requests run next. The default is fair across tenants: max-min fair
shares of the batch's slots (FifoPolicy, oldest first, is there to compare against).

With FIFO, a tenant that keeps hundreds of requests queued fills every batch and a tenant with a
few requests waits behind all of them. Here each free slot goes to the tenant with the fewest
rows in the batch so far (ties: the tenant whose oldest ready request is oldest), and a tenant's
own requests stay in submission order. With an empty batch that is round-robin: one request per
tenant in turn.

The engine core adds preemption: when a tenant below its fair share has requests waiting and
the batch is full, tenants above their share give up their newest rows. Those rows free their
KV slots and resume (recomputed from their tokens) before their tenant's queued requests as soon
as slots free up, so a small tenant never waits for a large tenant's rows to finish.
Shares are max-min fair (water-filling): a tenant that needs fewer slots than an equal split
gets all it needs and the rest is divided among the others, so no slot is left idle. Tenants
can be weighted (the keys file's "weight"): shares are then in proportion to the weights.

Max-min shares decide who gets a slot, not how long a step takes. Where a step's cost grows
with its rows, a tenant that fills every free slot slows every other tenant's tokens even when
they got all the slots they asked for. For that there is an optional contended cap (off by
default): while another tenant has work (or had some within the last `active_window_s`, so
that a tenant sending rounds of requests does not find the batch refilled between two rounds),
no tenant starts more than `contended_rows` rows (times its weight). Rows already running are
left to finish rather than preempted for it. Alone, a tenant may fill the batch.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar


class _Queued(Protocol):
    seq: int

    @property
    def namespace(self) -> str: ...


T = TypeVar("T", bound=_Queued)


WeightOf = Callable[[str], float]


def _equal(_tenant: str) -> float:
    return 1.0


def fair_shares(demand: Mapping[str, int], capacity: int,
                weight_of: WeightOf = _equal) -> dict[str, int]:
    """Weighted max-min fair split of `capacity` slots over tenants' demands.

    Slot by slot, each goes to the tenant with unmet demand whose share would be smallest
    relative to its weight ((share + 1) / weight; ties: the smaller remaining demand, then the
    smaller name). With equal weights that is water-filling: every tenant gets min(demand,
    level) for one level. A tenant that needs less than its weighted split gets all it needs
    and the rest is divided among the others, so no slot is left idle.
    """
    shares = dict.fromkeys(demand, 0)
    weights = {t: weight_of(t) for t in demand}
    heap = [(1 / weights[t], d, t) for t, d in demand.items() if d > 0]
    heapq.heapify(heap)
    for _ in range(capacity):
        if not heap:
            break
        _, left, tenant = heapq.heappop(heap)
        shares[tenant] += 1
        if left > 1:
            heapq.heappush(heap, ((shares[tenant] + 1) / weights[tenant], left - 1, tenant))
    return shares


class BatchPolicy(Protocol):
    """Which requests run next. May keep state across calls."""

    def select(self, ready: Sequence[T], slots: int,
               running: Sequence[T] = ()) -> list[T]:
        """Up to `slots` of `ready` to start (or resume), given the rows already running."""
        ...

    def preempt(self, running: Sequence[T], waiting: Sequence[T],
                capacity: int) -> list[T]:
        """Running rows to preempt to make room for `waiting` (the engine core only)."""
        ...


class FifoPolicy:
    """Oldest first, across tenants, never preempting: one tenant's backlog delays everyone."""

    def select(self, ready: Sequence[T], slots: int,
               running: Sequence[T] = ()) -> list[T]:
        return sorted(ready, key=lambda t: t.seq)[:slots]

    def preempt(self, running: Sequence[T], waiting: Sequence[T],
                capacity: int) -> list[T]:
        return []


class ContendedCap:
    """The contended cap's bookkeeping, for the builtin engine's policy and for the admission
    in front of vLLM alike: which tenants had work within the last `active_window_s`, and while
    two or more did, each present tenant's limit (`rows` times its weight, at least 1)."""

    def __init__(self, rows: int | None, *, active_window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rows = rows
        self.active_window_s = active_window_s
        self._clock = clock
        self._last_seen: dict[str, float] = {}  # tenant -> when it last had work

    def caps(self, present: set[str], weight_of: WeightOf) -> dict[str, int] | None:
        """The limits of the tenants in `present` (who have work now); None: no cap."""
        if self.rows is None:
            return None
        now = self._clock()
        for tenant in present:
            self._last_seen[tenant] = now
        horizon = now - self.active_window_s
        self._last_seen = {t: seen for t, seen in self._last_seen.items() if seen >= horizon}
        if len(self._last_seen) < 2:
            return None
        return {t: max(1, math.ceil(self.rows * weight_of(t))) for t in present}


class RoundRobinPolicy:
    """Fair across tenants: least-loaded tenant first, preemption up to max-min fair shares.

    `weight_of(tenant)` (default 1 for all) makes both weighted: a tenant of weight 2 is
    entitled to twice the slots of a tenant of weight 1 when both want more than that. It is
    asked at every decision, so a reloaded keys file takes effect at once.
    """

    def __init__(self, weight_of: WeightOf = _equal, *, contended_rows: int | None = None,
                 active_window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.weight_of = weight_of
        self.contended = ContendedCap(contended_rows, active_window_s=active_window_s,
                                      clock=clock)

    def _caps(self, present: set[str]) -> dict[str, int] | None:
        return self.contended.caps(present, self.weight_of)

    def select(self, ready: Sequence[T], slots: int, running: Sequence[T] = ()) -> list[T]:
        """Up to `slots` of `ready`: each to the tenant with the fewest rows (running + picked)
        for its weight, none past its contended cap."""
        load = Counter(t.namespace for t in running)
        caps = self._caps({t.namespace for t in ready} | set(load))
        queues: dict[str, deque[T]] = defaultdict(deque)
        for item in sorted(ready, key=lambda t: t.seq):
            queue = queues[item.namespace]
            if caps is None or load[item.namespace] + len(queue) < caps[item.namespace]:
                queue.append(item)
        queues = {ns: queue for ns, queue in queues.items() if queue}
        weights = {ns: self.weight_of(ns) for ns in queues}
        heap = [((load[ns] + 1) / weights[ns], queue[0].seq, ns)
                for ns, queue in queues.items()]
        heapq.heapify(heap)
        picked: list[T] = []
        while heap and len(picked) < slots:
            _, _, ns = heapq.heappop(heap)
            queue = queues[ns]
            picked.append(queue.popleft())
            load[ns] += 1
            if queue:
                heapq.heappush(heap, ((load[ns] + 1) / weights[ns], queue[0].seq, ns))
        return picked

    def preempt(self, running: Sequence[T], waiting: Sequence[T], capacity: int) -> list[T]:
        """The running rows to park so that waiting tenants below their share get slots now:
        only as many as the free slots do not already cover, newest first, from the tenants
        furthest above their share."""
        if not waiting:
            return []
        run = Counter(t.namespace for t in running)
        wait = Counter(t.namespace for t in waiting)
        caps = self._caps(set(run | wait))
        demand = {ns: run[ns] + wait[ns] for ns in run | wait}
        if caps is not None:  # nothing is parked for rows select would not start
            demand = {ns: min(d, max(caps[ns], run[ns])) for ns, d in demand.items()}
        shares = fair_shares(demand, capacity, self.weight_of)
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


def contended_rows(setting: int, max_batch_size: int) -> int | None:
    """--contended-tenant-rows resolved: None for no cap (0, the default, or the whole batch).

    Off by default on every device: a GPU decode step costs about the same with 5 rows as
    with 32 (memory-bound), so a cap there would only leave slots idle. It is for operators
    whose hardware makes a step's cost grow with its rows.
    """
    return setting if 0 < setting < max_batch_size else None
