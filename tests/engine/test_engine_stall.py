"""In process, a wedged engine thread makes the engine not ready while a request waits on it,
and ready again once it moves: the thread is really held (an observer it calls blocks), under
both batchings. The rule itself, with time driven by hand, is in test_heartbeat.py."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.cli import main
from server.engine.observer import NullObserver
from tests.engine.test_engine import make_engine, request, until

PATIENCE_S = 60.0  # generous: how long an expected change may take on a slow machine


class Wedge(NullObserver):
    """Holds the engine thread at the start of a batch while the gate is closed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()

    def batch_started(self, *, size: int, distinct_adapters: int) -> None:
        if not self.gate.is_set():
            self.held.set()
            self.gate.wait()


@pytest.mark.parametrize("batching", ["core", "static"])
async def test_a_wedged_engine_thread_is_not_ready_until_it_moves(batching, tiny_model_dirs,
                                                                 tmp_path):
    wedge = Wedge()
    engine = make_engine(tiny_model_dirs["llama"], tmp_path, observer=wedge, batching=batching,
                         engine_stall_timeout_s=1)
    try:
        assert engine.is_ready()
        wedge.gate.clear()
        answer = asyncio.create_task(engine.generate(request(engine, "hello", None,
                                                             max_new_tokens=4,
                                                             ignore_eos=True)))
        await until(wedge.held.is_set, PATIENCE_S)
        await until(lambda: not engine.is_ready(), PATIENCE_S)
        stalled = engine.progress()
        assert stalled.waiting == 1 and stalled.stalled_s >= 1, stalled
        wedge.gate.set()
        await until(engine.is_ready, PATIENCE_S)
        assert engine.progress().stalled_s == 0 or not engine.progress().stalled(1)
        result = await asyncio.wait_for(answer, PATIENCE_S)
        assert result.completion_tokens == 4
    finally:
        wedge.gate.set()
        await engine.aclose(10)


def test_a_stall_bound_under_a_second_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--engine-stall-timeout-s", "0.5"])
    assert exc.value.code == 2
    assert "--engine-stall-timeout-s" in capsys.readouterr().err
