"""The engine-to-loop hand-over: everything posted arrives, in order, with one wake-up per burst."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

from server.engine.mailbox import Mailbox, mailbox_for


async def test_a_burst_posted_while_the_loop_is_busy_wakes_it_once_in_order() -> None:
    box = Mailbox(asyncio.get_running_loop())
    got: list[int] = []

    def engine() -> None:
        for i in range(1000):
            box.post(got.append, i)

    thread = threading.Thread(target=engine)
    thread.start()
    thread.join()  # the loop is blocked here: nothing can be drained before all are posted
    assert got == []
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert got == list(range(1000))
    assert box.wakeups == 1


async def test_posts_after_a_drain_wake_the_loop_again() -> None:
    box = Mailbox(asyncio.get_running_loop())
    got: list[str] = []
    for item in ("a", "b"):
        threading.Thread(target=box.post, args=(got.append, item)).start()
        async with asyncio.timeout(30):  # the drain, however long the thread takes to post
            while item not in got:
                await asyncio.sleep(0.001)
    assert got == ["a", "b"]
    assert box.wakeups == 2


async def test_a_failing_callback_does_not_drop_the_ones_after_it() -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx["exception"]))
    box = Mailbox(loop)
    got: list[int] = []

    def boom(_item: object) -> None:
        raise ValueError("bad callback")

    box.post(got.append, 1)
    box.post(boom, None)
    box.post(got.append, 2)
    await asyncio.sleep(0)
    assert got == [1, 2]
    assert [str(e) for e in errors] == ["bad callback"]


def test_posting_to_a_closed_loop_is_a_no_op() -> None:
    loop = asyncio.new_event_loop()
    box = mailbox_for(loop)
    loop.close()
    box.post(print, "nobody listens")  # must not raise on the engine thread


async def test_one_mailbox_per_loop_and_it_does_not_keep_the_loop_alive() -> None:
    assert mailbox_for(asyncio.get_running_loop()) is mailbox_for(asyncio.get_running_loop())
    other = asyncio.new_event_loop()
    box = mailbox_for(other)
    other.close()
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None
    box.post(print, "the loop is gone")  # weakly held: a no-op, not an error
