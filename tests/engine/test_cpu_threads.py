"""Torch's CPU threads are sized by what the process may use: --torch-threads, else
OMP_NUM_THREADS, else the scheduler affinity capped by the cgroup CPU quota, less one core for
the HTTP process. The quota is read from real cgroup files laid out in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.cpu_threads import (
    ThreadSource,
    apply_torch_threads,
    plan_threads,
    read_cpu_quota,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


# plan_threads: the decision from the readings


def test_the_flag_wins_over_quota_affinity_and_environment():
    plan = plan_threads(flag=6, affinity=2, quota=1.0, env_threads=3)
    assert (plan.threads, plan.source) == (6, ThreadSource.FLAG)
    assert "--torch-threads 6" in plan.describe()


def test_omp_num_threads_wins_over_the_automatic_count():
    plan = plan_threads(flag=0, affinity=16, quota=None, env_threads=3)
    assert (plan.threads, plan.source) == (3, ThreadSource.ENV)
    assert "OMP_NUM_THREADS=3" in plan.describe()


def test_affinity_leaves_one_core_for_the_http_process():
    plan = plan_threads(flag=0, affinity=2, quota=None)
    assert (plan.threads, plan.source) == (1, ThreadSource.AFFINITY)
    assert "2 core(s) in the scheduler affinity mask, one left for the HTTP process" \
        in plan.describe()
    assert plan_threads(flag=0, affinity=8, quota=None).threads == 7


def test_a_single_core_gets_one_thread_and_keeps_none_back():
    plan = plan_threads(flag=0, affinity=1, quota=None)
    assert (plan.threads, plan.source) == (1, ThreadSource.AFFINITY)
    assert "one left" not in plan.describe()


@pytest.mark.parametrize(("quota", "threads"), [(4.0, 3), (2.5, 1), (2.0, 1), (0.5, 1),
                                                (7.9, 6)])
def test_a_quota_below_the_cores_caps_the_threads(quota, threads):
    plan = plan_threads(flag=0, affinity=64, quota=quota)
    assert (plan.threads, plan.source) == (threads, ThreadSource.QUOTA)
    assert f"quota allows {quota:g} CPU(s) of the 64 core(s)" in plan.describe()


def test_a_quota_above_the_affinity_leaves_affinity_in_charge():
    plan = plan_threads(flag=0, affinity=4, quota=8.0)
    assert (plan.threads, plan.source) == (3, ThreadSource.AFFINITY)


# read_cpu_quota: cgroup v2 and v1 files


def test_v2_in_a_container_reads_cpu_max_at_the_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "200000 100000\n")
    assert read_cpu_quota(root, _proc_cgroup(tmp_path, "0::/\n")) == 2.0


def test_v2_unlimited_is_no_quota(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    assert read_cpu_quota(root, _proc_cgroup(tmp_path, "0::/\n")) is None


def test_v2_a_parent_limit_binds_the_process_cgroup(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    _write(root / "kubepods" / "pod1" / "app" / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "cpu.max", "800000 100000\n")
    proc = _proc_cgroup(tmp_path, "0::/kubepods/pod1/app\n")
    assert read_cpu_quota(root, proc) == 1.5


def test_v1_without_a_cgroup_namespace_reads_the_mount_root(tmp_path):
    # The container sees the host's path in /proc/self/cgroup but its own cgroup mounted
    # at the root of the hierarchy.
    mount = tmp_path / "cgroup" / "cpu,cpuacct"
    _write(mount / "cpu.cfs_quota_us", "300000\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    proc = _proc_cgroup(tmp_path, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert read_cpu_quota(tmp_path / "cgroup", proc) == 3.0


def test_v1_unlimited_is_no_quota(tmp_path):
    mount = tmp_path / "cgroup" / "cpu"
    _write(mount / "cpu.cfs_quota_us", "-1\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    assert read_cpu_quota(tmp_path / "cgroup", _proc_cgroup(tmp_path, "1:cpu:/\n")) is None


def test_v1_the_tightest_level_on_the_path_counts(tmp_path):
    mount = tmp_path / "cgroup" / "cpu"
    _write(mount / "cpu.cfs_quota_us", "-1\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    _write(mount / "job" / "cpu.cfs_quota_us", "50000\n")
    _write(mount / "job" / "cpu.cfs_period_us", "100000\n")
    assert read_cpu_quota(tmp_path / "cgroup", _proc_cgroup(tmp_path, "1:cpu:/job\n")) == 0.5


def test_a_cpuacct_only_hierarchy_is_not_a_quota(tmp_path):
    mount = tmp_path / "cgroup" / "cpuacct"
    _write(mount / "cpu.cfs_quota_us", "100000\n")
    _write(mount / "cpu.cfs_period_us", "100000\n")
    assert read_cpu_quota(tmp_path / "cgroup", _proc_cgroup(tmp_path, "2:cpuacct:/\n")) is None


@pytest.mark.parametrize("content", ["", "garbage\n", "100000\n", "abc 100000\n",
                                     "100000 0\n"])
def test_unreadable_cpu_max_is_no_quota(tmp_path, content):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", content)
    assert read_cpu_quota(root, _proc_cgroup(tmp_path, "0::/\n")) is None


def test_nothing_mounted_and_no_proc_file_is_no_quota(tmp_path):
    assert read_cpu_quota(tmp_path / "absent", tmp_path / "no-proc-file") is None


def test_without_a_proc_file_the_mount_root_still_counts(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "100000 100000\n")
    assert read_cpu_quota(root, tmp_path / "no-proc-file") == 1.0


# apply_torch_threads: torch is set to the plan


def test_apply_sets_torch_to_the_flag(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        plan = apply_torch_threads(3)
        assert (plan.threads, plan.source) == (3, ThreadSource.FLAG)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
