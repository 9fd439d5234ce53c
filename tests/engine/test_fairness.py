"""Round-robin batch selection: a small tenant is not starved by another tenant's backlog."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.fairness import RoundRobinPolicy
from server.engine.scheduler import FifoPolicy


@dataclass
class Queued:
    seq: int
    namespace: str


def _backlog() -> list[Queued]:
    """Tenant A queued 100 requests before tenant B queued 5."""
    return [Queued(i, "a") for i in range(100)] + [Queued(100 + i, "b") for i in range(5)]


def test_small_tenant_is_all_in_the_first_batch_behind_a_large_backlog() -> None:
    batch = RoundRobinPolicy().select(_backlog(), 32)
    assert len(batch) == 32
    assert sorted(t.seq for t in batch if t.namespace == "b") == list(range(100, 105))
    # A's share keeps its own submission order
    a_seqs = [t.seq for t in batch if t.namespace == "a"]
    assert a_seqs == list(range(27))


def test_fifo_would_have_starved_the_small_tenant() -> None:
    assert all(t.namespace == "a" for t in FifoPolicy().select(_backlog(), 32))


def test_tenants_alternate_and_rotate_by_oldest_head() -> None:
    ready = [Queued(1, "a"), Queued(2, "a"), Queued(3, "b"), Queued(4, "c"), Queued(5, "b")]
    picked = RoundRobinPolicy().select(ready, 4)
    assert [(t.namespace, t.seq) for t in picked] == [("a", 1), ("b", 3), ("c", 4), ("a", 2)]
    rest = [t for t in ready if t not in picked]
    assert [t.seq for t in RoundRobinPolicy().select(rest, 4)] == [5]


def test_more_tenants_than_batch_slots_serves_the_longest_waiting_first() -> None:
    ready = [Queued(i, f"t{i}") for i in range(10)]
    assert [t.namespace for t in RoundRobinPolicy().select(ready, 3)] == ["t0", "t1", "t2"]
