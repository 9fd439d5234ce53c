"""Fair batch selection: a small tenant is not starved by another tenant's backlog, neither when
a batch forms nor (continuous batching) when a full running batch must make room for it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.fairness import FifoPolicy, RoundRobinPolicy, fair_shares


@dataclass(eq=False)
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


def test_each_free_slot_goes_to_the_tenant_with_the_fewest_running_rows() -> None:
    running = [Queued(i, "a") for i in range(6)] + [Queued(6, "b")]
    ready = [Queued(10 + i, "a") for i in range(5)] + [Queued(20, "b"), Queued(21, "c"),
                                                        Queued(22, "c")]
    picked = RoundRobinPolicy().select(ready, 3, running)
    # c has none, then b and c have one each (b's head is older), then c.
    assert [(t.namespace, t.seq) for t in picked] == [("c", 21), ("b", 20), ("c", 22)]


@pytest.mark.parametrize(("demand", "capacity", "expected"), [
    ({"a": 200, "b": 5}, 32, {"a": 27, "b": 5}),
    ({"a": 10, "b": 10}, 32, {"a": 10, "b": 10}),
    ({"a": 100, "b": 100, "c": 3}, 32, {"a": 15, "b": 14, "c": 3}),
    ({"a": 1, "b": 1, "c": 1}, 2, {"a": 1, "b": 1, "c": 0}),
    ({"a": 0, "b": 7}, 4, {"a": 0, "b": 4}),
])
def test_fair_shares_are_max_min_fair_and_leave_no_slot_idle(demand, capacity,
                                                             expected) -> None:
    shares = fair_shares(demand, capacity)
    assert shares == expected
    assert sum(shares.values()) == min(capacity, sum(demand.values()))


def test_a_full_batch_parks_the_big_tenants_newest_rows_for_a_waiting_small_tenant() -> None:
    running = [Queued(i, "a") for i in range(32)]
    waiting = [Queued(100 + i, "a") for i in range(50)] + [Queued(200 + i, "b")
                                                            for i in range(5)]
    parked = RoundRobinPolicy().preempt(running, waiting, 32)
    assert sorted(t.seq for t in parked) == list(range(27, 32))
    # With those parked, the freed slots all go to b.
    staying = [t for t in running if t not in parked]
    picked = RoundRobinPolicy().select(waiting + parked, 5, staying)
    assert {t.namespace for t in picked} == {"b"}


def test_no_preemption_when_free_slots_cover_the_waiting_or_shares_are_met() -> None:
    policy = RoundRobinPolicy()
    running = [Queued(i, "a") for i in range(27)]
    assert policy.preempt(running, [Queued(100 + i, "b") for i in range(5)], 32) == []
    running += [Queued(50 + i, "b") for i in range(5)]
    assert policy.preempt(running, [Queued(100 + i, "a") for i in range(9)], 32) == []
    even = [Queued(i, "a") for i in range(16)] + [Queued(50 + i, "b") for i in range(16)]
    more = [Queued(100, "a"), Queued(101, "b"), Queued(102, "b")]
    assert policy.preempt(even, more, 32) == []  # both at their share of 16
    assert FifoPolicy().preempt([Queued(i, "a") for i in range(32)], [Queued(99, "b")],
                                32) == []


def test_preemption_takes_only_what_the_free_slots_do_not_cover() -> None:
    running = [Queued(i, "a") for i in range(30)]
    waiting = [Queued(100 + i, "b") for i in range(5)]
    assert [t.seq for t in RoundRobinPolicy().preempt(running, waiting, 32)] == [29, 28, 27]
    # b's sixth request: a small tenant's whole demand is its share when a does not need it.
    running = [Queued(i, "a") for i in range(27)] + [Queued(50 + i, "b") for i in range(5)]
    assert [t.seq for t in RoundRobinPolicy().preempt(running, [Queued(60, "b")], 32)] == [26]


@pytest.mark.parametrize(("demand", "weights", "capacity", "expected"), [
    ({"a": 100, "b": 100}, {"a": 3}, 32, {"a": 24, "b": 8}),
    ({"a": 100, "b": 100, "c": 100}, {"a": 2}, 32, {"a": 16, "b": 8, "c": 8}),
    # b's weight makes its share 24, but it only wants 5: a gets the rest.
    ({"a": 100, "b": 5}, {"b": 3}, 32, {"a": 27, "b": 5}),
    ({"a": 100, "b": 100}, {"a": 0.5}, 30, {"a": 10, "b": 20}),
])
def test_weighted_shares_are_in_proportion_and_still_leave_no_slot_idle(demand, weights,
                                                                        capacity,
                                                                        expected) -> None:
    shares = fair_shares(demand, capacity, lambda t: weights.get(t, 1.0))
    assert shares == expected
    assert sum(shares.values()) == min(capacity, sum(demand.values()))


def test_weighted_select_fills_an_empty_batch_in_proportion() -> None:
    ready = [Queued(i, "a") for i in range(50)] + [Queued(100 + i, "b") for i in range(50)]
    policy = RoundRobinPolicy(weight_of=lambda t: 3.0 if t == "a" else 1.0)
    picked = policy.select(ready, 32)
    assert sum(t.namespace == "a" for t in picked) == 24
    assert [t.seq for t in picked if t.namespace == "b"] == list(range(100, 108))


def test_weighted_preemption_parks_only_what_is_above_the_weighted_share() -> None:
    """b (weight 3) waits on a batch a filled: a keeps its weighted share of 8, not 16."""
    running = [Queued(i, "a") for i in range(32)]
    waiting = [Queued(100 + i, "b") for i in range(40)]
    policy = RoundRobinPolicy(weight_of=lambda t: 3.0 if t == "b" else 1.0)
    assert sorted(t.seq for t in policy.preempt(running, waiting, 32)) == list(range(8, 32))
    assert len(RoundRobinPolicy().preempt(running, waiting, 32)) == 16
