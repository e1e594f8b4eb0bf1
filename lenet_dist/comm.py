"""The communicator: the only module that knows MPI, and what the processes need to know about launchers.

The communicator's calls: rank, size, in-place allreduce (sum) of a NumPy buffer, broadcast from rank 0,
allgather of a small buffer, barrier, abort, and the non-blocking sums the bucketed reducer starts during
backward (parallel/buckets.py). `LocalComm` is the one-process version and needs no MPI at all; `MPIComm`
uses mpi4py's upper-case buffer calls only (no pickle ever crosses the wire); JSON travels as its bytes
(bcast_json, allgather_json). Around them: how a rank waits on a node with more ranks than cores, and the
node's shared memory and common name for ranks that take turns there (parallel/turns.py). What the launcher says before
MPI starts (ranks, node layout, launcher checks) is read in launcher_env.py.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np

from lenet_dist import cpus
from lenet_dist.launcher_env import check_launcher, launched_by_mpi, library_family, node_layout, oversubscribed
from lenet_dist.parallel.halfprec import from_bfloat16, to_bfloat16
from lenet_dist.parallel import turns as turns_


# An MPI library spins while it waits for a peer. On an oversubscribed node (mpirun -n 4 on 2 cores, or any
# node shared with other work) the spinning rank steals the core from the rank it waits for. Two waits
# differ, and each gets its own remedy:
# - waiting for a peer that is still computing (most of the wait): allreduce_ first waits for everybody to
#   arrive in an MPI_Ibarrier, testing it between naps of `LENET_MPI_NAP_US` microseconds (time.sleep),
#   so the waiter gives its core to the rank it waits for;
# - the collective itself, once all are in it: the library's own setting that makes its wait loop yield the
#   core after a fruitless poll, so two ranks sharing a core take turns quickly (not a sleep per poll:
#   each round of the collective would then wait for a sleeping peer). MPICH: the CH4 progress throttle.
#   Open MPI: mpi_yield_when_idle, its sched_yield in the progress loop.
# Neither is applied when the node has a core per rank, where they only cost time. Figures: docs/scaling.md
# ("Waiting politely"). Users override any from the environment (LENET_MPI_NAP_US=off: no Ibarrier, the
# collective waits alone).
OVERSUBSCRIBED_DEFAULTS = {
    "MPICH": {"MPIR_CVAR_CH4_PROGRESS_THROTTLE": "1", "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1"},
    "Open MPI": {"OMPI_MCA_mpi_yield_when_idle": "1"},
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


class LocalComm:
    """One process: every collective is the identity."""

    rank, size, is_mpi = 0, 1, False
    ranks_per_node = 1
    nap = None                              # no arrival barrier: nothing to wait for
    turns, turn, turn_size = 1, 0, 1        # no turns (parallel/turns.py)

    def allreduce_(self, buf, nonblocking=False):
        return buf

    def bcast_(self, buf):
        return buf

    def allgather(self, buf):
        return np.asarray(buf)[None].copy()

    def barrier(self):
        pass

    def wait_for_all(self):
        pass

    def lane(self):
        return self

    def iallreduce_(self, buf, dtype="float32"):
        return _DONE

    def ialltoall_(self, send, recv):
        recv.reshape(-1)[...] = send.reshape(-1)
        return _DONE

    def iallgather_(self, send, recv):
        recv.reshape(-1)[...] = send.reshape(-1)
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

    def __init__(self):
        import mpi4py
        mpi4py.rc.threads = False           # no MPI_THREAD_MULTIPLE: ranks are single-threaded callers
        mpi4py.rc.initialize = False        # first learn which library this is: its tuning goes in before Init
        mpi4py.rc.finalize = True
        from mpi4py import MPI
        self.MPI = MPI
        # "Open MPI v5.0.11, package: ..." or "MPICH Version:      5.0.2": name and version only
        self.library = " ".join(MPI.Get_library_version().splitlines()[0].split(",")[0].split())
        self.family = library_family(self.library)
        check_launcher(self.library)
        # nap: seconds between arrival tests, None: the collective waits alone; tuning: what was set
        self.nap, self.tuning = self._waiting_politely()
        turn_setting = turns_.parse_setting(os.environ.get(turns_.VAR))   # a bad value fails before MPI_Init
        turns_.shares_scratch(os.environ.get(turns_.SCRATCH_VAR))
        if not MPI.Is_initialized():
            MPI.Init()
        self.comm = MPI.COMM_WORLD
        self.gather_comm = self.comm.Dup()  # the compressed sums' allgathers (iallgather_), in an order of their own
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)   # this node's ranks: the turns' shared memory
        most = np.array([self.node.Get_size()], np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, most, op=MPI.MAX)
        self.ranks_per_node = int(most[0])  # the most ranks any node holds (MPI's own view of the placement)
        check_launcher(self.library, self.size)
        # turns: this node's (parallel/turns.py), from its ranks and the cores they may use together
        self.node_cores = self._node_cores()
        self.turns, self.turn, self.turn_size = turns_.plan(
            self.node.Get_rank(), self.node.Get_size(), self.node_cores, turn_setting)

    def _waiting_politely(self):
        """(nap, library settings applied) for a node with more ranks than cores, before MPI_Init (see
        OVERSUBSCRIBED_DEFAULTS); (None, {}) otherwise."""
        if not oversubscribed():
            return None, {}
        tuning = {}
        for k, v in OVERSUBSCRIBED_DEFAULTS.get(self.family, {}).items():
            if k not in os.environ:         # the user's own setting wins
                os.environ[k] = v
                tuning[k] = v
        return _nap_seconds(), tuning

    def allreduce_(self, buf, nonblocking=False):
        """Sum `buf` over all ranks, in place, in one call (oversubscribed: after everyone has arrived).
        `nonblocking`: as one non-blocking allreduce waited for at once; the same sum, but on one node
        MPICH's non-blocking path keeps its pace beside a busy process where the blocking one slows down
        (docs/scaling.md)."""
        if nonblocking:
            self.wait_all([self.iallreduce_(buf)])
            return buf
        self.wait_for_all()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def wait_for_all(self):
        """Oversubscribed: return once every rank has arrived here, napping meanwhile. Otherwise at once."""
        if self.nap is not None:
            arrived = self.comm.Ibarrier()
            while not arrived.Test():
                time.sleep(self.nap)                        # give the core to the peer we wait for

    def _node_cores(self):
        """Cores this node's ranks may use between them: the union of their affinity masks (a launcher
        that binds each rank to a core leaves each a mask of one), capped as node_layout caps a node's cores
        (cgroup quota, Slurm, LENET_NODE_CORES)."""
        mine = cpus.affinity()
        width = np.array([max(mine) + 1], np.int64)
        self.node.Allreduce(self.MPI.IN_PLACE, width, op=self.MPI.MAX)
        mask = np.zeros(int(width[0]), np.uint8)
        mask[mine] = 1
        self.node.Allreduce(self.MPI.IN_PLACE, mask, op=self.MPI.MAX)
        return node_layout(cpu_count=int(mask.sum()))[1]

    @property
    def node_rank(self):
        return self.node.Get_rank()

    @property
    def node_size(self):
        return self.node.Get_size()

    def node_shared(self, nbytes):
        """`nbytes` of memory that every rank of this node sees, as a uint8 array (held by node rank 0).
        Collective over the node."""
        return self.node_segments(nbytes if self.node_rank == 0 else 0)[0]

    def node_segments(self, nbytes):
        """Every rank of this node gives `nbytes` (its own figure, 0 included) of memory that every rank of
        the node sees: a uint8 array per node rank (MPI_Win_allocate_shared). Collective over the node. The
        window lives as long as this communicator."""
        win = self.MPI.Win.Allocate_shared(nbytes, 1, comm=self.node)
        self._windows = getattr(self, "_windows", []) + [win]
        out = []
        for r in range(self.node_size):
            mem, _ = win.Shared_query(r)
            out.append(np.frombuffer(mem, np.uint8, count=len(mem)) if len(mem) else np.zeros(0, np.uint8))
        return out

    def node_token(self):
        """A random name that every rank of this node shares (node rank 0's), for node-local rendezvous.
        Collective over the node."""
        token = np.frombuffer(os.urandom(8), np.uint8).copy()
        self.node.Bcast(token, root=0)
        return token.tobytes().hex()

    def lane(self):
        """This communicator again, on duplicates of its own: a class of collectives (buckets.Lane) whose
        order on every rank is independent of the others'. Collective: every rank makes its lanes in the
        same order."""
        other = copy.copy(self)
        other.comm, other.gather_comm = self.comm.Dup(), self.comm.Dup()
        return other

    # Non-blocking sums for the bucketed allreduce (buckets.py): start one as soon as its gradients are
    # ready, let MPI progress it while backward goes on, wait before the update. MPICH progresses a
    # non-blocking collective only inside MPI calls (no progress thread: ranks are single-threaded), so
    # the caller tests its requests between layers (test_all).
    def iallreduce_(self, buf, dtype="float32"):
        """Start summing `buf` over all ranks in place; returns the request. dtype 'float16' / 'bfloat16':
        `buf` holds half-precision values (np.float16, or bfloat16 bits in np.uint16), summed by MPI in
        half (parallel/compressed.py's HalfSum is the faster way where it sends no more bytes)."""
        mpi_type, op = self._half_types(dtype)
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf if mpi_type is None else [buf, mpi_type], op=op)

    def ialltoall_(self, send, recv):
        """Start sending chunk r of `send` (size equal chunks) to rank r, into chunk s of `recv` from rank s."""
        return self.comm.Ialltoall(send, recv)

    def iallgather_(self, send, recv):
        """Start gathering every rank's `send` into `recv`, rank order, on a duplicate of the world
        communicator: its order among these calls is its own (parallel/compressed.py's HalfSum)."""
        return self.gather_comm.Iallgather(send, recv)

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
        once, and what sat unread in that pipe (the one-line reason for the abort) could be lost. A short
        grace after the flush lets the launcher forward it first.
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


_DONE = _Done()


def _bf16_sum(inbuf, inoutbuf, datatype):
    """MPI user op: inout += in, both bfloat16 bits (uint16), summed in float32 and rounded back."""
    a, b = np.frombuffer(inbuf, np.uint16), np.frombuffer(inoutbuf, np.uint16)
    b[:] = to_bfloat16(from_bfloat16(a) + from_bfloat16(b))


def bcast_json(comm, obj):
    """Rank 0's JSON-able `obj` on every rank (the others pass anything): its length, then its bytes."""
    raw = _json_bytes(obj) if comm.rank == 0 else np.zeros(0, np.uint8)
    n = int(comm.bcast_(np.array([len(raw)], np.int64))[0])
    return _from_json_bytes(comm.bcast_(raw if comm.rank == 0 else np.zeros(n, np.uint8)))


def allgather_json(comm, obj):
    """Every rank's JSON-able `obj`, in rank order: the lengths, then the bytes padded to the longest."""
    raw = _json_bytes(obj)
    lengths = comm.allgather(np.array([len(raw)], np.int64))[:, 0]
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[:len(raw)] = raw
    return [_from_json_bytes(row[:n]) for row, n in zip(comm.allgather(buf), lengths)]


def _json_bytes(obj):
    return np.frombuffer(json.dumps(obj).encode(), np.uint8).copy()


def _from_json_bytes(buf):
    return json.loads(buf.tobytes())


def get_comm(force_local=False):
    """MPIComm when launched by an MPI launcher, else LocalComm (no MPI library is even loaded)."""
    if force_local or not launched_by_mpi():
        return LocalComm()
    return MPIComm()
