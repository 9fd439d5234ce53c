"""benchmarks/prefill_burst.py runs and reports what it prints; no speed is asserted."""

from __future__ import annotations

import pytest

from benchmarks.prefill_burst import measure

pytestmark = pytest.mark.slow


async def test_prefill_burst_reports_the_stream_gaps_around_a_burst() -> None:
    r = await measure(budget=300, burst=4, prompt_tokens=200, device="cpu")
    assert (r["budget"], r["burst"], r["prompt_tokens"]) == (300, 4, 200)
    assert r["gap_before_ms"] > 0 and r["burst_s"] > 0
    assert r["gap_during_max_ms"] >= r["gap_during_p99_ms"] > 0
    assert r["step_during_max_ms"] > 0
