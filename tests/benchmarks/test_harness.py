"""The benchmark harness end to end on shrunken workloads: every system runs, the JSON has what
docs/benchmarks.md promises, and the counts add up. No speed is asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.harness.cli import main
from benchmarks.harness.fixtures import make_requests
from benchmarks.harness.workloads import WORKLOADS

pytestmark = pytest.mark.slow
SMALL = ["--layers", "1", "--repeats", "1", "--no-progress"]


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main([*args, *SMALL, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cpu_ref_runs_every_system_and_reports_ratios(tmp_path, capsys) -> None:
    result = run(tmp_path, "cpu-ref", "--requests", "4", "--adapters", "3", "--new-tokens", "3",
                 "--peft-sample", "2", "--overhead-requests", "3")
    systems = result["systems"]
    assert set(systems) == {"engine", "http", "plain", "peft-sequential", "peft-batched"}
    for name, s in systems.items():
        assert (s["tokens"], s["requests"]) == (12, 4), name
        assert s["tokens_per_s"] > 0 and s["requests_per_s"] > 0
        assert 0 < s["ttft_ms"]["p50"] <= s["latency_ms"]["p99"], name
        assert len(s["runs_seconds"]) == 1
    assert systems["peft-sequential"]["extrapolated_from"] == 2
    assert systems["engine"]["extrapolated_from"] is None
    assert set(result["ratios"]) == {f"{s}/{b}" for s in ("engine", "http")
                                     for b in ("plain", "peft-sequential", "peft-batched")}
    assert result["overrides"] == {"requests": 4, "adapters": 3, "new_tokens": 3,
                                   "peft_sample": 2, "layers": 1}
    assert result["workload"]["shape"]["hidden"] == 768
    assert result["environment"]["commit"]
    overhead = result["extra"]["http_overhead"]
    assert overhead["requests"] == 3 and overhead["latency_ms_p50"] > overhead["engine_ms_p50"]
    printed = capsys.readouterr().out
    assert "OVERRIDDEN" in printed and "engine/peft-sequential" in printed
    assert result["extra"]["engine_process"] is False


def test_the_http_system_can_run_its_engine_in_a_child_process(tmp_path) -> None:
    result = run(tmp_path, "cpu-ref", "--modes", "http", "--baselines", "", "--requests", "4",
                 "--adapters", "3", "--new-tokens", "3", "--engine-process",
                 "--overhead-requests", "3")
    assert set(result["systems"]) == {"http"}
    assert (result["systems"]["http"]["tokens"], result["systems"]["http"]["requests"]) == (12, 4)
    assert result["extra"]["engine_process"] is True
    assert result["extra"]["http_overhead"]["requests"] == 3


@pytest.mark.parametrize("batching", ["static", "core"])
def test_mixed_lengths_reports_the_padding_static_batching_wastes(batching, tmp_path) -> None:
    args = ["--requests", "6", "--adapters", "3", "--new-tokens", "2", "--new-tokens-max", "9"]
    result = run(tmp_path, "mixed-lengths", *args, "--modes", "engine", "--baselines", "plain",
                 "--batching", batching)
    lengths = [r.new_tokens for r in make_requests(WORKLOADS["mixed-lengths"].with_overrides(
        requests=6, adapters=3, new_tokens=2, new_tokens_max=9))]
    assert len(set(lengths)) > 1
    # One batch (6 rows <= max_batch_size): every row runs to the longest one.
    expected = round(100 * (1 - sum(lengths) / (len(lengths) * max(lengths))), 1)
    assert result["extra"]["batching"] == batching
    assert result["extra"]["plain_wasted_row_steps_pct"] == expected
    assert result["systems"]["engine"]["tokens"] == sum(lengths)
    if batching == "static":
        assert result["extra"]["engine_batches"] == 1
        assert result["extra"]["engine_wasted_row_steps_pct"] == expected
    else:  # every step is a batch, and a row leaves the batch in the step it finishes
        # The rows join together; each step gives every running row one token (the first
        # step's comes from the prefill), so the longest row is done after max steps.
        assert result["extra"]["engine_batches"] == max(lengths)
        assert result["extra"]["engine_wasted_row_steps_pct"] == 0


def test_many_adapters_reports_cache_behaviour_from_a_cold_start(tmp_path) -> None:
    result = run(tmp_path, "many-adapters", "--requests", "24", "--adapters", "40",
                 "--cache-adapters", "4", "--new-tokens", "2", "--modes", "engine",
                 "--baselines", "")
    cache = result["extra"]["engine_prompt_cache_first_run"]
    # Each request looks its adapter up once, and again if its rows were evicted before it
    # started (a 4-adapter table runs at most 4 adapters at once).
    assert cache["hits"] + cache["misses"] >= 24
    distinct = result["extra"]["distinct_adapters_requested"]
    assert 1 < distinct <= 24
    loads = result["extra"]["engine_cold_loads_first_run"]
    assert distinct <= loads["count"] <= cache["misses"]  # a 4-adapter cache re-loads some
    assert cache["evictions"] >= distinct - 4
    assert loads["ms"]["p50"] > 0


@pytest.mark.parametrize(("policy", "batching"), [("round_robin", "core"),
                                                  ("fifo", "static")])
def test_fairness_reports_b_idle_and_under_a_flood(policy, batching, tmp_path) -> None:
    result = run(tmp_path, "fairness", "--backlog", "12", "--rounds", "2", "--cycles", "2",
                 "--policy", policy, "--batching", batching)["result"]
    assert (result["policy"], result["batching"], result["device"]) == (policy, batching, "cpu")
    assert (result["backlog_a"], result["rounds"], result["cycles"]) == (12, 2, 2)
    a = result["a_requests_per_s"]
    assert a["alone"] > 0 and a["beside_b"] > 0  # A keeps being served while B runs
    idle, loaded = result["b_idle_ms"], result["b_loaded_ms"]
    assert 0 < idle["p50"] <= idle["max"] and 0 < loaded["p50"] <= loaded["max"]
    assert result["ratio"] == pytest.approx(loaded["p50"] / idle["p50"])
