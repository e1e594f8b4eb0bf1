"""What a launcher tells a process before MPI starts, from its environment variables only (no MPI here):
this process's rank, how many ranks were started and how many share this node (mpirun/mpiexec: Hydra's PMI,
Open MPI, PMIx; srun), the node's cores (affinity, cgroup quota, Slurm), and whether the launcher belongs to
the MPI library mpi4py loaded. comm.py builds its communicator on these facts.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

# Set by MPI launchers in every process they start (Hydra's PMI, Open MPI, PMIx): the one list.
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")                 # this process's rank
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")                 # how many ranks were started
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "PMI_LOCAL_SIZE")  # on this node
LAUNCHER_VARS = RANK_VARS + SIZE_VARS + LOCAL_SIZE_VARS + ("HYDI_CONTROL_FD",)   # any: started by a launcher


def launcher_rank(env=None):
    """This process's rank as its launcher set it (any of RANK_VARS, or Slurm's SLURM_PROCID), read before
    MPI starts; None outside a launcher. `env`: a mapping of str (default os.environ)."""
    env = os.environ if env is None else env
    for var in (*RANK_VARS, "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def _slurm_tasks_here(env):
    """Tasks of this Slurm step on this node, from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
    ("2(x3),1": 2 on each of the first three nodes, 1 on the fourth) at index SLURM_NODEID; else 0."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return 0
        counts += [int(m[1])] * int(m[2] or 1)
    node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
    return counts[node] if node < len(counts) else 0


def cgroup_cores(root="/sys/fs/cgroup", membership="/proc/self/cgroup"):
    """Cores this process's cgroup may use by its CPU quota (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), rounded
    up; None without a quota. A container or Kubernetes pod limited to 2 CPUs sees every core of its host
    in os.cpu_count(); its quota is what it gets."""
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        try:
            if controllers == "":                                          # v2: one unified hierarchy
                quota, period = Path(root, rel, "cpu.max").read_text().split()
                if quota == "max":
                    return None
            elif "cpu" in controllers.split(","):                          # v1: the cpu controller's own tree
                d = Path(root, controllers, rel)
                quota, period = (d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()
                if int(quota) < 0:
                    return None
            else:
                continue
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return None


def node_layout(env=None, cpu_count=None, cgroup=None):
    """(ranks on this node, cores for them, where the rank count came from); ranks 0 when nobody says.

    The ranks come from the launcher: Hydra's MPI_LOCALNRANKS, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE,
    PMI(x)'s local size, Slurm's tasks per node. The cores are the node's (os.cpu_count), not this
    process's affinity mask: a launcher that binds each rank to one core (Open MPI's default, srun
    --cpu-bind, Hydra -bind-to core) leaves a mask of one core on a node with a core per rank. What may
    hold only part of the node caps the count: a cgroup CPU quota (containers, pods), Slurm's
    SLURM_CPUS_ON_NODE, and LENET_NODE_CORES, set by hand. `cgroup`: cores by quota (tests; default: read).
    """
    env = os.environ if env is None else env
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    quota = cgroup_cores() if cgroup is None else cgroup
    if quota:
        cores = min(cores, quota)
    for var in ("SLURM_CPUS_ON_NODE", "LENET_NODE_CORES"):
        if env.get(var, "").isdigit() and int(env[var]) > 0:
            cores = min(cores, int(env[var]))
    for var in LOCAL_SIZE_VARS:
        if env.get(var, "").isdigit():
            return int(env[var]), cores, var
    if "SLURM_PROCID" in env:
        tasks = _slurm_tasks_here(env)
        if tasks:
            return tasks, cores, "Slurm tasks per node"
    return 0, cores, None


def oversubscribed(env=None, cpu_count=None, cgroup=None):
    """More ranks on this node than cores for them; True when the launcher does not tell (the safe side).
    Under Slurm, --cpus-per-task C books C cores per rank: ranks * C must fit."""
    env = os.environ if env is None else env
    local, cores, _ = node_layout(env, cpu_count, cgroup)
    per_rank = int(env["SLURM_CPUS_PER_TASK"]) if env.get("SLURM_CPUS_PER_TASK", "").isdigit() else 1
    return local == 0 or local * max(per_rank, 1) > cores


def launcher_size(env=None):
    """(ranks the launcher says it started, the variable that says so), or (None, None)."""
    env = os.environ if env is None else env
    for var in SIZE_VARS + ("SLURM_STEP_NUM_TASKS",):
        if env.get(var, "").isdigit():
            return int(env[var]), var
    return None, None


def library_family(version):
    """'MPICH', 'Open MPI' or None from MPI_Get_library_version's text."""
    return next((family for family in ("Open MPI", "MPICH") if version.startswith(family)), None)


def launched_by_mpi():
    """True when this process was started by an MPI launcher (mpirun, mpiexec, srun with PMI)."""
    return any(v in os.environ for v in LAUNCHER_VARS) or "SLURM_PROCID" in os.environ and \
        int(os.environ.get("SLURM_NTASKS", "1")) > 1


class LauncherMismatch(RuntimeError):
    """The launcher started N ranks, the MPI library sees 1: mpi4py's MPI is not the launcher's."""


def check_launcher(library, size=None, env=None):
    """Raise LauncherMismatch when the launcher is not for `library` (before MPI_Init: `size` None, judged
    from the launcher's variables, since MPICH under Open MPI's mpirun dies inside MPI_Init), or when it
    started N ranks and MPI sees `size` 1 (after)."""
    env = os.environ if env is None else env
    started, var = launcher_size(env)
    family = library_family(library)
    foreign = (family == "MPICH" and "OMPI_COMM_WORLD_SIZE" in env and "PMI_SIZE" not in env) or \
              (family == "Open MPI" and "PMI_SIZE" in env and "PMIX_RANK" not in env)
    if started is not None and started > 1 and (foreign if size is None else size == 1):
        raise LauncherMismatch(
            f"the launcher started {started} ranks ({var}={started}) but the MPI library ({library}) "
            f"{'cannot join them' if size is None else 'sees 1'}: this mpirun is not the one of the MPI that "
            f"mpi4py uses; launch with that library's mpirun")
