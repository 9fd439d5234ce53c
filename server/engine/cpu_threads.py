"""How many threads torch computes with on the CPU.

torch sizes its pool by the cores it sees, which in a container or on a shared host are not the
cores this process may use. An OpenMP team waits at every barrier for its slowest thread, so a
team with more threads than the process gets cores stalls whenever one thread is descheduled:
on 2 cores with 2 threads, one busy neighbour cut throughput 5-6 times. So the pool is sized by
what the process may actually run on (the scheduler affinity and the cgroup CPU quota), less
one core for the HTTP process's own work where there are several.

`plan_threads` decides from the readings alone (pure); `read_cpu_quota` and `affinity_cpus`
take the readings; `apply_torch_threads` does both, sets torch and logs why.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# Where a cgroup v1 hierarchy holding the cpu controller is mounted under the cgroup root.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


class ThreadSource(StrEnum):
    FLAG = "flag"  # --torch-threads N
    ENV = "env"  # OMP_NUM_THREADS, which torch itself honours
    QUOTA = "quota"  # the cgroup CPU quota is below the cores in the affinity mask
    AFFINITY = "affinity"  # the cores the scheduler lets this process run on


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    source: ThreadSource
    affinity: int  # cores in the scheduler affinity mask
    quota: float | None  # CPUs' worth of time per period the cgroup allows; None: no limit

    def describe(self) -> str:
        """Why this many threads, for the startup log."""
        head = f"torch computes with {self.threads} CPU thread(s)"
        if self.source is ThreadSource.FLAG:
            return f"{head} (--torch-threads {self.threads})"
        if self.source is ThreadSource.ENV:
            return f"{head} (OMP_NUM_THREADS={self.threads}; --torch-threads overrides it)"
        if self.source is ThreadSource.QUOTA:
            why = (f"the cgroup CPU quota allows {self.quota:g} CPU(s) of the "
                   f"{self.affinity} core(s) in the affinity mask")
        else:
            why = f"{self.affinity} core(s) in the scheduler affinity mask"
        spare = ", one left for the HTTP process" if _usable(self.affinity, self.quota) > 1 \
            else ""
        return f"{head} (automatic: {why}{spare}; --torch-threads N overrides it)"


def _usable(affinity: int, quota: float | None) -> int:
    """Whole cores the process may keep busy. A fractional quota rounds down: a team that
    outruns its quota is throttled whole until the next period, which costs more than the
    fraction of a core it would have used."""
    cores = max(1, affinity)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return cores


def plan_threads(*, flag: int, affinity: int, quota: float | None,
                 env_threads: int | None = None) -> ThreadPlan:
    """The thread count from the readings: --torch-threads when given, else OMP_NUM_THREADS
    when set, else the usable cores (affinity, capped by the quota) less one for the HTTP
    process where there are at least two. Never fewer than one."""
    if flag > 0:
        return ThreadPlan(flag, ThreadSource.FLAG, affinity, quota)
    if env_threads is not None and env_threads > 0:
        return ThreadPlan(env_threads, ThreadSource.ENV, affinity, quota)
    usable = _usable(affinity, quota)
    source = ThreadSource.QUOTA if usable < max(1, affinity) else ThreadSource.AFFINITY
    return ThreadPlan(max(1, usable - 1), source, affinity, quota)


def read_cpu_quota(cgroup_root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup path, in CPUs (quota / period): cgroup
    v2's `cpu.max`, v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`. A parent's limit binds
    its children, so every level from the process's cgroup up to the root counts; where that
    path is not visible (a container without its own cgroup namespace sees its own cgroup at
    the mount's root) the root is still read. None: no limit, or nothing readable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    quotas: list[float] = []
    for line in lines:
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":  # v2, the unified hierarchy
            quotas += _levels(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in _V1_CPU_MOUNTS:
                if (cgroup_root / mount).is_dir():
                    quotas += _levels(cgroup_root / mount, path, _v1_quota)
    if not lines:  # no /proc (or unreadable): the mount's own files are all there is
        quotas += _levels(cgroup_root, "/", _v2_quota)
    return min(quotas) if quotas else None


def _levels(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quota of every existing directory from `mount/path` up to `mount`."""
    parts = [p for p in path.strip("/").split("/") if p]
    found = []
    for depth in range(len(parts), -1, -1):
        directory = mount.joinpath(*parts[:depth])
        quota = read(directory) if directory.is_dir() else None
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(directory: Path) -> float | None:
    """`cpu.max` holds "$MAX $PERIOD", MAX being "max" when unlimited."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    """`cpu.cfs_quota_us` is -1 when unlimited."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def affinity_cpus() -> int:
    """Cores the scheduler lets this process run on (taskset, cpuset, a pinned pod), or every
    core where the platform cannot say (macOS has no sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def apply_torch_threads(flag: int) -> ThreadPlan:
    """Size torch's pools for this process (the one that runs the model) and log how many
    threads and why. `flag`: --torch-threads, 0 for automatic."""
    plan = plan_threads(flag=flag, affinity=affinity_cpus(), quota=read_cpu_quota(),
                        env_threads=_env_threads())
    # set_num_threads sets OpenMP's and MKL's counts too, so no OMP_* variable is needed here.
    torch.set_num_threads(plan.threads)
    try:
        # The inter-op pool starts lazily and the engine does not use it; capped all the same,
        # so nothing that does can start a second pool of one thread per node core.
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError:  # only settable before inter-op work starts, once per process
        log.debug("torch's inter-op threads were set already: %d",
                  torch.get_num_interop_threads())
    log.info("%s", plan.describe())
    return plan
