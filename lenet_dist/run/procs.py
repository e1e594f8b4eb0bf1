"""The processes of a job on this host, from /proc: what lenet-launch signals and the benches and tests kill."""
from __future__ import annotations

import os

from lenet_dist.launcher_env import RANK_VARS

_RANK_ENV = tuple(f"{v}=".encode() for v in RANK_VARS)


def descendants(root):
    """Pids of every process below `root` (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def local_ranks(mpirun_pid):
    """The trainer ranks mpirun started on this host: its descendants with an MPI rank in their environment."""
    ranks = []
    for pid in descendants(mpirun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(_RANK_ENV) for v in env):
            ranks.append(pid)
    return ranks
