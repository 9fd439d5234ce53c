"""benchmarks/engine_costs.py runs on the CPU and reports every figure it prints; no speed is
asserted (a benchmark's numbers are a printout, not a test)."""

from __future__ import annotations

import pytest

from benchmarks.engine_costs import GilHolder, run

pytestmark = pytest.mark.slow


def test_engine_costs_reports_passes_and_both_loop_shapes() -> None:
    r = run(device="cpu", model="builtin:tiny", seconds=0.3, busy=[0, 30], repeats=2,
            move_shape=(16, 2, 64, 16), widths=(8, 40))
    assert (r["device"], r["dtype"], r["prompt_tokens"]) == ("cpu", "float32", 25)
    assert [p["rows"] for p in r["passes"]] == [1, 4, 8, 16, 32]
    assert all(p["prefill_ms"] > 0 and p["step_ms"] > 0 for p in r["passes"])
    assert set(r["staggered"]) == {0, 30}
    for loop in (r["lockstep"], *r["staggered"].values()):
        assert loop["requests_per_s"] > 0 and loop["step_ms"] > 0 and loop["admit_ms"] > 0
    move = r["cache_move"]
    assert move["shape"] == [16, 2, 64, 16] and move["join_ms"] > 0 and move["park_ms"] > 0
    assert [w["width"] for w in r["step_by_width"]] == [8, 40]
    assert all(w["in_place_ms"] > 0 and w["concatenating_ms"] > 0 for w in r["step_by_width"])


def test_gil_holder_stops() -> None:
    with GilHolder(50) as holder:
        pass
    assert not holder._thread.is_alive()
