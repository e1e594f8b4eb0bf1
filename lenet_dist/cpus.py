"""How many CPUs this process may use: the CPUs it may run on (sched_getaffinity: taskset, cpusets, Slurm's
--cpus-per-task) and its cgroup's CPU quota (a container's --cpus, systemd's CPUQuota=, Kubernetes' CPU
limit), the smaller of the two, rounded up. A quota is read along the cgroup's path up to the root, since
a parent's limit binds its children too: cgroup v2's cpu.max ("QUOTA PERIOD" or "max PERIOD") and v1's
cpu.cfs_quota_us / cpu.cfs_period_us (-1: none).

    n, why = available()        # (2, "2 CPUs in its affinity mask, no cgroup CPU quota")
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _read(path):
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root, relative):
    """root/relative, then each parent up to root itself."""
    parts = [p for p in relative.strip("/").split("/") if p]
    return [Path(root, *parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_quota(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The tightest CPU quota (in CPUs, a float) on this process' cgroup path, or None when there is none."""
    text = _read(proc_cgroup) or ""
    quotas = []
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":                        # cgroup v2, the unified hierarchy
            base = root if Path(root, "cgroup.controllers").exists() else Path(root, "unified")
            for d in _ancestors(base, path):
                quota, _, period = (_read(d / "cpu.max") or "").partition(" ")
                if quota.isdigit() and period.isdigit() and int(period) > 0:
                    quotas.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):                       # cgroup v1's cpu controller
            base = Path(root, controllers)
            if not base.exists():
                base = Path(root, "cpu")
            for d in _ancestors(base, path):
                quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:
                    quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def affinity():
    """The CPUs this process may run on (its affinity mask), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def available(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """(CPUs this process may use, at least 1; one line saying why)."""
    mask = len(affinity())
    quota = cgroup_quota(proc_cgroup, root)
    n = mask if quota is None else max(1, min(mask, math.ceil(quota - 1e-9)))
    return n, (f"{mask} CPU{'s' * (mask != 1)} in its affinity mask, "
               + ("no cgroup CPU quota" if quota is None else f"a cgroup CPU quota of {quota:g} CPUs"))
