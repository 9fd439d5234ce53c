"""benchmarks/fairness.py's --engine and --model: the vllm engine only through the real
server and without the builtin engine's options, refused before anything is built; a harness
workload's model served by the builtin engine in process, named in the report. No speed is
asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from benchmarks import fairness
from benchmarks.harness.cli import main as harness_main

HAS_VLLM = importlib.util.find_spec("vllm") is not None
TINY_RUN = ["--backlog", "2", "--rounds", "1", "--cycles", "1"]


@pytest.mark.parametrize("argv", [["--engine", "vllm"], ["--engine", "vllm", "--model",
                                                         "cpu-ref"]])
def test_the_vllm_engine_is_measured_through_the_real_server_only(argv) -> None:
    with pytest.raises(SystemExit, match="--http --engine vllm"):
        fairness.main([*argv, *TINY_RUN])


def test_the_harness_fairness_workload_refuses_the_vllm_engine_too(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--http --engine vllm"):
        harness_main(["fairness", "--engine", "vllm", "--json", str(tmp_path / "f.json")])
    assert not (tmp_path / "f.json").exists()


@pytest.mark.parametrize(("extra", "named"), [
    (["--engine-process"], "--engine-process"),
    (["--batching", "static"], "--batching static"),
])
def test_the_vllm_engine_refuses_what_it_cannot_serve(extra, named) -> None:
    with pytest.raises(SystemExit, match=named):
        fairness.main(["--http", "--engine", "vllm", *extra, *TINY_RUN])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_vllm_engine_exits_with_the_install_line() -> None:
    with pytest.raises(SystemExit, match="pip install"):
        fairness.main(["--http", "--engine", "vllm", "--model", "cpu-ref", *TINY_RUN])


def test_layers_shrink_a_workloads_model_only() -> None:
    with pytest.raises(ValueError, match="--model WORKLOAD"):
        fairness.main(["--layers", "1", *TINY_RUN])


@pytest.mark.slow
async def test_the_builtin_engine_serves_a_workloads_model_in_process() -> None:
    r = await fairness.run_fairness(model="cpu-ref", layers=1, backlog=4, rounds=1, cycles=1,
                                    torch_threads=1)
    assert r["engine"] == "builtin" and r["http"] is False
    assert r["model"].startswith("cpu-ref's model: gpt2 shape, 1 layers")
    assert r["max_model_len"] == 64  # 25 prompt + 8 new tokens, rounded up to a power of two
    assert r["b_idle_ms"]["p50"] > 0 and r["b_loaded_ms"]["p50"] > 0
