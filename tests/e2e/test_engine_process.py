"""--engine-process through the real server: the engine's metrics reach /metrics, and a dead
engine process takes the server down (so the orchestrator restarts it) instead of leaving a
replica that can only answer 503. Parity, streams, aborts and drains run against this mode in
test_generate_parity, test_stream_disconnect and test_drain."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.server_process import ServerProcess, metric

HANG_S = 60  # a bound on each wait that only a hang reaches


def _engine_pid(server_pid: int) -> int:
    """The server's one child process: the engine."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    assert len(children) == 1, children
    cmdline = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
    assert b"server.engine.worker" in cmdline, cmdline
    return children[0]


def test_engine_metrics_reach_the_scrape_and_signals_leave_the_engine_alone(model_dir,
                                                                           tmp_path):
    with ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                       "--engine-process", "--max-queue", "77") as server:
        for _ in range(3):
            r = httpx.post(server.url + "/v1/generate",
                           json={"text": "hello", "max_new_tokens": 4, "ignore_eos": True},
                           timeout=HANG_S)
            assert r.status_code == 200, r.text
        scrape = httpx.get(server.url + "/metrics", timeout=HANG_S).text
        # Observer events replayed from the engine process...
        assert metric(scrape, "softprompt_batch_size_count") >= 3
        assert metric(scrape, "softprompt_queue_wait_seconds_count", {"tenant": "default"}) == 3
        assert metric(scrape, "softprompt_time_to_first_token_seconds_count",
                      {"tenant": "default"}) == 3
        # ...and its gauges, pushed a few times a second (so a scrape may show the moment
        # the last request was still running).
        def settled(text: str) -> bool:
            return (metric(text, "softprompt_queue_capacity") == 77
                    and metric(text, "softprompt_in_flight_requests") == 0)

        deadline = time.monotonic() + HANG_S
        while not settled(scrape) and time.monotonic() < deadline:
            time.sleep(0.1)
            scrape = httpx.get(server.url + "/metrics", timeout=HANG_S).text
        assert metric(scrape, "softprompt_queue_capacity") == 77
        assert metric(scrape, "softprompt_in_flight_requests") == 0

        # The engine process leaves signals to the HTTP process, which drains it: a Ctrl-C
        # or SIGTERM reaching it directly (a process group's signal) does not cut it off.
        engine = _engine_pid(server.proc.pid)
        os.kill(engine, signal.SIGTERM)
        os.kill(engine, signal.SIGINT)
        r = httpx.post(server.url + "/v1/generate", json={"text": "still here"},
                       timeout=HANG_S)
        assert r.status_code == 200, r.text
        assert _engine_pid(server.proc.pid) == engine


def test_a_dead_engine_process_fails_waiting_requests_and_stops_the_server(model_dir,
                                                                           tmp_path):
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                           "--engine-process")
    server.start()
    try:
        answer: dict = {}

        def long_request() -> None:
            body = {"text": "long", "max_new_tokens": 450, "ignore_eos": True}
            try:
                r = httpx.post(server.url + "/v1/generate", json=body, timeout=HANG_S)
                answer["status"], answer["body"] = r.status_code, r.json()
            except httpx.TransportError as e:
                answer["status"] = type(e).__name__

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + HANG_S
        while metric(httpx.get(server.url + "/metrics", timeout=HANG_S).text,
                     "softprompt_in_flight_requests") < 1:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
        os.kill(_engine_pid(server.proc.pid), signal.SIGKILL)
        worker.join(HANG_S)
        code = server.proc.wait(HANG_S)
    finally:
        server.stop()
    assert answer["status"] == 503, answer
    assert "engine process exited" in answer["body"]["error"]["message"]
    assert code == 1, server.log()
    assert "the engine process died; exiting" in server.full_log()
