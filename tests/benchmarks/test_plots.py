"""Each plot's one command runs end to end on shrunken shapes and writes its PNG and JSON
(the figures themselves are benchmarks, not asserted here)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.plots import adapter_scaling, fairness_timeline, ttft_prompt_length

pytestmark = pytest.mark.slow


def _written(png, out) -> dict:
    assert png.read_bytes().startswith(b"\x89PNG")
    return json.loads(out.read_text())


ADAPTER_SCALING_SMALL = ["--counts", "1,3", "--requests", "6", "--batch", "4",
                         "--new-tokens", "2", "--prompt-tokens", "4", "--virtual-tokens", "3",
                         "--repeats", "1"]


def test_adapter_scaling_writes_a_point_per_count(tmp_path):
    png, out = tmp_path / "a.png", tmp_path / "a.json"
    assert adapter_scaling.main([*ADAPTER_SCALING_SMALL, "--png", str(png),
                                 "--json", str(out)]) == 0
    data = _written(png, out)
    assert set(data["engines"]) == {"builtin"}  # the default
    curve = data["engines"]["builtin"]
    assert set(curve["tokens_per_s"]) == {"1", "3"} and curve["bare_tokens_per_s"] > 0
    assert curve["startup_s"] > 0  # through the real server
    assert "heads of 32" in data["model"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is installed here")
@pytest.mark.parametrize("engine", ["vllm", "both"])
def test_adapter_scaling_on_vllm_needs_vllm_before_anything_is_built(engine, tmp_path):
    with pytest.raises(SystemExit, match="pip install"):
        adapter_scaling.main([*ADAPTER_SCALING_SMALL, "--engine", engine,
                              "--png", str(tmp_path / "a.png"),
                              "--json", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.png").exists()


def test_ttft_prompt_length_writes_a_point_per_length(tmp_path):
    # One length: each runs long_prompts.py with two servers, about 16 s here.
    png, out = tmp_path / "t.png", tmp_path / "t.json"
    assert ttft_prompt_length.main(["--lengths", "8", "--layers", "1", "--requests", "2",
                                    "--samples", "2", "--png", str(png),
                                    "--json", str(out)]) == 0
    points = _written(png, out)["points"]
    assert [p["virtual_tokens"] for p in points] == [8]
    assert all(p["prefix-cache"] > 0 and p["no-prefix-cache"] > 0 for p in points)


def test_fairness_timeline_records_b_before_during_and_after_the_flood(tmp_path):
    png, out = tmp_path / "f.png", tmp_path / "f.json"
    assert fairness_timeline.main(["--seconds", "3", "--flood-start", "1", "--flood-end", "2",
                                   "--backlog", "8", "--new-tokens", "2",
                                   "--png", str(png), "--json", str(out)]) == 0
    series = _written(png, out)["b_latency_s"]
    assert set(series) == {"round_robin", "fifo"}
    for points in series.values():
        times = [t for t, _ in points]
        assert min(times) < 1 and max(times) >= 2
