"""benchmarks/fairness.py --http: the fairness scenario through the real server (a subprocess
with two tenants in an --api-keys file) over loopback HTTP. No speed is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.fairness import main, run_fairness

pytestmark = pytest.mark.slow


async def test_fairness_over_http_reports_both_phases_and_both_rates() -> None:
    r = await run_fairness(backlog=6, rounds=1, cycles=1, http=True, prompt_tokens=40,
                           torch_threads=1)
    assert r["http"] is True and r["prompt_tokens"] == 40 and r["torch_threads"] == 1
    assert r["engine"] == "builtin" and r["model"] == "builtin:tiny (byte tokenizer)"
    assert r["b_idle_ms"]["p50"] > 0 and r["b_loaded_ms"]["p50"] > 0 and r["ratio"] > 0
    assert r["a_requests_per_s"]["alone"] > 0 and r["a_requests_per_s"]["beside_b"] > 0


async def test_over_http_the_server_runs_its_own_policy() -> None:
    with pytest.raises(ValueError, match="round robin"):
        await run_fairness(backlog=2, rounds=1, cycles=1, http=True, policy="fifo")


async def test_the_engine_process_is_a_server_option() -> None:
    with pytest.raises(ValueError, match="--http"):
        await run_fairness(backlog=2, rounds=1, cycles=1, engine_process=True)


def test_over_http_a_workloads_model_is_served_and_named_in_the_json(tmp_path, capsys) -> None:
    out = tmp_path / "fairness.json"
    assert main(["--http", "--model", "cpu-ref", "--layers", "1", "--backlog", "6",
                 "--rounds", "1", "--cycles", "1", "--torch-threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["engine"] == "builtin" and result["http"] is True
    assert "cpu-ref's model: gpt2 shape, 1 layers" in result["model"]
    assert "12 heads of 64" in result["model"] and result["max_model_len"] == 64
    assert result["b_loaded_ms"]["p50"] > 0 and result["a_requests_per_s"]["beside_b"] > 0
    assert "engine builtin, model cpu-ref's model" in capsys.readouterr().out
