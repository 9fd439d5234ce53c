"""The readiness rule for a wedged engine, with time driven by hand: work waiting on a loop
that has shown no progress for longer than the bound is a stall; an idle loop, a loop resting
until it has work, and a long step within the bound are not."""

from __future__ import annotations

import pytest

from server.engine.heartbeat import Heartbeat
from server.engine.interface import EngineProgress

BOUND = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def heart(clock) -> Heartbeat:
    return Heartbeat("the loop", clock=clock)


def test_an_idle_loop_is_never_stalled(heart, clock):
    clock.now += 3600
    assert heart.progress(0) == EngineProgress(waiting=0, stalled_s=0.0)
    assert not heart.stalled(0, BOUND)


def test_work_waiting_on_a_silent_loop_is_a_stall_past_the_bound(heart, clock):
    heart.beat()  # work arrives: the clock starts
    clock.now += BOUND
    assert heart.progress(2) == EngineProgress(waiting=2, stalled_s=BOUND)
    assert not heart.stalled(2, BOUND)  # at the bound: not yet
    clock.now += 0.5
    assert heart.stalled(2, BOUND)
    heart.beat()  # a step: moving again
    assert not heart.stalled(2, BOUND)
    assert heart.progress(2).stalled_s == 0.0


def test_the_clock_starts_when_work_arrives_not_at_the_last_step(heart, clock):
    clock.now += 3600  # an idle hour since the last beat
    heart.beat()  # what a loop with no work does when work arrives
    clock.now += 1
    assert not heart.stalled(1, BOUND)


def test_a_long_step_within_the_bound_is_not_a_stall(heart, clock):
    heart.beat()
    clock.now += 29.0  # one large prefill on a slow CPU, still running
    assert not heart.stalled(4, BOUND)
    heart.beat()  # it finished
    clock.now += 29.0
    assert not heart.stalled(4, BOUND)


def test_a_loop_resting_until_it_has_work_is_not_stalled(heart, clock):
    heart.rest()  # queued requests wait for their adapter's load, not for the loop
    clock.now += 600
    assert not heart.stalled(3, BOUND)
    heart.wake()  # the adapter arrived: the loop has work, measured from now
    clock.now += 1
    assert heart.progress(3).stalled_s == 1.0
    clock.now += BOUND
    assert heart.stalled(3, BOUND)


def test_a_zero_bound_turns_the_check_off(heart, clock):
    clock.now += 3600
    assert heart.progress(5).stalled_s == 3600
    assert not heart.stalled(5, 0.0)


def test_a_stall_and_its_end_are_logged_once_each(heart, clock, caplog):
    clock.now += BOUND + 1
    for _ in range(3):
        heart.stalled(1, BOUND)
    heart.beat()
    for _ in range(3):
        heart.stalled(1, BOUND)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "the loop has shown no progress for 31.0 s while 1 request(s) wait" in messages[0]
    assert "the loop is making progress again" in messages[1]
