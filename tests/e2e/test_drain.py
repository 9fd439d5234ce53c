"""SIGTERM drains: readiness drops and new work is refused at once, running work finishes."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import ENGINE_MODES
from tests.e2e.server_process import ServerProcess

TOKENS = 200  # a few seconds of CPU work per row: still running when SIGTERM arrives


def _stream(url: str, out: dict) -> None:
    body = {"text": "stream", "max_new_tokens": TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/generate", json=body, timeout=120) as r:
        out["status"] = r.status_code
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    out["events"] = events


def _plain(url: str, out: dict) -> None:
    body = {"text": "plain", "max_new_tokens": TOKENS, "ignore_eos": True}
    r = httpx.post(url + "/v1/generate", json=body, timeout=120)
    out["status"], out["body"] = r.status_code, r.json()


@pytest.fixture(**ENGINE_MODES)
def engine_flags(request) -> tuple[str, ...]:
    """The drain runs through the engine in process, and through the pipe to its own."""
    return request.param


def test_sigterm_drains_in_flight_requests_and_exits_zero(model_dir, tmp_path, engine_flags):
    proc = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                         "--drain-timeout-s", "60", *engine_flags)
    proc.start()
    try:
        streamed, plain = {}, {}
        workers = [threading.Thread(target=_stream, args=(proc.url, streamed)),
                   threading.Thread(target=_plain, args=(proc.url, plain))]
        for w in workers:
            w.start()
        _wait_for_in_flight(proc.url, 2)

        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = _poll_until_503(proc.url + "/readyz")
        assert time.monotonic() - signalled < 1.0
        assert ready.json()["error"]["type"] == "not_ready"
        refused = httpx.post(proc.url + "/v1/generate", json={"text": "late"}, timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "draining"

        for w in workers:
            w.join(60)
        code = proc.proc.wait(30)
        elapsed = time.monotonic() - signalled
    finally:
        proc.stop()

    assert code == 0, proc.log()
    assert elapsed < 60
    assert plain["status"] == 200
    assert plain["body"]["usage"]["completion_tokens"] == TOKENS
    assert plain["body"]["finish_reason"] == "length"
    assert streamed["status"] == 200
    assert streamed["events"][-1] == "[DONE]"
    final = json.loads(streamed["events"][-2])
    assert final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == TOKENS
    assert "drained; shutting down" in proc.log()


def _wait_for_in_flight(url: str, n: int) -> None:
    """Both requests are inside the engine before the signal is sent."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        for line in text.splitlines():
            if line.startswith("softprompt_in_flight_requests ") and float(line.split()[1]) >= n:
                return
        time.sleep(0.02)
    raise AssertionError("the requests never reached the engine")


def _poll_until_503(url: str) -> httpx.Response:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = httpx.get(url, timeout=2)
        if r.status_code == 503:
            return r
        time.sleep(0.02)
    raise AssertionError(f"{url} still answers {r.status_code}")


def test_work_still_running_at_the_drain_deadline_is_aborted_and_exit_is_3(model_dir, tmp_path,
                                                                          engine_flags):
    # Six 400-token requests run one at a time (--max-batch-size 1): together they take
    # several times the 1 s deadline however fast the machine, so some are still queued or
    # running when it passes.
    proc = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log",
                         "--drain-timeout-s", "1", "--max-batch-size", "1", *engine_flags)
    proc.start()
    try:
        statuses: list[int | str] = []

        def long_request() -> None:
            body = {"text": "long", "max_new_tokens": 400, "ignore_eos": True}
            try:
                statuses.append(httpx.post(proc.url + "/v1/generate", json=body,
                                           timeout=60).status_code)
            except httpx.TransportError as e:
                statuses.append(type(e).__name__)

        workers = [threading.Thread(target=long_request) for _ in range(6)]
        for worker in workers:
            worker.start()
        _wait_for_in_flight(proc.url, 6)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.proc.wait(20)
        elapsed = time.monotonic() - signalled
        for worker in workers:
            worker.join(20)
    finally:
        proc.stop()
    assert code == 3, proc.log()
    assert 1.0 <= elapsed < 10  # the deadline, then uvicorn's short grace, then the engine
    assert len(statuses) == 6
    assert any(status != 200 for status in statuses), (statuses, proc.log())  # cut off
    assert "drain timeout" in proc.log()
