"""The benchmarks on the vllm engine end to end, shrunken: `python -m benchmarks cpu-ref
--engine vllm` (the real server on the vllm engine and plain vLLM's OpenAI server with prompt
embeddings, the vllm-peer baseline, serve every request), the fairness scenario through the
real server on the vllm engine, and the adapter-scaling plot with both engines; the JSON has
what docs/benchmarks.md promises. No speed is asserted.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import fairness
from benchmarks.harness.cli import main
from benchmarks.plots import adapter_scaling

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here (build its environment with .ci/vllm-env)",
                allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # vLLM servers start
VIRTUAL, PROMPT, HIDDEN = 20, 32, 768  # cpu-ref's adapters, texts and model width


def test_cpu_ref_on_the_vllm_engine_against_vllm_peer(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")  # the harness sets it; keep it here
    out = tmp_path / "result.json"
    assert main(["cpu-ref", "--engine", "vllm", "--layers", "1", "--requests", "4",
                 "--adapters", "2", "--new-tokens", "3", "--repeats", "1", "--no-progress",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    systems = result["systems"]
    assert set(systems) == {"http", "vllm-peer"}
    for name, s in systems.items():
        assert (s["tokens"], s["requests"]) == (12, 4), name
        assert 0 < s["ttft_ms"]["p50"] <= s["latency_ms"]["p99"], name
    assert systems["http"]["label"] == "HTTP server, vllm engine"
    assert set(result["ratios"]) == {"http/vllm-peer"}
    extra = result["extra"]
    assert extra["engine"] == "vllm" and "heads of 64" in extra["model"]
    assert all(extra["startup_s"][n] > 0 for n in systems)
    # The peer sends every embedding, base64 of float32: at least 4/3 of 4 bytes each.
    assert extra["request_bytes"]["vllm-peer"] >= 4 / 3 * 4 * (VIRTUAL + PROMPT) * HIDDEN
    assert 0 < extra["request_bytes"]["http"] < 1000
    assert "this server (--engine vllm) / vllm-peer" in capsys.readouterr().out


def test_fairness_on_the_vllm_engine_serves_both_tenants(tmp_path, capsys) -> None:
    out = tmp_path / "fairness.json"
    # A workload's model: what the harness sizes for vLLM (--max-model-len, --kv-cache-memory)
    # is passed to the server.
    assert fairness.main(["--http", "--engine", "vllm", "--model", "cpu-ref", "--layers", "1",
                          "--backlog", "8", "--rounds", "1", "--cycles", "1",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["engine"] == "vllm" and result["http"] is True
    assert result["model"].startswith("cpu-ref's model: gpt2 shape, 1 layers")
    assert "heads of 64" in result["model"] and result["max_model_len"] == 64
    assert result["b_idle_ms"]["p50"] > 0 and result["b_loaded_ms"]["p50"] > 0
    assert result["a_requests_per_s"]["alone"] > 0
    assert result["a_requests_per_s"]["beside_b"] > 0
    assert "engine vllm, model cpu-ref's model" in capsys.readouterr().out


def test_adapter_scaling_draws_both_engines_in_one_plot(tmp_path) -> None:
    png, out = tmp_path / "a.png", tmp_path / "a.json"
    assert adapter_scaling.main(["--engine", "both", "--counts", "1,3", "--requests", "6",
                                 "--batch", "4", "--new-tokens", "2", "--prompt-tokens", "4",
                                 "--virtual-tokens", "3", "--repeats", "1",
                                 "--png", str(png), "--json", str(out)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    engines = json.loads(out.read_text())["engines"]
    assert list(engines) == ["builtin", "vllm"]
    for name, curve in engines.items():
        assert set(curve["tokens_per_s"]) == {"1", "3"}, name
        assert curve["bare_tokens_per_s"] > 0 and curve["startup_s"] > 0, name
