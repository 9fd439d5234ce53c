"""--kv-cache-memory and --max-model-len: how many KV slots the engine core gets, and the
errors an operator sees for a budget that cannot work."""

from __future__ import annotations

import functools
import gc
import json
import logging
import shutil
import weakref

import pytest
import torch
from pydantic import ValidationError

from server.config import Settings, parse_kv_cache_memory
from server.engine.core import loop
from server.engine.core.kv_budget import KVBudgetError, kv_plan
from server.engine.errors import RequestTooLongError
from tests.engine.test_engine import make_engine, request

CPU = torch.device("cpu")


@pytest.mark.parametrize(("text", "value"), [
    ("auto", None), ("AUTO", None), ("0.5", 0.5), ("1.0", 1.0), ("8GiB", 8 << 30),
    ("500MB", 500_000_000), ("1073741824", 1 << 30), ("1.5 GiB", 3 << 29)])
def test_budget_forms(text, value):
    assert parse_kv_cache_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "1.5", "0.0", "-3GiB", "8 parsecs", ""])
def test_bad_budgets_name_the_flag_at_startup(text):
    with pytest.raises(ValidationError, match="--kv-cache-memory"):
        Settings(kv_cache_memory=text)


def _plan(value: str, prefix_tokens: int = 0, *, length: int = 100, fit: bool = False):
    return kv_plan(value, length=length, token_bytes=10, rows=8,
                   prefix_tokens=prefix_tokens, device=CPU, fit_length=fit)


def test_slots_on_the_cpu(caplog):
    assert _plan("auto").slots == 9
    assert _plan("1MB").slots == 9  # room to spare
    with caplog.at_level(logging.WARNING):
        assert _plan("5000").slots == 5
    assert "at most 4 rows run at once" in caplog.text
    with pytest.raises(KVBudgetError, match="at least 2"):
        _plan("1500")
    with pytest.raises(KVBudgetError, match="byte size on the CPU"):
        _plan("0.5")


def test_the_prefix_cache_gets_what_the_slots_leave():
    assert _plan("auto", 500).prefix_tokens == 500  # the CPU's auto: all of it
    assert _plan("9000", 500).prefix_tokens == 0  # the slots take every byte
    assert _plan("10000", 500).prefix_tokens == 100
    assert _plan("1MB", 500).prefix_tokens == 500  # never more than it can use
    assert _plan("5000", 500).prefix_tokens == 0  # fewer slots than rows: nothing is left


def test_a_measured_budget_gives_the_prefix_cache_all_it_can_use():
    def plan(value: str) -> int:
        return kv_plan(value, length=100, token_bytes=10, rows=8, prefix_tokens=500,
                       prefix_most=5000, device=CPU).prefix_tokens

    assert plan("auto") == 500  # not measured: a full batch of the largest soft prompts
    assert plan("1MB") == 5000  # a prefix for every row of the prompt table, no more
    assert plan("30000") == 2100  # what the nine slots leave


def test_an_unpinned_length_shrinks_for_every_row_to_fit(caplog):
    # A long context (100,000 positions of 10 bytes): 9 slots would need 9 MB.
    with caplog.at_level(logging.WARNING):
        plan = _plan("5000000", 500, length=100_000, fit=True)
    # The prefix cache's 500 tokens first, the rest in 9 slots, a multiple of 256 positions.
    assert (plan.slots, plan.length, plan.prefix_tokens) == (9, 55_296, 500)
    assert "at most 55296 positions" in caplog.text and "--max-model-len" in caplog.text
    assert _plan("1MB", 0, length=1000, fit=True).length == 1000  # fits: the context stays
    assert _plan("auto", 0, length=100_000, fit=True).length == 100_000  # the CPU's auto
    # Room for the slots but not for the prefix cache as well: the slots still give way.
    plan = _plan("9000000", 500, length=100_000, fit=True)
    assert (plan.length, plan.prefix_tokens) == (99_840, 500)


def test_a_fitted_length_stops_at_a_floor_and_then_fewer_rows_run(caplog):
    with caplog.at_level(logging.WARNING):
        plan = _plan("100000", 0, length=100_000, fit=True)
    assert (plan.slots, plan.length) == (4, 2048)  # 2048 x 10 bytes per slot
    assert "at most 3 rows run at once" in caplog.text
    assert _plan("5000000", 0, length=100_000).length == 100_000  # pinned: never shrunk
    assert _plan("5000000", 0, length=100_000).slots == 5


async def test_a_long_context_model_gets_every_row_and_a_shorter_context(
        tiny_model_dirs, tmp_path, caplog):
    model = tmp_path / "long-context"
    shutil.copytree(tiny_model_dirs["llama"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    # 512 bytes per position: 5 slots of 8192 would take 20 MB; the prefix cache's 4 x 512
    # tokens come first, and each slot gets (15625 - 2048) // 5 positions, rounded to 2560.
    with caplog.at_level(logging.WARNING):
        eng = make_engine(model, tmp_path, max_batch_size=4, kv_cache_memory="8MB")
    try:
        core = eng._runtime.core.scheduler.core
        assert (core.kv.slots, core.kv.max_len, core.max_rows) == (5, 2560, 4)
        assert eng.model_info.max_context == 2560
        assert "each row may use at most 2560 positions" in caplog.text
        result = await eng.generate(request(eng, "Hi!", None, max_new_tokens=5))
        assert result.completion_tokens == 5
        with pytest.raises(RequestTooLongError, match="2560"):  # refused at submit
            await eng.generate(request(eng, "Hi!", None, max_new_tokens=2600))
    finally:
        await eng.aclose(10)


async def test_a_small_budget_runs_fewer_rows_and_max_model_len_bounds_requests(
        tiny_model_dirs, tmp_path):
    # llama tiny: 2 layers x 2 kv heads x 16 dims x 4 bytes x 2 = 512 bytes per position
    eng = make_engine(tiny_model_dirs["llama"], tmp_path, max_batch_size=8,
                      max_model_len=64, kv_cache_memory=str(4 * 512 * 64))
    try:
        core = eng._runtime.core.scheduler.core
        assert (core.kv.slots, core.kv.max_len, core.max_rows) == (4, 64, 3)
        assert eng.model_info.max_context == 64
        assert eng.stats()["kv_slots"] == 3
        results = [await eng.generate(request(eng, "Hi!", None, max_new_tokens=5))
                   for _ in range(2)]
        assert all(r.completion_tokens == 5 for r in results)
        with pytest.raises(RequestTooLongError, match="64"):  # over the context: at submit
            await eng.generate(request(eng, "Hi!", None, max_new_tokens=100))
    finally:
        await eng.aclose(10)


async def test_a_core_given_up_at_startup_gives_its_kv_memory_back(
        tiny_model_dirs, tmp_path, monkeypatch):
    """BLOOM's attention does not go through the core, so its probe fails and static batching
    serves. The core built for the probe (padded decode steps, as on a GPU, whose graphs call
    back into it: a reference cycle) must be gone by then, not left for the cycle collector."""
    caches: list[weakref.ref] = []

    class Recorded(loop.SlotKVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self))

    monkeypatch.setattr(loop, "SlotKVCache", Recorded)
    monkeypatch.setattr(loop, "EngineCore", functools.partial(loop.EngineCore, pad_decodes=True))
    gc.disable()  # only the server's own collection may free the cycle
    try:
        eng = make_engine(tiny_model_dirs["bloom"], tmp_path)
        try:
            assert eng._runtime.core.scheduler.core is None  # static batching serves BLOOM
            assert caches and all(ref() is None for ref in caches)
        finally:
            await eng.aclose(10)
    finally:
        gc.enable()


async def test_no_cuda_graphs_reaches_the_core(tiny_model_dirs, tmp_path, monkeypatch):
    """--no-cuda-graphs asks the core for eager decode steps (on the CPU they are eager
    anyway: what is checked is that the switch gets there)."""
    asked: list[object] = []

    def recorded(*args, **kwargs):
        asked.append(kwargs.get("graphs"))
        return original(*args, **kwargs)

    original = loop.EngineCore
    monkeypatch.setattr(loop, "EngineCore", recorded)
    for flag in (True, False):
        eng = make_engine(tiny_model_dirs["gpt2"], tmp_path / str(flag), cuda_graphs=flag)
        await eng.aclose(10)
    assert asked == [None, False]  # None: the core's default, graphs where there is CUDA
