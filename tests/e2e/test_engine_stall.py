"""A stopped engine process takes the replica out of service: with --engine-process, an engine
child that makes no progress while requests wait turns /readyz to 503 once
--engine-stall-timeout-s has passed, and back to 200 when it moves again. The child is
stopped and resumed with real signals (SIGSTOP, SIGCONT)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.e2e.server_process import ServerProcess, metric

STALL_S = 2  # --engine-stall-timeout-s
PATIENCE_S = 60  # generous: how long any expected change may take on a slow machine


def _engine_pid(server_pid: int) -> int:
    """The server's one child process: the engine."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    assert len(children) == 1, children
    assert b"server.engine.worker" in Path(f"/proc/{children[0]}/cmdline").read_bytes()
    return children[0]


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not check():
        assert time.monotonic() < deadline, f"not within {PATIENCE_S} s: {what}"
        time.sleep(0.1)


def _generate(url: str, body: dict, answers: list) -> threading.Thread:
    def run() -> None:
        try:
            r = httpx.post(url + "/v1/generate", json=body, timeout=PATIENCE_S * 3)
            answers.append((r.status_code, r.text))
        except httpx.TransportError as e:
            answers.append((type(e).__name__, ""))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_stopped_engine_process_is_not_ready_until_it_resumes(model_dir, tmp_path):
    with ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                       "--engine-process", "--engine-stall-timeout-s", str(STALL_S)) as server:
        engine = _engine_pid(server.proc.pid)
        answers: list = []
        running = _generate(server.url, {"text": "long", "max_new_tokens": 400,
                                         "ignore_eos": True}, answers)
        _until(lambda: metric(httpx.get(server.url + "/metrics").text,
                              "softprompt_in_flight_requests") >= 1,
               "the request reached the engine")
        os.kill(engine, signal.SIGSTOP)
        try:
            # Sent while the engine is stopped, so work surely waits on it (the first one may
            # have finished just before the signal).
            waiting = _generate(server.url, {"text": "waits", "max_new_tokens": 4}, answers)
            _until(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 503,
                   "/readyz turned 503 while the engine was stopped")
            ready = httpx.get(server.url + "/readyz", timeout=5)
            assert ready.status_code == 503
            assert ready.json()["error"]["type"] == "not_ready"
            assert "no progress" in ready.json()["error"]["message"]
            scrape = httpx.get(server.url + "/metrics", timeout=5).text
            assert metric(scrape, "softprompt_ready") == 0
            assert metric(scrape, "softprompt_engine_stalled_seconds") > STALL_S
            assert not answers or len(answers) == 1  # the one sent while stopped still waits
        finally:
            os.kill(engine, signal.SIGCONT)
        _until(lambda: httpx.get(server.url + "/readyz", timeout=5).status_code == 200,
               "/readyz turned 200 again once the engine resumed")
        running.join(PATIENCE_S)
        waiting.join(PATIENCE_S)
        assert [status for status, _ in answers] == [200, 200], answers
        assert _engine_pid(server.proc.pid) == engine  # the same process, resumed
