"""The communicator: the only module that knows MPI.

Tiny on purpose: rank, size, in-place allreduce (sum) of a NumPy buffer, broadcast from rank 0, allgather
of a small buffer, barrier, abort. `LocalComm` is the one-process version and needs no MPI at all;
`MPIComm` uses mpi4py's upper-case buffer calls only (no pickle ever crosses the wire).
"""
from __future__ import annotations

import os
import sys

import numpy as np

# Environment variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")

# MPICH spins while it waits for a peer. On an oversubscribed node (mpirun -n 4 on 2 cores, or any node
# shared with other work) the spinning rank steals the core from the rank it waits for. In this MPICH
# (5.0.2, ch4) the throttle makes the wait loop yield after every N fruitless polls, and heavy yield turns
# each yield into a nanosleep, so the waiter really gives the core away (strace: ~24k nanosleeps instead
# of ~18k sched_yields in 0.5 s of waiting). Measured with bench/scaling.py on 2 shared cores, global
# batch 256, medians of 4 interleaved runs: 4 ranks 667 -> 6,709 images/s (10x), 2 ranks 4,192 -> 7,570.
# Yielding alone (throttle without heavy yield: 4 ranks 4,193) or heavy yield alone (480) is not enough;
# MPIR_CVAR_POLLS_BEFORE_YIELD belongs to the ch3 device and does nothing here. Cost: a bare back-to-back
# allreduce of the gradient takes ~1-2 ms longer: on an idle machine 2 ranks on 2 cores ran 5% faster
# without them (10,567 vs 9,990 images/s; allreduce+wait share 7% vs 13%), so they apply only when this
# node runs more ranks than it has cores (or when the launcher does not say how many it runs here).
# Users override any of these from the environment.
MPICH_OVERSUBSCRIBED_DEFAULTS = {
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
}


def _oversubscribed():
    """More ranks on this node than cores for them; True when the launcher does not tell (the safe side)."""
    local = next((int(os.environ[v]) for v in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                "PMI_LOCAL_SIZE") if os.environ.get(v, "").isdigit()), 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return local == 0 or local > cores


def launched_by_mpi():
    """True when this process was started by an MPI launcher (mpirun, mpiexec, srun with PMI)."""
    return any(v in os.environ for v in _LAUNCHER_VARS) or "SLURM_PROCID" in os.environ and \
        int(os.environ.get("SLURM_NTASKS", "1")) > 1


class LocalComm:
    """One process: every collective is the identity."""

    rank, size, is_mpi = 0, 1, False

    def allreduce_(self, buf):
        return buf

    def bcast_(self, buf):
        return buf

    def allgather(self, buf):
        return np.asarray(buf)[None].copy()

    def barrier(self):
        pass

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def processor_name(self):
        import socket
        return socket.gethostname()


class MPIComm:
    """COMM_WORLD through mpi4py. Importing this class's module does not initialise MPI; creating it does."""

    is_mpi = True

    def __init__(self, oversubscribed_defaults=True):
        if oversubscribed_defaults and _oversubscribed():
            for k, v in MPICH_OVERSUBSCRIBED_DEFAULTS.items():
                os.environ.setdefault(k, v)
        import mpi4py
        mpi4py.rc.threads = False           # no MPI_THREAD_MULTIPLE: ranks are single-threaded callers
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_(self, buf):
        """Sum `buf` over all ranks, in place, in one call."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def bcast_(self, buf):
        """Overwrite `buf` on every rank with rank 0's."""
        self.comm.Bcast(buf, root=0)
        return buf

    def allgather(self, buf):
        """(size, *buf.shape) array of every rank's `buf`."""
        buf = np.ascontiguousarray(buf)
        out = np.empty((self.size,) + buf.shape, buf.dtype)
        self.comm.Allgather(buf, out)
        return out

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job now (MPI_Abort): the way out that can never hang on a dead peer."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def processor_name(self):
        return self.MPI.Get_processor_name()


def get_comm(force_local=False):
    """MPIComm when launched by an MPI launcher, else LocalComm (no MPI library is even loaded)."""
    if force_local or not launched_by_mpi():
        return LocalComm()
    return MPIComm()
