"""Admission in front of vLLM: who goes next when a place frees, by weighted share; the
contended cap; the queue bound; cancellation and shutdown. Driven by hand on one event loop,
time by a hand-set clock (vLLM is not needed)."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.errors import EngineNotReadyError, QueueFullError
from server.engine.vllm.admission import Admission


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_second_tenant_goes_before_the_first_tenants_backlog():
    gate = Admission(max_in_flight=2, max_queue=10, weight_of=lambda _t: 1.0)
    order: list[str] = []

    async def request(tenant: str, name: str) -> None:
        await gate.acquire(tenant)
        order.append(name)

    await gate.acquire("a")
    await gate.acquire("a")  # a fills both places
    waiting = [asyncio.create_task(request("a", f"a{i}")) for i in range(3)]
    await _settle()
    late = asyncio.create_task(request("b", "b0"))
    await _settle()
    assert order == [] and gate.queued == 4
    gate.release("a")
    await _settle()
    assert order == ["b0"]  # b has nothing running: its share is the larger
    gate.release("a")
    await _settle()
    assert order == ["b0", "a0"]
    for _ in range(2):
        gate.release("a")
        await _settle()
    assert order == ["b0", "a0", "a1", "a2"]
    await asyncio.gather(*waiting, late)


async def test_weights_divide_the_places():
    weights = {"heavy": 2.0, "light": 1.0}
    gate = Admission(max_in_flight=3, max_queue=10, weight_of=weights.__getitem__)
    admitted: list[str] = []

    async def request(tenant: str) -> None:
        await gate.acquire(tenant)
        admitted.append(tenant)

    await gate.acquire("light")
    await gate.acquire("light")
    await gate.acquire("light")
    tasks = [asyncio.create_task(request(t)) for t in ("light", "heavy", "heavy", "heavy")]
    await _settle()
    for _ in range(3):
        gate.release("light")
        await _settle()
    # heavy (0 of weight 2) and light (2 of weight 1) share the freed places 2 : 1
    assert sorted(admitted) == ["heavy", "heavy", "light"]
    for task in tasks:
        task.cancel()


async def test_the_queue_bound_and_a_cancelled_waiter():
    gate = Admission(max_in_flight=1, max_queue=1, weight_of=lambda _t: 1.0)
    await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("a"))
    await _settle()
    with pytest.raises(QueueFullError):
        gate.check()
    waiter.cancel()
    await _settle()
    assert gate.queued == 0
    gate.release("a")
    assert gate.in_flight == 0


async def test_close_fails_the_waiting_and_refuses_new():
    gate = Admission(max_in_flight=1, max_queue=5, weight_of=lambda _t: 1.0)
    await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("b"))
    await _settle()
    gate.close()
    with pytest.raises(EngineNotReadyError):
        await waiter
    with pytest.raises(EngineNotReadyError):
        gate.check()


async def test_the_contended_cap_holds_a_tenant_while_another_has_work():
    now = [100.0]
    gate = Admission(max_in_flight=4, max_queue=10, weight_of=lambda _t: 1.0,
                     contended_rows=1, clock=lambda: now[0])
    admitted: list[str] = []

    async def request(tenant: str, name: str) -> None:
        await gate.acquire(tenant)
        admitted.append(name)

    for _ in range(4):  # alone, a may fill every place
        await gate.acquire("a")
    a_waiting = [asyncio.create_task(request("a", f"a{i}")) for i in range(3)]
    b = asyncio.create_task(request("b", "b0"))
    await _settle()
    gate.release("a")
    await _settle()
    assert admitted == ["b0"]
    for running in (2, 1):  # a above its cap of 1: freed places stay free while b has work
        gate.release("a")
        await _settle()
        assert admitted == ["b0"] and gate.in_flight == running + 1
    gate.release("a")  # a has nothing inside: under its cap, its next request goes
    await _settle()
    assert admitted == ["b0", "a0"]
    gate.release("b")  # b is done, but was seen within the last second: a stays capped
    await _settle()
    assert admitted == ["b0", "a0"] and gate.in_flight == 1
    now[0] += 1.5  # b quiet for longer than the window: a may fill the places again
    gate.release("a")
    await _settle()
    assert admitted == ["b0", "a0", "a1", "a2"]
    await asyncio.gather(*a_waiting, b)


async def test_a_weight_multiplies_the_contended_cap():
    gate = Admission(max_in_flight=8, max_queue=10, weight_of={"a": 3.0, "b": 1.0}.__getitem__,
                     contended_rows=1, clock=lambda: 0.0)
    await gate.acquire("b")
    tasks = [asyncio.create_task(gate.acquire("a")) for _ in range(5)]
    await _settle()
    assert gate.running() == {"a": 3, "b": 1} and gate.waiting() == {"a": 2}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
