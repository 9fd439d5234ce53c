"""`python -m benchmarks cpu-ref --engine vllm` end to end, shrunken: the real server on the
vllm engine and plain vLLM's OpenAI server with prompt embeddings (the vllm-peer baseline)
serve every request, and the JSON has what docs/benchmarks.md promises. No speed is asserted.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.harness.cli import main

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here (build its environment with .ci/vllm-env)",
                allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two vLLM servers start
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
