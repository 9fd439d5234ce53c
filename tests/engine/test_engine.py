"""Engine end to end, in process: real tiny models, real PEFT adapters uploaded through the store.

Helpers here (make_engine, upload, request, RecordingObserver) are reused by test_scheduler.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from pathlib import Path

import pytest

from adapters_store import LocalAdapterStore
from adapters_store.errors import AdapterExistsError, AdapterNotFoundError
from server.config import Device, Settings
from server.engine.engine import Engine
from server.engine.errors import EngineNotReadyError, InvalidRequestError, RequestTooLongError
from server.engine.factory import build_engine
from server.engine.interface import (
    AdapterUpload,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
)
from server.engine.observer import CacheEvent, NullObserver
from tests.factories import (
    greedy_by_recomputation,
    load_base,
    load_peft_reference,
    make_adapter,
    peft_prompt,
    reference_greedy,
    templated_reference,
)

_ids = itertools.count()


class RecordingObserver(NullObserver):
    """Keeps every event so tests can assert on what the engine reported."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.cache: list[CacheEvent] = []
        self.loads = 0
        self.first_tokens = 0
        self.queue_waits = 0
        self.finished: list[tuple[int, int, int]] = []

    def batch_finished(self, *, size: int, steps: int, generated_tokens: int) -> None:
        self.finished.append((size, steps, generated_tokens))

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        self.batches.append((size, distinct_adapters))

    def cache_event(self, event: CacheEvent) -> None:
        self.cache.append(event)

    def adapter_loaded(self, seconds: float) -> None:
        self.loads += 1

    def first_token(self, seconds: float, *, tenant: str) -> None:
        self.first_tokens += 1

    def queue_wait(self, seconds: float, *, tenant: str) -> None:
        self.queue_waits += 1


def make_engine(model_dir: Path, tmp_path: Path, *, store: LocalAdapterStore | None = None,
                observer: RecordingObserver | None = None, policy=None,
                **settings_kw) -> Engine:
    settings = Settings(model=str(model_dir), store=str(tmp_path / "store"),
                        model_cache=tmp_path / "model-cache", device=Device.CPU, **settings_kw)
    engine = Engine(settings, store or LocalAdapterStore(settings.store), observer=observer,
                    policy=policy)
    engine.start()
    engine.wait_until_ready(60)
    return engine


def upload_of(adapter_dir: Path) -> AdapterUpload:
    return AdapterUpload(config_path=str(adapter_dir / "adapter_config.json"),
                         weights_path=str(adapter_dir / "adapter_model.safetensors"),
                         weights_name="adapter_model.safetensors")


def request(engine: Engine, text: str, adapter_id: str | None, *, namespace: str = "t1",
            **params) -> GenerationRequest:
    params.setdefault("max_new_tokens", 8)
    return GenerationRequest(request_id=f"r{next(_ids)}", prompt_ids=tuple(engine.tokenize(text)),
                             adapter_id=adapter_id, namespace=namespace,
                             params=SamplingParams(**params))


async def until(predicate, timeout: float = 60.0) -> None:
    """Poll (the engine thread updates gauges asynchronously); the bound is for a hang only."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# (name, kind, num_virtual_tokens, seed)
ADAPTERS = (("pt3", "prompt_tuning", 3, 1), ("mlp6", "p_tuning_mlp", 6, 2),
            ("pt5", "prompt_tuning", 5, 3), ("lstm4", "p_tuning_lstm", 4, 4))


@pytest.fixture(scope="module")
def llama_adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-adapters")
    return {name: make_adapter(tiny_model_dirs["llama"], root / name, kind,
                               num_virtual_tokens=n, seed=seed)
            for name, kind, n, seed in ADAPTERS}


@pytest.fixture(params=["static", "core"])
async def engine(request, tiny_model_dirs, tmp_path, llama_adapters):
    observer = RecordingObserver()
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, observer=observer, max_wait_ms=200,
                      max_batch_size=16, batching=request.param)
    assert eng.batching == request.param
    for name, path in llama_adapters.items():
        await eng.add_adapter("t1", name, upload_of(path))
    yield eng
    await eng.aclose(10)


TEXTS = ("Tweet: I love it. Label:", "a", "The quick brown fox jumps", "Hi!", "naïve café")


async def test_concurrent_mixed_requests_equal_peft_alone(engine, tiny_model_dirs,
                                                          llama_adapters) -> None:
    names = [None, *llama_adapters]
    cases = [(TEXTS[i % len(TEXTS)], names[i % len(names)], 5 + i % 4) for i in range(10)]
    # Warm the cache so all ten are ready together and share batches.
    await asyncio.gather(*(engine.generate(request(engine, "x", n)) for n in llama_adapters))
    engine._observer.batches.clear()
    engine._observer.inner.queue_waits = 0
    results = await asyncio.gather(*(engine.generate(request(engine, t, n, max_new_tokens=m))
                                     for t, n, m in cases))
    refs = {n: load_peft_reference(tiny_model_dirs["llama"], llama_adapters.get(n))
            for n in names}
    for (text, name, max_new), result in zip(cases, results, strict=True):
        expected = reference_greedy(refs[name], engine.tokenize(text), max_new)
        assert list(result.token_ids) == expected, (text, name)
        assert result.adapter_id == name
        vt = 0 if name is None else dict((a[0], a[2]) for a in ADAPTERS)[name]
        assert (result.prompt_tokens, result.virtual_tokens) == (len(engine.tokenize(text)), vt)
    sizes = engine._observer.batches
    assert engine._observer.queue_waits == len(cases)  # each started once
    assert max(s for s, _ in sizes) > 1 and max(d for _, d in sizes) > 1  # batches mix


async def test_batch_finished_reports_steps_and_padding_of_mixed_lengths(engine) -> None:
    """Rows asking 2, 5 and 9 tokens start together and make 16 tokens. Static batching runs
    one 9-step batch of 3 rows (11 padding row-steps); the engine core reports every step as a
    batch of the rows still running, prefilling and drawing the first tokens in one forward:
    3, 3, 2, 2, 2, 1, 1, 1, 1, no padding."""
    observer = engine._observer
    lengths = (2, 5, 9)
    results = await asyncio.gather(*(
        engine.generate(request(engine, "Hi!", None, max_new_tokens=n, ignore_eos=True))
        for n in lengths))
    assert [r.completion_tokens for r in results] == list(lengths)
    await until(lambda: len(observer.finished) == len(observer.batches))
    if engine.batching == "static":
        assert observer.batches[-1][0] == 3  # max_wait_ms=200: one batch
        assert observer.finished[-1] == (3, 9, 16)
    else:
        assert [size for size, _, _ in observer.finished[-9:]] == [3, 3, 2, 2, 2, 1, 1, 1, 1]
        assert all(steps == 1 and made == size for size, steps, made in observer.finished)


def first_new_char(text: str) -> str:
    """A printable character of `text` (not its first) that does not occur before itself: a
    stop string whose first occurrence is a few tokens in."""
    for i, ch in enumerate(text):
        if i >= 2 and ch.isprintable() and not ch.isspace() and ch != "\ufffd" \
                and ch not in text[:i]:
            return ch
    raise AssertionError(f"no usable stop character in {text!r}; pick another prompt")


async def test_text_is_made_off_the_engine_thread_and_a_stop_found_there_ends_the_row(
        engine, monkeypatch) -> None:
    """The engine thread hands out token ids only; the frontend decodes them, finds the stop
    string, answers, and aborts the row, which stops computing (400 tokens were allowed)."""
    observer = engine._observer
    full = await engine.generate(request(engine, "a", "pt3", max_new_tokens=40,
                                         ignore_eos=True))
    stop = first_new_char(full.text)
    tok = engine._model().tokenizer
    threads: set[str] = set()
    real_decode = tok.decode

    def decode(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tok, "decode", decode)
    await until(lambda: len(observer.finished) == len(observer.batches))
    mark = len(observer.finished)

    stream = await engine.open_stream(request(engine, "a", "pt3", max_new_tokens=400,
                                              ignore_eos=True, stop=(stop,)))
    items = [item async for item in stream]
    plain = await engine.generate(request(engine, "a", "pt3", max_new_tokens=5,
                                          ignore_eos=True))

    result = items[-1]
    assert isinstance(result, GenerationResult)
    assert result.finish_reason is FinishReason.STOP
    assert result.text == full.text[:full.text.index(stop)]
    assert result.token_ids == full.token_ids[:len(result.token_ids)]
    assert plain.token_ids == full.token_ids[:5]
    assert threads and "engine" not in threads, threads
    await until(lambda: engine.stats()["in_flight"] == 0
                and len(observer.finished) == len(observer.batches))
    computed = sum(made for _, _, made in observer.finished[mark:])
    assert computed < 100, computed  # the stopped row, a few steps past its stop, and plain


async def test_a_short_row_is_answered_before_its_batch_mates_finish(engine) -> None:
    """The short row's result (and its stream's end) go out at the step it finished, and equal
    its output alone: static batching answers it from inside a batch that runs on to the
    longest row; the engine core lets it join the long row's steps and leave."""
    observer = engine._observer
    alone = await engine.generate(request(engine, "Hi!", "pt3", max_new_tokens=3))
    await until(lambda: len(observer.finished) == len(observer.batches))
    start = len(observer.finished)
    long_req = request(engine, "a", None, max_new_tokens=400, ignore_eos=True)
    long_task = asyncio.ensure_future(engine.generate(long_req))
    stream = await engine.open_stream(request(engine, "Hi!", "pt3", max_new_tokens=3))
    items = [item async for item in stream]
    assert not long_task.done()  # 397 steps still to go when the short row is answered
    assert engine.stats()["in_flight"] == 1
    short = items[-1]
    assert isinstance(short, GenerationResult)
    assert (short.token_ids, short.text, short.finish_reason) == (
        alone.token_ids, alone.text, alone.finish_reason)
    assert (await long_task).completion_tokens == 400
    await until(lambda: len(observer.finished) == len(observer.batches))
    if engine.batching == "static":
        assert observer.batches[-1][0] == 2  # they did share one batch
        # Results go out from inside the batch; the batch's own report follows it.
        assert observer.finished[-1] == (2, 400, 400 + len(short.token_ids))
    else:  # the short row joined the long row's steps and left; the long row went on alone
        steps = observer.finished[start:]
        assert sum(size for size, _, _ in steps) == 400 + len(short.token_ids)
        # The short row's prefill beside the long row's decode: one forward of 2 rows.
        assert max(size for size, _, _ in steps) == 2 and steps[-1][0] == 1


class BrokenObserver(NullObserver):
    """Every event raises: a metrics bug must not cost a single request."""

    def _boom(self, *args, **kwargs) -> None:
        raise RuntimeError("observer bug")

    batch_started = batch_finished = queue_wait = first_token = _boom
    cache_event = adapter_loaded = _boom


async def test_a_failing_observer_is_logged_and_never_fails_requests(tiny_model_dirs, tmp_path,
                                                                     llama_adapters, caplog):
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, observer=BrokenObserver())
    try:
        await eng.add_adapter("t1", "pt3", upload_of(llama_adapters["pt3"]))
        for _ in range(2):  # a cold load (miss, load) then a hit
            result = await eng.generate(request(eng, "Hi!", "pt3", max_new_tokens=4,
                                                ignore_eos=True))
            assert result.completion_tokens == 4
        assert (await eng.generate(request(eng, "a", None, max_new_tokens=2))).completion_tokens
    finally:
        await eng.aclose(10)
    failed = {r.getMessage().split()[2] for r in caplog.records if "observer" in r.getMessage()}
    assert {"BrokenObserver.adapter_loaded", "BrokenObserver.batch_started",
            "BrokenObserver.cache_event", "BrokenObserver.first_token"} <= failed


async def test_seq2seq_uses_only_the_encoder_half_of_the_stored_prompt(tiny_model_dirs,
                                                                       tmp_path) -> None:
    adapter = make_adapter(tiny_model_dirs["t5"], tmp_path / "t5-pt", "prompt_tuning",
                           num_virtual_tokens=4, seed=7)
    eng = make_engine(tiny_model_dirs["t5"], tmp_path)
    try:
        record = await eng.add_adapter("t1", "t5pt", upload_of(adapter))
        assert record.task_type == "SEQ_2_SEQ_LM"
        texts = ("Translate: hello", "b")
        got = await asyncio.gather(*(eng.generate(request(eng, t, a, max_new_tokens=6))
                                     for t in texts for a in ("t5pt", None)))
        refs = {a: load_peft_reference(tiny_model_dirs["t5"], adapter if a else None)
                for a in ("t5pt", None)}
        expected = [reference_greedy(refs[a], eng.tokenize(t), 6)
                    for t in texts for a in ("t5pt", None)]
        assert [list(r.token_ids) for r in got] == expected
        assert eng.stats()["cache_resident_bytes"] == 4 * 56 * 4  # n rows of 2n kept, f32
    finally:
        await eng.aclose(10)


async def test_stream_yields_chunks_then_one_result_matching_generate(engine) -> None:
    items = [item async for item in await engine.open_stream(
        request(engine, "Hi!", "pt3", max_new_tokens=10, ignore_eos=True))]
    chunks, final = items[:-1], items[-1]
    assert all(isinstance(c, TokenChunk) for c in chunks)
    assert isinstance(final, GenerationResult) and final.finish_reason == FinishReason.LENGTH
    assert sum((c.token_ids for c in chunks), ()) == final.token_ids
    assert "".join(c.text for c in chunks) == final.text
    plain = await engine.generate(request(engine, "Hi!", "pt3", max_new_tokens=10,
                                          ignore_eos=True))
    assert plain.token_ids == final.token_ids


async def test_new_upload_is_served_on_the_next_request_and_overwrite_replaces(
        engine, tiny_model_dirs, llama_adapters) -> None:
    first = await engine.generate(request(engine, "Hi!", "pt3"))
    assert engine._runtime.core.table.contains("t1", "pt3")
    with pytest.raises(AdapterExistsError):
        await engine.add_adapter("t1", "pt3", upload_of(llama_adapters["pt5"]))
    await engine.add_adapter("t1", "pt3", upload_of(llama_adapters["pt5"]), overwrite=True)
    assert not engine._runtime.core.table.contains("t1", "pt3")  # invalidated at once
    second = await engine.generate(request(engine, "Hi!", "pt3"))
    ref = load_peft_reference(tiny_model_dirs["llama"], llama_adapters["pt5"])
    assert list(second.token_ids) == reference_greedy(ref, engine.tokenize("Hi!"), 8)
    assert second.virtual_tokens == 5 and first.virtual_tokens == 3


async def test_overwrite_by_another_process_is_not_served_stale(engine, llama_adapters,
                                                               tmp_path) -> None:
    await engine.generate(request(engine, "Hi!", "pt3"))  # resident now
    other = LocalAdapterStore(tmp_path / "store")  # a second replica on the same store
    from adapters_store import ModelSpec, parse_directory
    parsed = parse_directory(llama_adapters["pt5"], spec=ModelSpec(token_dim=64))
    other.put("t1", "pt3", parsed, overwrite=True)
    result = await engine.generate(request(engine, "Hi!", "pt3"))
    assert result.virtual_tokens == 5
    entry = engine._runtime.core.table.lookup("t1", "pt3", _version(other, "pt3"))
    assert entry is not None and len(entry.ids) == 5


def _version(store: LocalAdapterStore, adapter_id: str) -> str:
    from server.engine.prompt_table import version_of
    return version_of(store.get_record("t1", adapter_id))


async def test_delete_evicts_and_later_requests_get_not_found(engine) -> None:
    await engine.generate(request(engine, "Hi!", "mlp6"))
    before = engine.stats()
    await engine.delete_adapter("t1", "mlp6")
    assert not engine._runtime.core.table.contains("t1", "mlp6")
    with pytest.raises(AdapterNotFoundError):
        await engine.generate(request(engine, "Hi!", "mlp6"))
    with pytest.raises(AdapterNotFoundError):
        await engine.get_adapter("t1", "mlp6")
    after = engine.stats()
    assert after["stored_adapters"] == before["stored_adapters"] - 1
    assert after["cache_resident_adapters"] == before["cache_resident_adapters"] - 1


async def test_adapters_are_per_namespace(engine) -> None:
    with pytest.raises(AdapterNotFoundError):
        await engine.generate(request(engine, "Hi!", "pt3", namespace="t2"))
    assert [r.adapter_id for r in await engine.list_adapters("t1")] == sorted(
        a[0] for a in ADAPTERS)
    assert await engine.list_adapters("t2") == []


async def test_cache_counts_hits_misses_and_evicts_within_budget(tiny_model_dirs, tmp_path,
                                                                 llama_adapters) -> None:
    # 64 hidden * 4 bytes = 256 bytes per virtual token: room for pt3 (768 B) and pt5 (1280 B)
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, prompt_cache_bytes=2100,
                      max_virtual_tokens=6)
    try:
        for name in ("pt3", "pt5", "mlp6"):
            await eng.add_adapter("t1", name, upload_of(llama_adapters[name]))
        for name in ("pt3", "pt3", "pt5", "mlp6"):
            await eng.generate(request(eng, "a", name, max_new_tokens=2))
        s = eng.stats()
        assert (s["cache_hits"], s["cache_misses"]) == (1, 3)
        assert s["cache_evictions"] >= 1 and s["cache_resident_bytes"] <= 2100
        assert s["stored_adapters"] == 3
    finally:
        await eng.aclose(10)


@pytest.mark.parametrize("batching", ["core", "static"])
async def test_a_request_whose_rows_were_evicted_while_it_waited_is_loaded_again(
        tiny_model_dirs, tmp_path, llama_adapters, batching) -> None:
    # One row at a time, a 12-row table: pt5 runs (5 rows pinned) while pt3 loads (3 rows)
    # and then mlp6 loads (6 rows), which evicts pt3's unpinned rows before pt3 starts.
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, prompt_cache_bytes=12 * 256,
                      max_batch_size=1, max_virtual_tokens=6, max_wait_ms=0, batching=batching)
    table = eng._runtime.core.table
    try:
        for name in ("pt3", "pt5", "mlp6"):
            await eng.add_adapter("t1", name, upload_of(llama_adapters[name]))
        long = asyncio.create_task(eng.generate(request(eng, "a", "pt5", max_new_tokens=120,
                                                        ignore_eos=True)))
        await until(lambda: eng.stats()["in_flight"] == 1 and table.contains("t1", "pt5"))
        short = asyncio.create_task(eng.generate(request(eng, "Hi!", "pt3")))
        await until(lambda: table.contains("t1", "pt3"))
        other = asyncio.create_task(eng.generate(request(eng, "Hi!", "mlp6")))
        await until(lambda: table.contains("t1", "mlp6"))
        assert not table.contains("t1", "pt3") and not long.done()
        results = await asyncio.gather(long, short, other)
        base = load_base(tiny_model_dirs["llama"])
        for result, name, text, n in zip(results, ("pt5", "pt3", "mlp6"), ("a", "Hi!", "Hi!"),
                                         (120, 8, 8), strict=True):
            prompt = peft_prompt(tiny_model_dirs["llama"], llama_adapters[name])
            expected = greedy_by_recomputation(base, prompt, eng.tokenize(text), n,
                                               stop_at_eos=name != "pt5")
            assert list(result.token_ids) == expected, name
        assert eng.stats()["cache_misses"] == 4  # pt5, pt3, mlp6, and pt3 once more
    finally:
        await eng.aclose(10)


@pytest.mark.parametrize("batching", ["core", "static"])
async def test_a_request_waits_while_running_requests_hold_the_whole_table(
        tiny_model_dirs, tmp_path, llama_adapters, batching) -> None:
    # A 6-row table (--max-virtual-tokens): pt5's running request pins 5 rows, so pt3 (3 rows)
    # waits for it instead of failing, and then runs.
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, prompt_cache_bytes=0,
                      max_batch_size=2, max_virtual_tokens=6, max_wait_ms=0, batching=batching)
    try:
        for name in ("pt3", "pt5"):
            await eng.add_adapter("t1", name, upload_of(llama_adapters[name]))
        long = asyncio.create_task(eng.generate(request(eng, "a", "pt5", max_new_tokens=80,
                                                        ignore_eos=True)))
        await until(lambda: eng.stats()["in_flight"] == 1
                    and eng._runtime.core.table.contains("t1", "pt5"))
        short = await eng.generate(request(eng, "Hi!", "pt3"))
        assert long.done()  # pt3 started only once pt5's rows were free
        base = load_base(tiny_model_dirs["llama"])
        prompt = peft_prompt(tiny_model_dirs["llama"], llama_adapters["pt3"])
        assert list(short.token_ids) == greedy_by_recomputation(base, prompt,
                                                                eng.tokenize("Hi!"), 8)
        assert len((await long).token_ids) == 80
    finally:
        await eng.aclose(10)


async def test_an_adapter_larger_than_the_table_is_refused(tiny_model_dirs, tmp_path,
                                                         llama_adapters) -> None:
    eng = make_engine(tiny_model_dirs["llama"], tmp_path)
    try:
        await eng.add_adapter("t1", "mlp6", upload_of(llama_adapters["mlp6"]))
    finally:
        await eng.aclose(10)
    # The same store, served with a smaller limit: the stored adapter no longer fits.
    small = make_engine(tiny_model_dirs["llama"], tmp_path, prompt_cache_bytes=0,
                        max_virtual_tokens=4)
    try:
        with pytest.raises(InvalidRequestError, match="6 virtual tokens.*--prompt-cache-bytes"):
            await small.generate(request(small, "Hi!", "mlp6"))
        assert (await small.generate(request(small, "Hi!", None))).token_ids
    finally:
        await small.aclose(10)


async def test_an_adapters_later_requests_reuse_its_prefix_and_the_flag_turns_it_off(
        tiny_model_dirs, tmp_path, llama_adapters, caplog) -> None:
    base = load_base(tiny_model_dirs["llama"])
    prompt = peft_prompt(tiny_model_dirs["llama"], llama_adapters["mlp6"])
    for enabled in (True, False):
        with caplog.at_level(logging.INFO, logger="server.engine.runtime"):
            eng = make_engine(tiny_model_dirs["llama"], tmp_path / str(enabled),
                              prefix_cache=enabled)
        try:
            await eng.add_adapter("t1", "mlp6", upload_of(llama_adapters["mlp6"]))
            cached = []
            for text in ("Hi!", "The quick brown fox", "a"):
                result = await eng.generate(request(eng, text, "mlp6"))
                assert list(result.token_ids) == greedy_by_recomputation(
                    base, prompt, eng.tokenize(text), 8)
                cached.append(result.cached_tokens)
            # Each request says what the cache gave it: the 6 virtual tokens after the first.
            assert cached == ([0, 6, 6] if enabled else [0, 0, 0])
            s = eng.stats()
            if enabled:
                assert (s["prefix_misses"], s["prefix_hits"]) == (1, 2)
                assert s["prefix_tokens_saved"] == 2 * 6 and s["prefix_used_tokens"] == 6
                assert "prefix cache: " in caplog.text
            else:
                assert "prefix_hits" not in s
                assert "prefix cache: off (--no-prefix-cache)" in caplog.text
        finally:
            await eng.aclose(10)


@pytest.mark.parametrize("arch", ["bloom", "t5"])
async def test_templated_adapters_on_static_batching(arch, tiny_model_dirs, tmp_path) -> None:
    """BLOOM (decoder-only) and T5 (the template is the encoder's input) run static batching;
    the spliced ids go through the same wrapped embedding."""
    model_dir = tiny_model_dirs[arch]
    adapter = make_adapter(model_dir, tmp_path / "adapter", "p_tuning_mlp", num_virtual_tokens=5,
                           seed=7)
    eng = make_engine(model_dir, tmp_path)
    try:
        assert eng.batching == "static"
        upload = upload_of(adapter)
        record = await eng.add_adapter("t1", "tpl", AdapterUpload(
            config_path=upload.config_path, weights_path=upload.weights_path,
            weights_name=upload.weights_name,
            template="{soft:2} Review: {text} {soft} Sentiment:"))
        assert record.template is not None
        for text in ("I love it.", "ok"):
            result = await eng.generate(request(eng, text, "tpl"))
            ids = eng.tokenize(text)
            assert list(result.token_ids) == templated_reference(model_dir, adapter, 5, ids, 8)
            assert result.virtual_tokens == 5 and result.prompt_tokens > len(ids)
    finally:
        await eng.aclose(10)


async def test_validation_happens_at_submit(engine) -> None:
    with pytest.raises(RequestTooLongError, match="512"):
        await engine.generate(request(engine, "Hi!", "pt3", max_new_tokens=600))
    bad = GenerationRequest(request_id="bad", prompt_ids=(1, 999), adapter_id=None)
    with pytest.raises(InvalidRequestError):
        await engine.generate(bad)
    with pytest.raises(InvalidRequestError):
        await engine.generate(GenerationRequest(request_id="empty", prompt_ids=(),
                                                adapter_id=None))
    with pytest.raises(InvalidRequestError):
        await engine.generate(request(engine, "Hi!", None, top_p=0.0))
    first = request(engine, "Hi!", None)
    pending = asyncio.ensure_future(engine.generate(first))
    await asyncio.sleep(0)
    with pytest.raises(InvalidRequestError, match="already in flight"):
        await engine.generate(first)
    await pending
    assert engine.stats()["in_flight"] == 0


async def test_lifecycle_not_ready_before_start_and_after_shutdown(tiny_model_dirs,
                                                                  tmp_path) -> None:
    settings = Settings(model=str(tiny_model_dirs["llama"]), store=str(tmp_path / "s"),
                        device=Device.CPU)
    eng = build_engine(settings)
    assert not eng.is_ready()
    with pytest.raises(EngineNotReadyError):
        eng.tokenize("x")
    with pytest.raises(EngineNotReadyError):
        await eng.generate(GenerationRequest(request_id="x", prompt_ids=(1,), adapter_id=None))
    eng.start()
    eng.wait_until_ready(60)
    assert eng.is_ready() and eng.model_info.hidden_size == 64
    pending = asyncio.ensure_future(eng.generate(request(eng, "Hi!", None, max_new_tokens=30,
                                                         ignore_eos=True)))
    await until(lambda: eng.stats()["in_flight"] == 1)
    await eng.aclose(30)  # drains: the in-flight request finishes
    assert len((await pending).token_ids) == 30
    assert not eng.is_ready()
    with pytest.raises(EngineNotReadyError):
        await eng.generate(GenerationRequest(request_id="y", prompt_ids=(1,), adapter_id=None))


async def test_failed_model_load_is_reported(tmp_path) -> None:
    eng = Engine(Settings(model=str(tmp_path / "missing"), store=str(tmp_path / "s"),
                          device=Device.CPU), LocalAdapterStore(tmp_path / "s"))
    eng.start()
    with pytest.raises(Exception, match="--model"):
        eng.wait_until_ready(30)
    assert not eng.is_ready()
    with pytest.raises(EngineNotReadyError, match="failed to load"):
        eng.tokenize("x")


@pytest.mark.parametrize(("arch", "batching", "runs", "logged"), [
    ("llama", "core", "core", "batching: core ("),
    ("llama", "continuous", "core", "batching: core ("),  # the former loop's name
    ("bloom", "core", "static", "cannot run the engine core"),
    ("t5", "core", "static", "seq2seq models run static batching"),
    ("llama", "static", "static", "--batching static"),
])
async def test_startup_says_which_loop_serves_the_model_and_why(
        arch, batching, runs, logged, tiny_model_dirs, tmp_path, caplog) -> None:
    """BLOOM's ALiBi attention does not go through transformers' attention interface and T5
    is seq2seq: both run static batching, and the log says so; the answers are the same."""
    with caplog.at_level(logging.INFO, logger="server.engine.runtime"):
        eng = make_engine(tiny_model_dirs[arch], tmp_path, batching=batching)
    try:
        assert eng.batching == runs
        assert logged in caplog.text
        result = await eng.generate(request(eng, "Hi!", None, max_new_tokens=4,
                                            ignore_eos=True))
        assert result.completion_tokens == 4
    finally:
        await eng.aclose(10)
