"""The communicator: the only module that knows MPI.

Tiny on purpose: rank, size, in-place allreduce (sum) of a NumPy buffer, broadcast from rank 0, allgather
of a small buffer, barrier, abort. `LocalComm` is the one-process version and needs no MPI at all;
`MPIComm` uses mpi4py's upper-case buffer calls only (no pickle ever crosses the wire).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .halfprec import from_bfloat16, to_bfloat16

# Environment variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")

# MPICH spins while it waits for a peer. On an oversubscribed node (mpirun -n 4 on 2 cores, or any node
# shared with other work) the spinning rank steals the core from the rank it waits for: plain MPICH ran 4
# ranks on 2 cores at 667-939 images/s. Two waits differ, and each gets its own remedy:
# - waiting for a peer that is still computing (most of the wait): allreduce_ first waits for everybody to
#   arrive in an MPI_Ibarrier, testing it between naps of `LENET_MPI_NAP_US` microseconds (time.sleep),
#   so the waiter gives its core to the rank it waits for;
# - the collective itself, once all are in it: the throttle makes MPICH's wait loop sched_yield after
#   every fruitless poll, so two ranks sharing a core take turns quickly. (MPIR_CVAR_ENABLE_HEAVY_YIELD=1,
#   a nanosleep per fruitless poll, was the first fix: it gives the core away in both waits, but each
#   round of the collective then waits for a sleeping peer, ~6 ms of a 24 ms step at 4 ranks.)
# Measured with bench/scaling.py (bench/README.md, "Waiting politely"). Neither is applied when the node
# has a core per rank: 2 ranks on 2 cores ran ~5% faster without them. Users override any from the
# environment (LENET_MPI_NAP_US=off: no Ibarrier, the collective waits alone).
MPICH_OVERSUBSCRIBED_DEFAULTS = {
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
}
NAP_US_DEFAULT = 20
ABORT_GRACE_S = 0.3            # time the launcher gets to forward the reason for an abort


def _nap_seconds():
    """Seconds between tests of the arrival barrier, or None for no barrier (LENET_MPI_NAP_US=off)."""
    text = os.environ.get("LENET_MPI_NAP_US", str(NAP_US_DEFAULT)).strip().lower()
    if text in ("off", "none", "-1"):
        return None
    try:
        us = float(text)
    except ValueError:
        raise ValueError(f"LENET_MPI_NAP_US must be a number of microseconds or 'off', got {text!r}") from None
    if not (0 <= us <= 1e6):
        raise ValueError(f"LENET_MPI_NAP_US must be between 0 and 1000000, got {text!r}")
    return us * 1e-6


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
    nap = None                              # no arrival barrier: nothing to wait for

    def allreduce_(self, buf):
        return buf

    def bcast_(self, buf):
        return buf

    def allgather(self, buf):
        return np.asarray(buf)[None].copy()

    def barrier(self):
        pass

    def wait_for_all(self):
        pass

    def iallreduce_(self, buf, dtype="float32"):
        return _DONE

    def test_all(self, requests):
        return True

    def wait_all(self, requests):
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
        self.nap = None                     # seconds between arrival tests; None: the collective waits alone
        if oversubscribed_defaults and _oversubscribed():
            for k, v in MPICH_OVERSUBSCRIBED_DEFAULTS.items():
                os.environ.setdefault(k, v)
            self.nap = _nap_seconds()
        import mpi4py
        mpi4py.rc.threads = False           # no MPI_THREAD_MULTIPLE: ranks are single-threaded callers
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_(self, buf):
        """Sum `buf` over all ranks, in place, in one call (oversubscribed: after everyone has arrived)."""
        self.wait_for_all()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def wait_for_all(self):
        """Oversubscribed: return once every rank has arrived here, napping meanwhile. Otherwise at once."""
        if self.nap is not None:
            arrived = self.comm.Ibarrier()
            while not arrived.Test():
                time.sleep(self.nap)        # give the core to the peer we wait for

    # Non-blocking sums for the bucketed allreduce (buckets.py): start one as soon as its gradients are
    # ready, let MPI progress it while backward goes on, wait before the update. MPICH progresses a
    # non-blocking collective only inside MPI calls (no progress thread: ranks are single-threaded), so
    # the caller tests its requests between layers (test_all).
    def iallreduce_(self, buf, dtype="float32"):
        """Start summing `buf` over all ranks in place; returns the request. dtype 'float16' / 'bfloat16':
        `buf` holds half-precision values (np.float16, or bfloat16 bits in np.uint16)."""
        mpi_type, op = self._half_types(dtype)
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf if mpi_type is None else [buf, mpi_type], op=op)

    def test_all(self, requests):
        """Let MPI move the requests along; True when all are done."""
        return self.MPI.Request.Testall(requests)

    def wait_all(self, requests):
        """Wait for every request (oversubscribed: testing between naps, as wait_for_all does)."""
        if self.nap is None:
            self.MPI.Request.Waitall(requests)
            return
        while not self.MPI.Request.Testall(requests):
            time.sleep(self.nap)

    def _half_types(self, dtype):
        """(MPI datatype or None for the buffer's own, op) for a reduction in `dtype`."""
        if dtype == "float32":
            return None, self.MPI.SUM
        if dtype == "float16":                          # MPICH sums MPIX_C_FLOAT16 natively
            return self.MPI.FLOAT16_T, self.MPI.SUM
        if dtype == "bfloat16":                         # no native bfloat16 here: a user op on the bits
            if getattr(self, "_bf16_op", None) is None:
                self._bf16_op = self.MPI.Op.Create(_bf16_sum, commute=True)
            return self.MPI.UINT16_T, self._bf16_op
        raise ValueError(f"allreduce dtype must be float32, float16 or bfloat16, got {dtype!r}")

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

    def abort(self, code=1, grace=ABORT_GRACE_S):
        """End every rank of the job now (MPI_Abort): the way out that can never hang on a dead peer.

        The launcher forwards our stderr through a pipe it polls; MPI_Abort makes it tear the job down at
        once, and what sat unread in that pipe (the one-line reason for the abort) was lost in about one
        abort in four. A short grace after the flush lets the launcher forward it first.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(grace)
        self.comm.Abort(code)

    def processor_name(self):
        return self.MPI.Get_processor_name()


class _Done:
    """LocalComm's request: complete from the start."""

    def Test(self):
        return True

    def Wait(self):
        pass


_DONE = _Done()


def _bf16_sum(inbuf, inoutbuf, datatype):
    """MPI user op: inout += in, both bfloat16 bits (uint16), summed in float32 and rounded back."""
    a, b = np.frombuffer(inbuf, np.uint16), np.frombuffer(inoutbuf, np.uint16)
    b[:] = to_bfloat16(from_bfloat16(a) + from_bfloat16(b))


def get_comm(force_local=False):
    """MPIComm when launched by an MPI launcher, else LocalComm (no MPI library is even loaded)."""
    if force_local or not launched_by_mpi():
        return LocalComm()
    return MPIComm()
