"""`python -m benchmarks soak`: a short soak of the real server (a subprocess, three tenants)
must make every kind of request, get no 5xx, and report the JSON's fields. No speed and no
memory figure is asserted, only that they are measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.harness.cli import main as benchmarks_main
from benchmarks.soak_report import (
    MemorySample,
    children,
    device_memory,
    memory_report,
    parse_metrics,
    rss_bytes,
)
from benchmarks.soak_state import Kind

SUCCESS = {Kind.GENERATE: {"200"}, Kind.STREAM: {"200"}, Kind.DISCONNECT: {"200", "left-early"},
           Kind.COMPLETIONS: {"200"}, Kind.COMPLETIONS_STREAM: {"200"}, Kind.CHAT: {"200"},
           Kind.CHAT_STREAM: {"200"}, Kind.CROSS_TENANT: {"404"}, Kind.UPLOAD: {"201"},
           Kind.OVERWRITE: {"201"}, Kind.CONFLICT: {"409"}, Kind.DELETE: {"204"},
           Kind.LIST: {"200"}, Kind.HOSTILE: {"400", "422"}}


@pytest.mark.slow
def test_a_short_soak_makes_every_kind_of_request_without_a_5xx(tmp_path, capsys) -> None:
    out = tmp_path / "soak.json"
    # One torch thread: on a 2-core machine the clients, the HTTP server and the engine
    # share the cores, and a stall would only make the test slower.
    status = benchmarks_main(["soak", "--minutes", "0.2", "--torch-threads", "1",
                              "--json", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    s = r["summary"]

    assert status == 0, printed
    assert s["count_5xx"] == 0 and not r["server_5xx"], s["unexpected"]
    assert s["unexpected_count"] == 0, s["unexpected"]
    for kind, ok in SUCCESS.items():
        assert ok & set(s["counts"].get(kind.value, {})), (kind, s["counts"])
    assert sum(ops.get("delete", 0) for ops in r["ops_on_busy"].values()) > 0
    assert r["config"]["tenants"] == ["tenant-a", "tenant-b", "tenant-c"]
    assert len(s["windows"]) == 10 and sum(w["requests"] for w in s["windows"]) > 0
    assert r["memory"]["server"]["start_mib"] > 0 and "growth_pct" in r["memory"]["total"]
    assert r["device_memory"] == "n/a (cpu)"
    assert r["after_drain"] == {"in_flight": 0, "queue_depth": 0, "parked": 0}
    assert r["hostile_tenant"] == "tenant-hostile"
    assert "200" in s["counts"][Kind.HOSTILE.value]  # its heavy but valid requests are served
    health = r["healthz"]
    assert health["probes"] > 0 and health["failures"] == 0 and health["max_ms"] > 0
    assert "/healthz while the hostile tenant ran" in printed
    assert r["server_exit"] == 0 and r["passed"] is True
    assert "5xx: 0" in printed and "verdict: PASS" in printed


def test_a_child_process_is_found_and_its_rss_read() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in children(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in children(os.getpid())
        assert (rss_bytes(child.pid) or 0) > 0
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) is None


def test_device_memory_gauges_are_picked_from_the_metrics_text() -> None:
    text = ('# HELP softprompt_cuda_memory_allocated_bytes x\n'
            'softprompt_cuda_memory_allocated_bytes{device="cuda:0"} 1048576.0\n'
            'softprompt_requests_total{endpoint="/v1/generate",status="200"} 3.0\n'
            'softprompt_resident_adapter_bytes 10.0\n')
    assert device_memory(parse_metrics(text)) == {
        "softprompt_cuda_memory_allocated_bytes{device=cuda:0}": 1048576.0}


def test_rss_growth_is_checked_against_the_limit() -> None:
    start = MemorySample(1.0, {"server": 100 * 2**20, "child 7": 50 * 2**20})
    end = MemorySample(9.0, {"server": 104 * 2**20, "child 7": 60 * 2**20})
    m = memory_report(start, end, {"server": 105 * 2**20}, limit_pct=5.0)
    assert m["server"]["within_limit"] and round(m["server"]["growth_pct"], 1) == 4.0
    assert not m["child 7"]["within_limit"] and round(m["total"]["growth_pct"], 1) == 9.3
