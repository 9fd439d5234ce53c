"""At most --max-concurrent-uploads uploads parse at once; the rest wait for a turn, and a
turn that never comes is a 429 (QueueFullError), not an unbounded pile of parses."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.errors import QueueFullError
from server.engine.upload_slots import UploadSlots


async def test_turns_are_bounded_and_waiters_go_in_when_one_ends() -> None:
    slots = UploadSlots(2, wait_s=60)  # a wait bound no turn reaches, however slow the loop
    running, peak = 0, 0

    async def parse() -> None:
        nonlocal running, peak
        async with slots.turn():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    await asyncio.gather(*(parse() for _ in range(6)))
    assert peak == 2 and running == 0


async def test_a_turn_that_does_not_come_in_time_is_queue_full() -> None:
    slots = UploadSlots(1, wait_s=0.1)
    async with slots.turn():
        with pytest.raises(QueueFullError, match="--max-concurrent-uploads"):
            async with slots.turn():
                pass
    async with slots.turn():  # the slot was given back
        pass


async def test_a_failing_parse_gives_its_turn_back() -> None:
    slots = UploadSlots(1, wait_s=0.1)
    with pytest.raises(ValueError):
        async with slots.turn():
            raise ValueError("bad upload")
    async with slots.turn():
        pass
