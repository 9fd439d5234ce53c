"""RemoteEngine (--engine-process) against real engine processes: a tiny Llama saved to disk,
real PEFT adapters uploaded through the pipe, the same checks test_engine.py makes in process.

A child costs ~5 s to start, so these tests share one module-scoped engine (each test uses its
own tenant namespace); test_remote_lifecycle.py has the ones that need a child of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_store.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigInvalidError,
    InvalidAdapterIdError,
)
from adapters_store.records import PeftType
from server.config import Device, Settings
from server.engine.errors import InvalidRequestError, RequestTooLongError
from server.engine.factory import build_engine
from server.engine.interface import (
    AdapterUpload,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
)
from server.engine.observer import CacheEvent
from server.engine.remote import RemoteEngine
from server.engine.worker import ForwardingObserver
from tests.engine import test_engine as in_process
from tests.engine.test_engine import (
    ADAPTERS,
    RecordingObserver,
    request,
    until,
    upload_of,
)
from tests.factories import load_peft_reference, reference_greedy

llama_adapters = in_process.llama_adapters  # the PEFT adapters test_engine.py serves, shared

LONG = 480  # new tokens: ~1 s of decoding on the CPU, so a request is still running when poked


class TenantRecorder(RecordingObserver):
    """RecordingObserver that also keeps which tenant each per-request event was for."""

    def __init__(self) -> None:
        super().__init__()
        self.tenant_events: list[tuple[str, str]] = []

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        super().queue_wait(seconds, tenant=tenant)
        self.tenant_events.append(("queue_wait", tenant))

    def first_token(self, seconds: float, *, tenant: str) -> None:
        super().first_token(seconds, tenant=tenant)
        self.tenant_events.append(("first_token", tenant))


def remote_settings(model_dir: Path, tmp_path: Path, **settings_kw: Any) -> Settings:
    """make_engine's settings, with the engine in a child process."""
    return Settings(model=str(model_dir), store=str(tmp_path / "store"),
                    model_cache=tmp_path / "model-cache", device=Device.CPU,
                    engine_process=True, **settings_kw)


def start_remote(settings: Settings, *, observer: RecordingObserver | None = None
                 ) -> RemoteEngine:
    engine = build_engine(settings, observer=observer)
    assert isinstance(engine, RemoteEngine)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def observer() -> TenantRecorder:
    return TenantRecorder()


@pytest.fixture(scope="module")
def remote(tiny_model_dirs, tmp_path_factory, llama_adapters,
           observer) -> Iterator[RemoteEngine]:
    """One engine process for the module, every adapter uploaded to tenant t1 through it."""
    engine = start_remote(remote_settings(tiny_model_dirs["llama"],
                                          tmp_path_factory.mktemp("remote"),
                                          max_batch_size=4, max_wait_ms=50),
                          observer=observer)
    try:
        engine.wait_until_ready(60)

        async def upload_all() -> None:
            for name, path in llama_adapters.items():
                await engine.add_adapter("t1", name, upload_of(path))

        asyncio.run(upload_all())
        yield engine
    finally:
        engine.shutdown(10)


async def settled(engine: RemoteEngine, observer: RecordingObserver) -> None:
    """Nothing in flight as of a snapshot taken after now, and every batch's report in.

    The engine process sends a snapshot of its gauges, then waits before taking the next: of
    the snapshots that arrive from now on, the second was taken after the first was sent.
    Counted by arrival (each replaces the engine's stats), not by how long it has been."""
    arrived, last = 0, engine._stats

    def fresh_and_settled() -> bool:
        nonlocal arrived, last
        if engine._stats is not last:
            arrived, last = arrived + 1, engine._stats
        return (arrived >= 2 and engine.stats().get("in_flight") == 0
                and len(observer.finished) == len(observer.batches))

    await until(fresh_and_settled)


async def first_token_of(observer: TenantRecorder, tenant: str) -> None:
    await until(lambda: ("first_token", tenant) in observer.tenant_events)


def generated_since(observer: RecordingObserver, mark: int) -> int:
    return sum(made for _, _, made in observer.finished[mark:])


# ---- generation -------------------------------------------------------------------------------


async def test_build_engine_starts_a_ready_child_with_the_model(remote) -> None:
    assert remote.is_ready()
    assert remote._process is not None and remote._process.poll() is None
    assert remote._process.pid != os.getpid()
    info = remote.model_info
    assert (info.architecture, info.hidden_size, info.max_context) == ("LlamaForCausalLM", 64,
                                                                      512)
    assert remote.batching == "core"
    await until(lambda: remote.stats().get("stored_adapters", 0) >= len(ADAPTERS))
    assert remote.stats()["queue_capacity"] == 1024


async def test_concurrent_mixed_requests_equal_peft_alone(remote, observer, tiny_model_dirs,
                                                          llama_adapters) -> None:
    names = [None, *llama_adapters]
    texts = ("Tweet: I love it. Label:", "a", "The quick brown fox jumps", "Hi!", "naïve café")
    cases = [(texts[i % len(texts)], names[i % len(names)], 5 + i % 4) for i in range(8)]
    mark = len(observer.batches)
    results = await asyncio.gather(*(remote.generate(request(remote, t, n, max_new_tokens=m))
                                     for t, n, m in cases))
    refs = {n: load_peft_reference(tiny_model_dirs["llama"], llama_adapters.get(n))
            for n in names}
    virtual = {name: n for name, _, n, _ in ADAPTERS}
    for (text, name, max_new), result in zip(cases, results, strict=True):
        assert list(result.token_ids) == reference_greedy(refs[name], remote.tokenize(text),
                                                          max_new), (text, name)
        assert result.adapter_id == name
        assert (result.prompt_tokens, result.virtual_tokens) == (
            len(remote.tokenize(text)), virtual.get(name, 0))
        assert result.text == remote.detokenize(list(result.token_ids))
    assert max(size for size, _ in observer.batches[mark:]) > 1  # they did share batches


async def test_stream_yields_chunks_then_one_result_matching_generate(remote) -> None:
    stream = await remote.open_stream(request(remote, "Hi!", "mlp6", max_new_tokens=10,
                                              ignore_eos=True))
    items = [item async for item in stream]
    chunks, final = items[:-1], items[-1]
    assert chunks and all(isinstance(c, TokenChunk) for c in chunks)
    assert isinstance(final, GenerationResult) and final.finish_reason == FinishReason.LENGTH
    assert sum((c.token_ids for c in chunks), ()) == final.token_ids
    assert "".join(c.text for c in chunks) == final.text
    plain = await remote.generate(request(remote, "Hi!", "mlp6", max_new_tokens=10,
                                          ignore_eos=True))
    assert plain.token_ids == final.token_ids and plain.virtual_tokens == 6


async def test_a_request_the_in_process_engine_serves_is_served(remote) -> None:
    """In process this gives 8 tokens (see test_wire); the engine process must not answer it
    with EngineNotReadyError ("the engine process is gone") while it is alive and well."""
    result = await remote.generate(request(remote, "Hi!", None, max_new_tokens=8,
                                           ignore_eos=True, stop=("\ud800",)))
    assert result.completion_tokens == 8


async def test_a_non_finite_temperature_crosses_the_pipe_and_is_refused_there(remote) -> None:
    """JSON's Infinity reaches the child intact and is refused as in process (422), never
    taken for a dead engine process."""
    with pytest.raises(InvalidRequestError, match="temperature"):
        await remote.generate(request(remote, "Hi!", None, temperature=float("inf")))


# ---- errors -----------------------------------------------------------------------------------


async def test_unknown_adapter_is_not_found_for_generate_and_before_a_stream_opens(remote):
    with pytest.raises(AdapterNotFoundError):
        await remote.generate(request(remote, "Hi!", "missing"))
    with pytest.raises(AdapterNotFoundError):
        await remote.open_stream(request(remote, "Hi!", "missing"))
    with pytest.raises(AdapterNotFoundError):  # adapters are per namespace
        await remote.generate(request(remote, "Hi!", "pt3", namespace="t2"))


async def test_requests_the_model_cannot_run_are_refused_with_the_engines_classes(remote):
    with pytest.raises(InvalidRequestError, match=r"\[0, "):
        await remote.generate(GenerationRequest(request_id="oov", prompt_ids=(1, 999),
                                                adapter_id=None))
    with pytest.raises(InvalidRequestError):
        await remote.open_stream(GenerationRequest(request_id="empty", prompt_ids=(),
                                                   adapter_id=None))
    with pytest.raises(RequestTooLongError, match="512"):
        await remote.generate(request(remote, "Hi!", "pt3", max_new_tokens=600))
    with pytest.raises(InvalidRequestError):
        await remote.generate(request(remote, "Hi!", None, top_p=0.0))
    # The pipe still serves after the refusals.
    assert (await remote.generate(request(remote, "Hi!", None, max_new_tokens=2,
                                          ignore_eos=True))).completion_tokens == 2


async def test_a_request_id_in_flight_is_refused_as_an_invalid_request(remote) -> None:
    """In process (Scheduler.submit) this is an InvalidRequestError (422); a bare ValueError
    would reach the HTTP edge's catch-all as a 500."""
    first = request(remote, "Hi!", None, max_new_tokens=20, ignore_eos=True)
    pending = asyncio.ensure_future(remote.generate(first))
    await asyncio.sleep(0)
    try:
        with pytest.raises(InvalidRequestError, match="already in flight"):
            await remote.generate(first)
    finally:
        assert (await pending).completion_tokens == 20


async def test_invalid_uploads_fail_with_the_stores_classes(remote, llama_adapters,
                                                            tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    shutil.copy(llama_adapters["pt3"] / "adapter_model.safetensors", bad)
    with pytest.raises(ConfigInvalidError):
        await remote.add_adapter("t1", "bad", upload_of(bad))
    with pytest.raises(InvalidAdapterIdError):
        await remote.add_adapter("t1", "../escape", upload_of(llama_adapters["pt3"]))
    with pytest.raises(AdapterExistsError):
        await remote.add_adapter("t1", "pt3", upload_of(llama_adapters["pt5"]))
    with pytest.raises(AdapterNotFoundError):
        await remote.get_adapter("t1", "bad")


# ---- aborts -----------------------------------------------------------------------------------


async def test_cancelling_a_generate_stops_its_row(remote, observer) -> None:
    await settled(remote, observer)
    mark = len(observer.finished)
    task = asyncio.ensure_future(remote.generate(request(
        remote, "a", None, namespace="abort-gen", max_new_tokens=LONG, ignore_eos=True)))
    await first_token_of(observer, "abort-gen")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(remote, observer)
    assert generated_since(observer, mark) < LONG
    assert "abort-gen" not in remote.tenant_stats()


@pytest.mark.parametrize("close", ["aclose", "drop"])
async def test_closing_a_stream_early_stops_its_row(remote, observer, close) -> None:
    """aclose(), or dropping the stream unclosed (a `break` out of `async for`)."""
    await settled(remote, observer)
    mark = len(observer.finished)
    stream = await remote.open_stream(request(remote, "a", "pt3", namespace="t1",
                                              max_new_tokens=LONG, ignore_eos=True))
    first = [await stream.__anext__() for _ in range(2)]
    assert all(isinstance(c, TokenChunk) for c in first)
    if close == "aclose":
        await stream.aclose()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    else:
        del stream
        gc.collect()
    await settled(remote, observer)
    assert generated_since(observer, mark) < LONG


async def test_a_stop_string_found_in_this_process_stops_the_row_in_the_engine_process(
        remote, observer) -> None:
    """The engine process sends token ids only; the text, and so the stop string, is found
    here, and the abort goes back down the pipe: the row stops well before its LONG tokens."""
    full = await remote.generate(request(remote, "a", "pt3", namespace="t1",
                                         max_new_tokens=40, ignore_eos=True))
    stop = in_process.first_new_char(full.text)
    await settled(remote, observer)
    mark = len(observer.finished)

    result = await remote.generate(request(remote, "a", "pt3", namespace="t1",
                                           max_new_tokens=LONG, ignore_eos=True,
                                           stop=(stop,)))

    assert result.finish_reason is FinishReason.STOP
    assert result.text == full.text[:full.text.index(stop)]
    assert result.token_ids == full.token_ids[:len(result.token_ids)]
    assert result.completion_tokens == len(result.token_ids)
    await settled(remote, observer)
    assert generated_since(observer, mark) < LONG // 4


async def test_abort_by_id_ends_the_waiting_generate_like_in_process(remote, observer) -> None:
    """In process, abort(request_id) cancels the ticket's future, so the awaiting generate
    raises CancelledError. Here it must not wait forever."""
    req = request(remote, "a", None, namespace="abort-id", max_new_tokens=LONG,
                  ignore_eos=True)
    task = asyncio.ensure_future(remote.generate(req))
    await first_token_of(observer, "abort-id")
    await remote.abort(req.request_id)
    try:
        await asyncio.wait({task}, timeout=60)  # done at once; the bound is for a hang only
        assert task.cancelled()
    finally:
        task.cancel()
        await settled(remote, observer)


async def test_a_request_id_can_be_used_again_once_its_request_was_cancelled(remote,
                                                                            observer) -> None:
    """In process an aborted id leaves the scheduler at once and may be submitted again (a
    client retrying with its own id). The first request's late "cancelled" from the engine
    process must not end the second one."""
    first = request(remote, "a", None, namespace="reuse", max_new_tokens=LONG, ignore_eos=True)
    task = asyncio.ensure_future(remote.generate(first))
    await first_token_of(observer, "reuse")
    again = dataclasses.replace(first, params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    task.cancel()
    # Runs in the loop pass right after the cancelled generate sends its abort, long before
    # the engine process can answer it: in process the id is free by then.
    retry = asyncio.ensure_future(remote.generate(again))
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(60):
            result = await retry
        assert result.completion_tokens == 4
    finally:
        retry.cancel()
        await settled(remote, observer)


# ---- adapters ---------------------------------------------------------------------------------


async def test_adapter_lifecycle_through_the_pipe(remote, llama_adapters,
                                                  tiny_model_dirs) -> None:
    record = await remote.add_adapter("life", "a1", upload_of(llama_adapters["pt3"]))
    assert (record.namespace, record.adapter_id, record.peft_type,
            record.num_virtual_tokens, record.token_dim) == ("life", "a1",
                                                             PeftType.PROMPT_TUNING, 3, 64)
    assert await remote.get_adapter("life", "a1") == record
    assert await remote.list_adapters("life") == [record]
    assert await remote.list_adapters("life-other") == []
    assert record in await remote.list_adapters(None)
    assert [r.adapter_id for r in await remote.list_adapters("t1")] == sorted(
        name for name, *_ in ADAPTERS)
    first = await remote.generate(request(remote, "Hi!", "a1", namespace="life"))
    assert first.virtual_tokens == 3

    replaced = await remote.add_adapter("life", "a1", upload_of(llama_adapters["lstm4"]),
                                        overwrite=True)
    assert (replaced.peft_type, replaced.num_virtual_tokens) == (PeftType.P_TUNING, 4)
    second = await remote.generate(request(remote, "Hi!", "a1", namespace="life"))
    ref = load_peft_reference(tiny_model_dirs["llama"], llama_adapters["lstm4"])
    assert list(second.token_ids) == reference_greedy(ref, remote.tokenize("Hi!"), 8)
    assert second.virtual_tokens == 4  # the cached prompt of the old upload was invalidated

    await remote.delete_adapter("life", "a1")
    with pytest.raises(AdapterNotFoundError):
        await remote.generate(request(remote, "Hi!", "a1", namespace="life"))
    with pytest.raises(AdapterNotFoundError):
        await remote.get_adapter("life", "a1")
    with pytest.raises(AdapterNotFoundError):
        await remote.delete_adapter("life", "a1")
    assert await remote.list_adapters("life") == []


async def test_an_upload_spooled_as_an_archive_is_accepted(remote, llama_adapters,
                                                           tmp_path) -> None:
    """AdapterUpload's other form crosses too (the path is read by the engine process)."""
    import tarfile

    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in llama_adapters["pt3"].iterdir():
            tar.add(f, arcname=f.name)
    upload = AdapterUpload(archive_path=str(archive), archive_name="a.tar.gz")
    record = await remote.add_adapter("arch", "a", upload)
    assert (record.adapter_id, record.num_virtual_tokens) == ("a", 3)


# ---- observer and gauges ----------------------------------------------------------------------


async def test_observer_events_arrive_before_the_result(remote, observer,
                                                        llama_adapters) -> None:
    await remote.add_adapter("obs", "cold", upload_of(llama_adapters["pt5"]))
    loads, misses = observer.loads, observer.cache.count(CacheEvent.MISS)
    batches = len(observer.batches)
    result = await remote.generate(request(remote, "Hi!", "cold", namespace="obs",
                                           max_new_tokens=3))
    # No waiting: they were sent before the result, and replayed as they came in.
    assert ("queue_wait", "obs") in observer.tenant_events
    assert ("first_token", "obs") in observer.tenant_events
    assert len(observer.batches) > batches
    assert observer.loads == loads + 1  # adapter_loaded: a cold adapter was loaded
    assert observer.cache.count(CacheEvent.MISS) == misses + 1  # ...and a CacheEvent again
    assert result.virtual_tokens == 5


async def test_tenant_weights_read_at_submit_decide_the_batch(remote, observer) -> None:
    """Both tenants want all 4 slots; with weights 3:1 wa runs 3 rows and wb 1 (2:2
    unweighted), as the tenant gauges the engine process pushes show. Whether wb's requests
    reach the engine before its first batch or just after depends on timing: after, wb
    takes its share by parking wa's rows, which the gauges still count as running."""
    asked: list[str] = []

    def weight_of(tenant: str) -> float:
        asked.append(tenant)
        return 3.0 if tenant == "wa" else 1.0

    remote.set_tenant_weights(weight_of)
    tasks = [asyncio.ensure_future(remote.generate(request(
        remote, "a", None, namespace=ns, max_new_tokens=LONG, ignore_eos=True)))
        for ns in ("wa",) * 8 + ("wb",) * 8]
    try:
        def settled_shares() -> tuple[int, int] | None:
            """Rows decoding per tenant, once the 4 slots are shared: only wa's rows are
            ever parked (wa came first), so wa's decoding rows are its count less those."""
            parked, tenants = int(remote.stats().get("parked", 0)), remote.tenant_stats()
            wa, wb = (tenants.get(ns, {}).get("running", 0) for ns in ("wa", "wb"))
            shares = (wa - parked, wb)
            return shares if sum(shares) == 4 and all(n > 0 for n in shares) else None

        async with asyncio.timeout(60):
            while (shares := settled_shares()) is None:
                await asyncio.sleep(0.01)
        assert shares == (3, 1), remote.tenant_stats()
        assert sorted(set(asked)) == ["wa", "wb"] and len(asked) == 16
    finally:
        remote.set_tenant_weights(lambda _tenant: 1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settled(remote, observer)


def test_forwarding_observer_queues_events_in_order_until_taken() -> None:
    events = ForwardingObserver()
    events.queue_wait(0.5, tenant="a")
    events.batch_started(size=2, distinct_adapters=1)
    events.cache_event(CacheEvent.MISS)
    assert events.take() == [["queue_wait", 0.5, "a"], ["batch_started", 2, 1],
                             ["cache_event", "miss"]]
    assert events.take() == []
