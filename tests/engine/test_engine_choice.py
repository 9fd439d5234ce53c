"""--engine: what the server runs, and what it refuses before binding, where vLLM is absent
(this environment) or cannot serve."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from server.config import Settings
from server.engine.engine_choice import choose_engine

VLLM = importlib.util.find_spec("vllm") is not None


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "serve", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(VLLM, reason="checks the refusal where vLLM is not installed")
def test_engine_vllm_without_vllm_exits_before_binding_naming_the_install(tmp_path):
    done = _serve("--engine", "vllm", "--store", str(tmp_path / "store"), "--port", "0")
    assert done.returncode == 2
    assert "--engine vllm needs vLLM" in done.stderr and "[vllm]" in done.stderr


def test_parallel_sizes_need_the_vllm_engine(tmp_path):
    done = _serve("--engine", "builtin", "--tensor-parallel-size", "2", "--store",
                  str(tmp_path / "store"))
    assert done.returncode == 2
    assert "--tensor-parallel-size 2 needs --engine vllm" in done.stderr


def test_auto_runs_the_builtin_engine_on_a_cpu_and_says_why(tiny_model_dirs, caplog):
    settings = Settings(model=str(tiny_model_dirs["llama"]), device="cpu")
    with caplog.at_level(logging.INFO, logger="server.engine.engine_choice"):
        assert choose_engine(settings) == "builtin"
    reason = "vLLM is not installed" if not VLLM else "the device is not CUDA"
    assert f"engine: builtin (--engine auto: {reason}" in caplog.text
