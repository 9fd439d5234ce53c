"""The real server pinned to one core with `taskset -c 0` computes with one torch thread and
says why in its startup log, in process and in the engine process; --torch-threads still wins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.e2e.server_process import ServerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity")
                       or 0 not in os.sched_getaffinity(0),
                       reason="needs taskset and core 0 in this process's affinity"),
]


def _pinned(model_dir: Path, tmp_path: Path, *flags: str) -> ServerProcess:
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path / "server.log", *flags)
    server.args = ["taskset", "-c", "0", *server.args]
    return server


def _generates(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/generate",
                   json={"text": "hello", "max_new_tokens": 3, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["token_ids"]) == 3


@pytest.mark.parametrize("flags", [(), ("--engine-process",)], ids=["in-process",
                                                                   "engine-process"])
def test_one_core_gives_one_thread_and_the_log_says_why(model_dir, tmp_path, flags):
    with _pinned(model_dir, tmp_path, *flags) as server:
        _generates(server)
        log = server.log()
    assert "torch computes with 1 CPU thread(s) (automatic: " in log, log
    # The reason is the affinity, or a quota of at most one CPU where the host has one.
    assert "1 core(s) in the scheduler affinity mask" in log or "cgroup CPU quota" in log, log


def test_the_flag_wins_over_the_affinity(model_dir, tmp_path):
    with _pinned(model_dir, tmp_path, "--torch-threads", "3") as server:
        _generates(server)
        log = server.log()
    assert "torch computes with 3 CPU thread(s) (--torch-threads 3)" in log, log
