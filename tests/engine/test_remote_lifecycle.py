"""RemoteEngine (--engine-process) starting and ending: a full queue, the drain, a dead or
unloadable engine process (and the torch threads it was given), signals. Each test starts
an engine process of its own (test_remote_engine.py shares one for the rest); the last runs
the engine process's Worker in this process, to count its store pings."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.engine import worker as worker_module
from server.engine.errors import EngineNotReadyError, QueueFullError
from server.engine.interface import GenerationRequest, GenerationResult, TokenChunk
from server.engine.model_source import ModelLoadError
from server.engine.remote import RemoteEngine
from server.engine.worker import READY_PERIOD_S, Worker
from tests.engine.test_engine import RecordingObserver, request
from tests.engine.test_remote_engine import (
    LONG,
    TenantRecorder,
    first_token_of,
    remote_settings,
    start_remote,
)


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., RemoteEngine]]:
    """Start a RemoteEngine of one's own; whatever it left running is shut down after."""
    started: list[RemoteEngine] = []

    def _spawn(model_dir: Path, *, observer: RecordingObserver | None = None,
               **settings_kw: Any) -> RemoteEngine:
        engine = start_remote(remote_settings(model_dir, tmp_path / f"e{len(started)}",
                                              **settings_kw), observer=observer)
        started.append(engine)
        return engine

    yield _spawn
    for engine in started:
        engine.shutdown(5)
        assert engine._process is not None and engine._process.poll() is not None



async def test_a_full_queue_is_refused_with_a_retry_after(spawn, tiny_model_dirs) -> None:
    engine = spawn(tiny_model_dirs["llama"], max_queue=1, max_batch_size=1, max_wait_ms=0)
    engine.wait_until_ready(60)
    outcomes = await asyncio.gather(
        *(engine.generate(request(engine, "Hi!", None, max_new_tokens=20, ignore_eos=True))
          for _ in range(12)), return_exceptions=True)
    full = [o for o in outcomes if isinstance(o, Exception)]
    served = [o for o in outcomes if isinstance(o, GenerationResult)]
    assert full and served and len(full) + len(served) == 12, outcomes
    assert all(type(e) is QueueFullError for e in full), full
    assert all(e.retry_after_s >= 1.0 and "--max-queue 1" in str(e) for e in full)
    assert all(r.completion_tokens == 20 for r in served)


# ---- lifecycle --------------------------------------------------------------------------------


async def test_shutdown_drains_the_request_in_flight_then_refuses(spawn, tiny_model_dirs):
    observer = TenantRecorder()
    engine = spawn(tiny_model_dirs["llama"], observer=observer)
    engine.wait_until_ready(60)
    pending = asyncio.ensure_future(engine.generate(request(
        engine, "Hi!", None, namespace="drain", max_new_tokens=LONG, ignore_eos=True)))
    await first_token_of(observer, "drain")
    await engine.aclose(120)  # returns once drained: a deadline only a hang reaches
    assert (await pending).completion_tokens == LONG  # finished, not aborted
    assert not engine.is_ready()
    assert engine.wait_until_exited(0)
    assert engine._process is not None and engine._process.returncode == 0
    with pytest.raises(EngineNotReadyError):
        await engine.generate(request(engine, "Hi!", None))
    with pytest.raises(EngineNotReadyError):
        await engine.open_stream(request(engine, "Hi!", None))
    with pytest.raises(EngineNotReadyError):
        await engine.list_adapters(None)


async def test_a_dead_engine_process_fails_waiting_requests(spawn, tiny_model_dirs) -> None:
    observer = TenantRecorder()
    engine = spawn(tiny_model_dirs["llama"], observer=observer)
    engine.wait_until_ready(60)
    waiting = asyncio.ensure_future(engine.generate(request(
        engine, "a", None, namespace="doomed", max_new_tokens=LONG, ignore_eos=True)))
    stream = await engine.open_stream(request(engine, "b", None, namespace="doomed",
                                              max_new_tokens=LONG, ignore_eos=True))
    assert isinstance(await stream.__anext__(), TokenChunk)
    await first_token_of(observer, "doomed")
    assert engine._process is not None
    engine._process.kill()
    # Each bound is for a hang only: the pipe closing is what ends the waits.
    with pytest.raises(EngineNotReadyError, match="exited"):
        await asyncio.wait_for(waiting, 60)
    with pytest.raises(EngineNotReadyError):
        async with asyncio.timeout(60):
            async for _ in stream:
                pass
    assert engine.wait_until_exited(60)
    assert not engine.is_ready()
    with pytest.raises(EngineNotReadyError, match="exited"):
        await engine.generate(request(engine, "Hi!", None))


async def test_the_engine_process_ignores_signals_but_exits_when_its_parent_is_gone(
        spawn, tiny_model_dirs) -> None:
    """SIGTERM/SIGINT to the process group must not kill in-flight work before the drain; a
    closed pipe (the HTTP process died) must not leave an orphan holding the model."""
    engine = spawn(tiny_model_dirs["llama"])
    engine.wait_until_ready(60)
    process = engine._process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)
    result = await engine.generate(request(engine, "Hi!", None, max_new_tokens=3,
                                           ignore_eos=True))
    assert result.completion_tokens == 3 and process.poll() is None
    # What the child sees when the HTTP process dies: its end of the socket pair closes.
    sock = socket.socket(fileno=engine._conn.fileno())
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()
    assert await asyncio.to_thread(process.wait, 60) == 0
    assert engine.wait_until_exited(60)


async def test_a_model_that_cannot_load_reports_model_load_error_from_the_child(
        spawn, tiny_model_dirs, tmp_path, capfd) -> None:
    """Only the tokenizer is there: this process loads it, the engine process cannot load
    the model, so the ModelLoadError can only have come through the pipe. --torch-threads
    reached the child first: it logs the threads torch uses (to the stderr it inherits)
    before it loads the model."""
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    for f in tiny_model_dirs["llama"].glob("tokenizer*"):
        shutil.copy(f, tokenizer_only)
    engine = spawn(tokenizer_only, torch_threads=1)
    with pytest.raises(ModelLoadError, match="model_type"):
        engine.wait_until_ready(60)
    assert engine.wait_until_exited(60)
    assert not engine.is_ready()
    with pytest.raises(EngineNotReadyError, match="failed to load"):
        await engine.generate(GenerationRequest(request_id="x", prompt_ids=(1,),
                                                adapter_id=None))
    threads = [line for line in capfd.readouterr().err.splitlines() if "CPU thread(s)" in line]
    assert len(threads) == 1 and "[engine process]" in threads[0], threads
    assert "torch computes with 1 CPU thread(s)" in threads[0], threads


# ---- readiness --------------------------------------------------------------------------------


def test_readiness_pings_the_store_once_per_ready_period(tiny_model_dirs, tmp_path,
                                                        monkeypatch) -> None:
    """Every gauge report carries readiness, and readiness pings the store (a LIST request on
    S3): at 4 reports a second that would be 4 requests a second per replica. The worker
    checks once per READY_PERIOD_S and repeats the answer in between."""
    clock = [500.0]  # the worker's clock, moved by hand: a slow report must not age the answer
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    ours, theirs = socket.socketpair()
    worker = Worker(Connection(theirs.detach()),
                    remote_settings(tiny_model_dirs["llama"], tmp_path))
    store = worker.engine.store
    pings: list[float] = []
    ping = store.ping
    store.ping = lambda: (pings.append(clock[0]), ping())[1]  # count, then ping
    worker.engine.start()
    try:
        worker.engine.wait_until_ready(60)
        reports = [worker._snapshot() for _ in range(5)]
        clock[0] += READY_PERIOD_S / 2
        reports.append(worker._snapshot())
        assert [r["ready"] for r in reports] == [True] * 6
        assert len(pings) == 1
        clock[0] += READY_PERIOD_S / 2  # the period has passed since the ping
        assert worker._snapshot()["ready"] is True
        assert len(pings) == 2
    finally:
        worker.engine.shutdown(5)
        ours.close()
