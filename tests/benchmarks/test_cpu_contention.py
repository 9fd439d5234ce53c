"""benchmarks/cpu_contention.py: the real server quiet and beside a pinned busy loop, one
server per --torch-threads setting, as a quick CPU smoke (a one-layer model, 4 requests). No
speed is asserted."""

from __future__ import annotations

import os

import pytest

from benchmarks.cpu_contention import busy_core, print_contention, run_contention
from server.engine.cpu_threads import affinity_cpus, plan_threads, read_cpu_quota


def test_the_hog_is_pinned_while_it_runs_and_gone_after():
    core = sorted(os.sched_getaffinity(0))[-1]
    with busy_core(core) as hog:
        assert hog.poll() is None
        assert os.sched_getaffinity(hog.pid) == {core}
    assert hog.poll() is not None


@pytest.mark.slow
def test_each_setting_runs_quiet_and_beside_the_hog(capsys):
    r = run_contention(threads=["auto", "3"], repeats=1, layers=1, requests=4, adapters=4,
                       new_tokens=4, prompt_tokens=8)
    auto, three = r["servers"]
    # What each server reported computing with: the harness passes its own thread count to
    # the servers it compares, which must not reach the one that sizes itself.
    expected = plan_threads(flag=0, affinity=affinity_cpus(), quota=read_cpu_quota()).threads
    assert (auto["threads_flag"], auto["torch_threads"]) == ("auto", expected)
    assert (three["threads_flag"], three["torch_threads"]) == ("3", 3)
    for s in (auto, three):
        assert s["tokens_per_run"] == 4 * 4
        assert len(s["quiet_runs_s"]) == len(s["hog_runs_s"]) == 1
        assert s["ratio"] == pytest.approx(s["hog_tokens_per_s"] / s["quiet_tokens_per_s"])
    assert r["hog_core"] in r["cores"]
    print_contention(r)
    assert "auto beside the hog" in capsys.readouterr().out


def test_a_hog_core_outside_the_affinity_is_refused():
    with pytest.raises(SystemExit, match="--hog-core"):
        run_contention(hog_core=max(os.sched_getaffinity(0)) + 1)
