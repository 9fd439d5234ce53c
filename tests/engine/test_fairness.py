"""Fair batch selection: a small tenant is not starved by another tenant's backlog, neither when
a batch forms nor (the engine core) when a full running batch must make room for it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.fairness import FifoPolicy, RoundRobinPolicy, contended_rows, fair_shares


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


class Clock:
    """A hand-moved monotonic clock for the contended window."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _capped(clock: Clock | None = None, **kw) -> RoundRobinPolicy:
    return RoundRobinPolicy(contended_rows=8, clock=clock or Clock(), **kw)


def test_alone_a_tenant_fills_the_batch_whatever_the_cap() -> None:
    picked = _capped().select([Queued(i, "a") for i in range(100)], 32)
    assert [t.seq for t in picked] == list(range(32))


def test_beside_another_tenant_a_flood_starts_no_more_than_its_cap() -> None:
    """a's backlog and b's five: b gets all five, a only up to the cap of 8 (counting the
    rows it already runs), and the rest of the slots stay free."""
    policy = _capped()
    picked = policy.select(_backlog(), 32)
    assert sorted(t.seq for t in picked if t.namespace == "b") == list(range(100, 105))
    assert [t.seq for t in picked if t.namespace == "a"] == list(range(8))
    running = [Queued(i, "a") for i in range(6)] + [Queued(100, "b")]
    picked = policy.select([Queued(50 + i, "a") for i in range(20)], 25, running)
    assert [t.seq for t in picked] == [50, 51]
    assert RoundRobinPolicy().select(_backlog(), 32)[-1].namespace == "a"  # no cap: 27 of a


def test_the_cap_holds_for_a_second_after_the_other_tenant_was_last_seen() -> None:
    """b sends rounds with gaps between them: a must not refill the batch in each gap, or
    b's next round finds it full again. Once b has been gone past the window, a fills it."""
    clock = Clock()
    policy = _capped(clock)
    policy.select([Queued(0, "b")], 32)  # b seen
    clock.now += 0.9
    flood = [Queued(10 + i, "a") for i in range(100)]
    assert len(policy.select(flood, 32)) == 8  # b's round is over, but b was seen 0.9 s ago
    clock.now += 0.2
    assert len(policy.select(flood, 32)) == 32


def test_the_cap_scales_with_the_tenants_weight() -> None:
    policy = _capped(weight_of=lambda t: 1.5 if t == "a" else 0.1)
    picked = policy.select(_backlog(), 32)
    assert sum(t.namespace == "a" for t in picked) == 12
    assert sum(t.namespace == "b" for t in picked) == 1  # ceil(0.8): at least one row


def test_rows_over_the_cap_are_not_parked_only_what_the_small_tenant_needs() -> None:
    """a fills the batch alone; when b arrives, a gives up five rows for b's five, not the
    24 over its cap: those finish in their own time (parking would move their caches)."""
    running = [Queued(i, "a") for i in range(32)]
    waiting = [Queued(100 + i, "a") for i in range(50)] + [Queued(200 + i, "b")
                                                            for i in range(5)]
    parked = _capped().preempt(running, waiting, 32)
    assert sorted(t.seq for t in parked) == list(range(27, 32))


def test_nothing_is_parked_for_a_tenant_at_its_cap() -> None:
    """c holds 24 rows, a its 8: a's queue would be owed 16 by max-min shares, but select
    would not start them, so parking c's rows for it would only leave slots empty."""
    running = [Queued(i, "a") for i in range(8)] + [Queued(50 + i, "c") for i in range(24)]
    waiting = [Queued(100 + i, "a") for i in range(30)]
    assert _capped().preempt(running, waiting, 32) == []
    assert len(RoundRobinPolicy().preempt(running, waiting, 32)) == 8


@pytest.mark.parametrize(("setting", "expected"), [(0, None), (5, 5), (31, 31), (32, None),
                                                 (40, None)])
def test_contended_rows_is_off_unless_set_below_the_batch(setting, expected) -> None:
    assert contended_rows(setting, 32) == expected
