"""Scheduler behaviour through the Engine: cold loads off the hot path, bounded queue, aborts,
failure isolation, FIFO policy. Ordering is asserted, never wall-clock timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from adapters_store import LocalAdapterStore
from server.engine import generation
from server.engine.core.engine_core import EngineCore, StepStats
from server.engine.errors import EngineNotReadyError, GenerationError, QueueFullError
from server.engine.fairness import FifoPolicy
from server.engine.interface import GenerationRequest, SamplingParams, TokenChunk
from tests.engine.test_engine import RecordingObserver, make_engine, request, until, upload_of
from tests.factories import make_adapter


class GatedStore(LocalAdapterStore):
    """A real store whose reads of a gated adapter wait until the test opens the gate:
    a stand-in for a slow (cold, remote) adapter load."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gates: dict[str, threading.Event] = {}

    def get(self, namespace: str, adapter_id: str, **kw):
        gate = self.gates.get(adapter_id)
        if gate is not None:
            assert gate.wait(30), "test gate never opened"
        return super().get(namespace, adapter_id, **kw)


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sched-adapters")
    return {name: make_adapter(tiny_model_dirs["llama"], root / name, "prompt_tuning",
                               num_virtual_tokens=n, seed=seed)
            for name, n, seed in (("cold", 4, 11), ("warm", 3, 12))}


# The scheduler's own behaviour, under the engine core (the default) and static batching.
@pytest.fixture(params=["core", "static"])
async def gated(request, tiny_model_dirs, tmp_path, adapters):
    store = GatedStore(tmp_path / "store")
    observer = RecordingObserver()
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, store=store, observer=observer,
                      max_queue=3, max_wait_ms=1, batching=request.param)
    for name, path in adapters.items():
        await eng.add_adapter("t1", name, upload_of(path))
    store.gates["cold"] = threading.Event()
    yield eng, store.gates["cold"]
    store.gates["cold"].set()
    await eng.aclose(10)


async def test_cold_adapter_load_does_not_delay_bare_or_warm_requests(gated) -> None:
    eng, gate = gated
    cold = asyncio.ensure_future(eng.generate(request(eng, "Hi!", "cold")))
    await until(lambda: eng.stats()["queue_depth"] == 1)  # waiting on its load
    bare = await eng.generate(request(eng, "Hi!", None))
    warm = await eng.generate(request(eng, "Hi!", "warm"))
    assert bare.completion_tokens and warm.completion_tokens
    assert not cold.done()  # still loading, yet the others were served
    gate.set()
    assert (await cold).virtual_tokens == 4
    assert eng._observer.loads == 2


async def test_queue_full_raises_with_retry_after_then_recovers(gated) -> None:
    eng, gate = gated
    waiting = [asyncio.ensure_future(eng.generate(request(eng, "Hi!", "cold")))
               for _ in range(3)]
    await until(lambda: eng.stats()["queue_depth"] == 3)
    with pytest.raises(QueueFullError) as info:
        await eng.generate(request(eng, "Hi!", None))
    assert info.value.retry_after_s > 0
    gate.set()
    results = await asyncio.gather(*waiting)
    assert len({r.token_ids for r in results}) == 1  # one load served all three
    assert eng._observer.loads == 1
    assert (await eng.generate(request(eng, "Hi!", None))).completion_tokens


async def test_closing_a_stream_aborts_and_gauges_return_to_zero(gated) -> None:
    eng, _ = gated
    stream = await eng.open_stream(request(eng, "Hi!", "warm", max_new_tokens=400,
                                           ignore_eos=True))
    first = await anext(stream)
    assert isinstance(first, TokenChunk)
    assert eng.stats()["in_flight"] == 1
    await stream.aclose()
    await until(lambda: eng.stats()["in_flight"] == 0 and eng.stats()["queue_depth"] == 0)
    # The row stopped: the engine is free again long before 400 tokens.
    assert (await eng.generate(request(eng, "a", None, max_new_tokens=2))).completion_tokens == 2


async def test_aborting_a_queued_request_frees_its_slot(gated) -> None:
    eng, gate = gated
    stream = await eng.open_stream(request(eng, "Hi!", "cold"))
    await until(lambda: eng.stats()["queue_depth"] == 1)
    await stream.aclose()  # never started: closing still aborts the submitted request
    assert eng.stats()["queue_depth"] == 0 and eng.stats()["in_flight"] == 0
    gate.set()


async def test_abort_by_id_and_task_cancellation(gated) -> None:
    eng, gate = gated
    req = request(eng, "Hi!", "cold")
    by_id = asyncio.ensure_future(eng.generate(req))
    cancelled = asyncio.ensure_future(eng.generate(request(eng, "Hi!", "cold")))
    await until(lambda: eng.stats()["queue_depth"] == 2)
    await eng.abort(req.request_id)
    with pytest.raises(asyncio.CancelledError):
        await by_id
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await until(lambda: eng.stats()["in_flight"] == 0)
    gate.set()


async def test_shutdown_fails_what_cannot_finish_in_time(gated) -> None:
    eng, gate = gated
    stuck = asyncio.ensure_future(eng.generate(request(eng, "Hi!", "cold")))
    await until(lambda: eng.stats()["queue_depth"] == 1)
    await eng.aclose(0.2)  # its adapter never loads
    with pytest.raises(EngineNotReadyError):
        await stuck
    assert eng.stats()["in_flight"] == 0 and not eng.is_ready()
    with pytest.raises(EngineNotReadyError):
        await eng.generate(GenerationRequest(request_id="late", prompt_ids=(1,),
                                             adapter_id=None))
    gate.set()


@pytest.mark.parametrize("batching", ["static", "core"])
async def test_a_failing_batch_fails_only_its_requests(batching, tiny_model_dirs, tmp_path,
                                                       monkeypatch, caplog) -> None:
    poison = 7  # a token id only the poisoned request carries
    if batching == "core":
        real_step = EngineCore.step

        def core_step(self):
            if any(poison in row.tokens for row in (*self.running, *self.waiting)):
                raise RuntimeError("simulated device failure")
            return real_step(self)

        monkeypatch.setattr(EngineCore, "step", core_step)
    else:
        real = generation.run_batch

        def run_batch(model, tokenizer, rows, **kw):
            if any(poison in row.prompt_ids for row in rows):
                raise RuntimeError("simulated device failure")
            return real(model, tokenizer, rows, **kw)

        monkeypatch.setattr(generation, "run_batch", run_batch)
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=1, batching=batching)
    try:
        bad = GenerationRequest(request_id="bad", prompt_ids=(1, poison), adapter_id=None)
        with caplog.at_level(logging.ERROR):
            outcomes = await asyncio.gather(eng.generate(bad),
                                            eng.generate(request(eng, "Hi!", None)),
                                            return_exceptions=True)
        assert isinstance(outcomes[0], GenerationError)
        assert "RuntimeError" in str(outcomes[0]) and "RuntimeError" in caplog.text
        assert outcomes[1].completion_tokens == 8
        assert (await eng.generate(request(eng, "ok", None))).completion_tokens == 8
        assert eng.is_ready() and eng.stats()["in_flight"] == 0
    finally:
        await eng.aclose(10)


async def test_a_failing_step_fails_the_running_rows_and_the_engine_goes_on(
        tiny_model_dirs, tmp_path, monkeypatch) -> None:
    """The engine core: a model error mid-decode fails the rows of that step (their slots are
    not trusted) and only them; the next requests start in clean slots."""
    real_step = EngineCore.step
    armed, failed = threading.Event(), threading.Event()

    def step(self):
        decoding = sum(r.drawn > 0 for r in self.running)
        if armed.is_set() and decoding == 2 and not failed.is_set():
            failed.set()
            raise RuntimeError("simulated device failure")
        return real_step(self)

    monkeypatch.setattr(EngineCore, "step", step)
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_wait_ms=200)
    armed.set()  # after the startup probe, which steps a two-row batch too
    try:
        outcomes = await asyncio.gather(
            *(eng.generate(request(eng, t, None, max_new_tokens=6)) for t in ("Hi!", "abc")),
            return_exceptions=True)
        assert failed.is_set()
        assert all(isinstance(o, GenerationError) and "simulated" in str(o) for o in outcomes)
        after = await asyncio.gather(*(eng.generate(request(eng, t, None, max_new_tokens=6))
                                       for t in ("Hi!", "abc")))
        assert [r.completion_tokens for r in after] == [6, 6]
        assert eng.is_ready() and eng.stats()["in_flight"] == 0
    finally:
        await eng.aclose(10)


@pytest.mark.parametrize("batching", ["static", "core"])
async def test_batches_are_bounded_and_fifo(batching, tiny_model_dirs, tmp_path) -> None:
    observer = RecordingObserver()
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, observer=observer, max_batch_size=3,
                      max_wait_ms=500, batching=batching)
    try:
        order: list[int] = []

        async def one(i: int) -> int:
            result = await eng.generate(request(eng, "Hi!", None, max_new_tokens=3))
            order.append(i)
            return result.completion_tokens

        made = await asyncio.gather(*(one(i) for i in range(7)))
        await until(lambda: len(observer.finished) == len(observer.batches))
        assert all(size <= 3 for size, _ in observer.batches)
        assert sum(tokens for _, _, tokens in observer.finished) == sum(made)
        if batching == "static":  # the engine core reports every step as a batch
            assert sum(size for size, _ in observer.batches) == 7
        assert order[:3] == sorted(order[:3]) and set(order[:3]) == {0, 1, 2}
        assert observer.queue_waits == 7 and observer.first_tokens == 7
    finally:
        await eng.aclose(10)


def test_fifo_policy_takes_the_oldest_first() -> None:
    class T:
        def __init__(self, seq: int) -> None:
            self.seq = seq

    picked = FifoPolicy().select([T(5), T(2), T(9), T(1)], 2)
    assert [t.seq for t in picked] == [1, 2]


async def test_sampled_output_with_seed_is_independent_of_batch_mates(gated) -> None:
    eng, _ = gated
    params = {"temperature": 0.9, "top_p": 0.9, "seed": 1234, "max_new_tokens": 8}
    alone = await eng.generate(request(eng, "Hi!", "warm", **params))
    mates = await asyncio.gather(
        eng.generate(request(eng, "Hi!", "warm", **params)),
        *(eng.generate(request(eng, t, None, max_new_tokens=5)) for t in ("abc", "de")))
    assert mates[0].token_ids == alone.token_ids
    assert SamplingParams(**params).seed == 1234


def _long(eng, text: str, tenant: str, tokens: int):
    return request(eng, text, None, namespace=tenant, max_new_tokens=tokens, ignore_eos=True)


@pytest.mark.parametrize("policy", ["fair", "fifo"])
async def test_a_full_batch_makes_room_for_another_tenant(policy, tiny_model_dirs,
                                                          tmp_path) -> None:
    """Tenant a's long rows fill the batch. With the fair (default) policy tenant b's short
    request preempts one of them and is answered while a's rows are still decoding; the
    preempted row then resumes where it stopped (recomputed from its tokens) and every output
    equals its output alone. FIFO makes b wait for a's rows."""
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=2, max_wait_ms=50,
                      policy=FifoPolicy() if policy == "fifo" else None)
    try:
        texts = ("abc", "de")
        alone = [await eng.generate(_long(eng, t, "a", 120)) for t in texts]
        a_tasks = [asyncio.ensure_future(eng.generate(_long(eng, t, "a", 120))) for t in texts]
        await until(lambda: eng.stats()["in_flight"] == 2 and eng.stats()["queue_depth"] == 0)
        parked: list[float] = []
        b_task = asyncio.ensure_future(eng.generate(_long(eng, "Hi!", "b", 4)))
        while not b_task.done():
            parked.append(eng.stats()["parked"])
            await asyncio.sleep(0.001)
        assert b_task.result().completion_tokens == 4
        b_first = not any(t.done() for t in a_tasks)
        results = await asyncio.gather(*a_tasks)
        assert [r.token_ids for r in results] == [r.token_ids for r in alone]
        if policy == "fair":
            assert b_first and max(parked) == 1
        else:
            assert not b_first and max(parked) == 0
        assert eng.stats()["parked"] == 0 and eng.stats()["in_flight"] == 0
    finally:
        await eng.aclose(10)


@pytest.mark.parametrize("rows", [2, 0])
async def test_beside_another_tenant_a_flood_is_held_to_its_contended_cap(
        rows, tiny_model_dirs, tmp_path) -> None:
    """--contended-tenant-rows 2: while b has a row running, a's flood runs 2 rows and queues
    the rest, leaving slots free; 0 (the default) turns the cap off and a takes the 7 free
    slots. Once b has been gone for the window (a second), a fills the batch."""
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=8, max_wait_ms=1,
                      contended_tenant_rows=rows)
    tasks: list[asyncio.Future] = []
    try:
        b_task = asyncio.ensure_future(eng.generate(_long(eng, "Hi!", "b", 480)))
        tasks.append(b_task)
        await until(lambda: eng.tenant_stats().get("b", {}).get("running") == 1)
        tasks += [asyncio.ensure_future(eng.generate(_long(eng, "abc", "a", 480)))
                  for _ in range(12)]
        capped = 2 if rows == 2 else 7

        def a_rows() -> dict[str, int]:
            return eng.tenant_stats().get("a", {})

        await until(lambda: a_rows().get("running") == capped)
        await asyncio.sleep(0.2)  # and it stays there, with slots free
        assert a_rows() == {"running": capped, "queued": 12 - capped}
        assert eng.tenant_stats()["b"] == {"running": 1, "queued": 0}
        b_task.cancel()
        await until(lambda: a_rows().get("running") == 8)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await eng.aclose(10)


@pytest.mark.parametrize("rows", [2, 8])
async def test_a_static_batch_formed_beside_another_tenant_holds_the_cap(
        rows, tiny_model_dirs, tmp_path) -> None:
    """Static batching forms its batch through the same policy: b's request and twelve of
    a's arrive together, and the first batch is b's row and 2 of a's (--contended-tenant-rows
    2), or 8 rows with the cap off (8, the whole batch). Every request is still answered."""
    observer = RecordingObserver()
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, observer=observer, max_batch_size=8,
                      max_wait_ms=200, batching="static", contended_tenant_rows=rows)
    try:
        requests = [_long(eng, "Hi!", "b", 4)] + [_long(eng, "abc", "a", 4) for _ in range(12)]
        results = await asyncio.gather(*(eng.generate(r) for r in requests))
        assert [r.completion_tokens for r in results] == [4] * 13
        assert observer.batches[0][0] == (3 if rows == 2 else 8), observer.batches
    finally:
        await eng.aclose(10)


async def test_a_preempted_request_can_be_aborted(tiny_model_dirs, tmp_path) -> None:
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=2, max_wait_ms=50)
    try:
        a_tasks = [asyncio.ensure_future(eng.generate(_long(eng, t, "a", 400)))
                   for t in ("abc", "de")]
        await until(lambda: eng.stats()["in_flight"] == 2 and eng.stats()["queue_depth"] == 0)
        b_task = asyncio.ensure_future(eng.generate(_long(eng, "Hi!", "b", 300)))
        await until(lambda: eng.stats()["parked"] == 1)
        parked = a_tasks[1]  # the newest of a's rows is the one preempted
        parked.cancel()
        await until(lambda: eng.stats()["parked"] == 0)
        assert eng.stats()["in_flight"] == 2 and not b_task.done()
        assert (await b_task).completion_tokens == 300
        assert (await a_tasks[0]).completion_tokens == 400
        with pytest.raises(asyncio.CancelledError):
            await parked
        assert eng.stats()["in_flight"] == 0
    finally:
        await eng.aclose(10)


def _record_steps(monkeypatch) -> list[StepStats]:
    """Every step the engine core takes from now on, as its StepStats."""
    steps: list[StepStats] = []
    real_step = EngineCore.step

    def step(self):
        out = real_step(self)
        steps.append(self.last)
        return out

    monkeypatch.setattr(EngineCore, "step", step)
    return steps


async def test_long_prompts_join_a_running_row_a_token_budget_at_a_time(
        tiny_model_dirs, tmp_path, monkeypatch) -> None:
    """--max-batch-tokens: each step computes at most that many tokens, the running row's
    decode first, so a burst of long prompts (one longer than the whole budget) is prefilled
    in chunks over several steps while the running row takes a token at every one of them.
    Each still answers as it would alone."""
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=8, max_wait_ms=1,
                      max_batch_tokens=24)
    try:
        texts = [f"a long prompt of about forty tokens, number {i}." for i in range(3)]
        texts.append("a long prompt that goes on and on, " * 5)
        lengths = [len(eng.tokenize(t)) for t in texts]
        assert min(lengths) > 24 and max(lengths) > 150
        alone = [await eng.generate(request(eng, t, None, max_new_tokens=3)) for t in texts]
        running = asyncio.ensure_future(eng.generate(
            request(eng, "Hi!", None, max_new_tokens=400, ignore_eos=True)))
        await until(lambda: eng.stats()["in_flight"] == 1 and eng.stats()["queue_depth"] == 0)
        steps = _record_steps(monkeypatch)
        burst = await asyncio.gather(*(eng.generate(request(eng, t, None, max_new_tokens=3))
                                       for t in texts))
        assert [r.token_ids for r in burst] == [r.token_ids for r in alone]
        assert not running.done()
        prefilling = [s for s in steps if s.prefill_tokens]
        assert all(s.decodes + s.prefill_tokens <= 24 for s in steps)
        assert all(s.decodes >= 1 for s in prefilling)  # the running row never waits a step
        assert len(prefilling) >= -(-sum(lengths) // 23)  # ceil(prompts / room per step)
        assert (await running).completion_tokens == 400
    finally:
        await eng.aclose(10)


async def test_requests_in_flight_are_counted_per_tenant_and_state(gated) -> None:
    """engine.tenant_stats() and the softprompt_tenant_requests gauge it feeds: who waits and
    who holds the batch, by tenant."""
    from prometheus_client import generate_latest

    from server.api.metrics import ApiMetrics
    from tests.e2e.server_process import metric

    eng, gate = gated
    assert eng.tenant_stats() == {}
    cold = asyncio.ensure_future(eng.generate(request(eng, "Hi!", "cold")))  # tenant t1
    running = asyncio.ensure_future(eng.generate(
        request(eng, "Hi!", None, namespace="t2", max_new_tokens=300, ignore_eos=True)))
    await until(lambda: eng.tenant_stats().get("t2", {}).get("running") == 1)
    assert eng.tenant_stats() == {"t1": {"queued": 1, "running": 0},
                                  "t2": {"queued": 0, "running": 1}}
    metrics = ApiMetrics()
    metrics.bind_engine(eng)
    text = generate_latest(metrics.registry).decode()
    assert metric(text, "softprompt_tenant_requests", {"tenant": "t1", "state": "queued"}) == 1
    assert metric(text, "softprompt_tenant_requests", {"tenant": "t2", "state": "running"}) == 1
    gate.set()
    await asyncio.gather(cold, running)
    assert eng.tenant_stats() == {}
